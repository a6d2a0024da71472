"""The lock: every dependency pinned with hashes, and a lock older than pyproject.toml refused."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy"))

import lock  # noqa: E402  (deploy/lock.py: a script, not a package)

PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==(\S+) \\$")


def pins(text: str) -> dict[str, list[str]]:
    """Package (normalised name) -> its hashes, from a lock's text."""
    out: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        m = PIN.match(line)
        if m:
            current = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[current] = []
        elif current and line.strip().startswith("--hash=sha256:"):
            out[current].append(line.strip().split(":", 1)[1].rstrip(" \\"))
        elif not line.startswith(" "):
            current = None
    return out


def test_the_committed_lock_matches_pyproject():
    assert lock.stamped_digest() == lock.tables_digest(), "run make lock"


def test_every_direct_dependency_is_pinned_with_hashes():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["test"]
    wanted += data["build-system"]["requires"]
    locked = pins((ROOT / "requirements.lock").read_text())
    for requirement in wanted:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]).lower()
        assert name in locked, f"{name} is not in requirements.lock"
        assert locked[name] and all(len(h) == 64 for h in locked[name]), name


def test_comments_do_not_change_the_digest_but_a_dependency_does(tmp_path):
    source = (ROOT / "pyproject.toml").read_text()
    commented = tmp_path / "commented.toml"
    commented.write_text(source.replace('"click>=8.1",', '"click>=8.1",  # a new comment'))
    assert lock.tables_digest(commented) == lock.tables_digest()
    changed = tmp_path / "changed.toml"
    changed.write_text(source.replace('"click>=8.1",', '"click>=8.2",'))
    assert lock.tables_digest(changed) != lock.tables_digest()


def test_a_lock_older_than_pyproject_stops_with_what_to_do(tmp_path):
    (tmp_path / "deploy").mkdir()
    shutil.copy(ROOT / "deploy" / "lock.py", tmp_path / "deploy" / "lock.py")
    shutil.copy(ROOT / "requirements.lock", tmp_path / "requirements.lock")
    source = (ROOT / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(source)
    ok = subprocess.run([sys.executable, "deploy/lock.py", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    (tmp_path / "pyproject.toml").write_text(source.replace('"click>=8.1",', '"click>=8.1",\n    "requests>=2",'))
    stale = subprocess.run([sys.executable, "deploy/lock.py", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert stale.returncode == 1 and "make lock" in stale.stderr
    (tmp_path / "requirements.lock").write_text("flask==3.0 \\\n")
    missing = subprocess.run([sys.executable, "deploy/lock.py", "check"], cwd=tmp_path, capture_output=True, text=True)
    assert missing.returncode == 1 and "make lock" in missing.stderr
