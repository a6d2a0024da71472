#!/usr/bin/env python3
"""The lock of every runtime, test and build dependency: ``requirements.lock``.

``make lock`` resolves ``pyproject.toml`` (runtime dependencies, the ``test`` extra and the
build backend) with uv's ``pip compile --generate-hashes`` into exact versions with hashes, and
stamps the lock with a digest of the dependency tables it was made from. ``make setup`` installs
only from the lock (``pip install --require-hashes``), so a fresh machine gets what CI got.

uv has a check mode only for its own project lock (``uv.lock``), and pip-compile has none, so
the stamp is the check: ``make test`` runs ``deploy/lock.py check`` first, and an edit of the
dependency tables that was not followed by ``make lock`` fails at once with what to do, instead
of installing something nobody resolved.

The lock is for CPython 3.11 on x86_64 Linux (manylinux 2.28, Debian 12's glibc), what CI and
the rack run; each package lists the hashes of all its files, so pip picks the right wheel.

Usage: ``deploy/lock.py check`` | ``deploy/lock.py lock UV`` (``make lock``: resolve with the uv
binary UV, then stamp). Needs only the standard library (tomllib), so it runs before any venv.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
LOCK = ROOT / "requirements.lock"
STAMP = "# dependency-tables-sha256: "


def tables_digest(pyproject: Path = PYPROJECT) -> str:
    """A digest of what the lock is resolved from: comments and formatting do not count."""
    data = tomllib.loads(pyproject.read_text())
    project = data.get("project", {})
    tables = {
        "requires-python": project.get("requires-python"),
        "dependencies": sorted(project.get("dependencies", [])),
        "optional-dependencies": {k: sorted(v) for k, v in sorted(project.get("optional-dependencies", {}).items())},
        "build-system": sorted(data.get("build-system", {}).get("requires", [])),
    }
    return hashlib.sha256(json.dumps(tables, sort_keys=True).encode()).hexdigest()


def stamped_digest(lock: Path = LOCK) -> str | None:
    if not lock.exists():
        return None
    for line in lock.read_text().splitlines():
        if line.startswith(STAMP):
            return line[len(STAMP):].strip()
    return None


def check() -> int:
    want, have = tables_digest(), stamped_digest()
    if have is None:
        print(f"{LOCK.name} is missing or has no stamp: run 'make lock' and commit {LOCK.name}", file=sys.stderr)
        return 1
    if want != have:
        print(
            f"{LOCK.name} no longer matches the dependency tables of pyproject.toml "
            f"(they changed since the lock was made): run 'make lock' and commit {LOCK.name}",
            file=sys.stderr,
        )
        return 1
    return 0


def lock(uv: str) -> int:
    data = tomllib.loads(PYPROJECT.read_text())
    with tempfile.NamedTemporaryFile("w", suffix=".in") as build:
        # the build backend too: make setup installs the project with --no-build-isolation, so
        # not even setuptools comes from outside the lock
        build.write("\n".join(data.get("build-system", {}).get("requires", [])) + "\n")
        build.flush()
        cmd = [
            uv, "pip", "compile", str(PYPROJECT), build.name, "--extra", "test", "--generate-hashes",
            "--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28",
            "--no-header", "--quiet", "-o", str(LOCK),
        ]
        done = subprocess.run(cmd)
    if done.returncode:
        return done.returncode
    text = LOCK.read_text().replace(build.name, "pyproject.toml (build-system)")
    header = [
        STAMP + tables_digest(),
        "# Made by 'make lock' (deploy/lock.py) from pyproject.toml: runtime, test and build",
        "# dependencies, exact versions with hashes, for CPython 3.11 on x86_64 Linux. Do not edit.",
    ]
    LOCK.write_text("\n".join(header) + "\n" + text)
    return 0


def main(argv: list[str]) -> int:
    if argv == ["check"]:
        return check()
    if len(argv) == 2 and argv[0] == "lock":
        return lock(argv[1])
    print("usage: deploy/lock.py check | deploy/lock.py lock UV", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
