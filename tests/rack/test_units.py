"""``systemd-analyze verify`` on every unit of deploy/systemd/, with the binaries where the units
expect them (issue 22).

The units run /opt/cluster/.venv/bin/cluster-*, and verify refuses a unit whose command is not
an executable file. So verify runs in a mount namespace of its own (``unshare --mount``, private
propagation), where a small tmpfs covers /opt and /opt/cluster is a link to this checkout: the
machine's /opt is never touched, and the link goes away with the namespace. Whatever verify
says about a unit (an unknown directive, a missing command, a bad value) fails the test.
tests/unit/test_systemd_units.py checks what each unit means for its role.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

from .rack import REPO, UNITS

UNIT_FILES = sorted(p.name for p in UNITS.glob("*.service"))


def _unavailable() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed (Debian's package systemd)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return "putting the binaries at /opt/cluster (in a private mount namespace) needs root"
    return None


def test_every_unit_is_checked():
    assert UNIT_FILES == ["cluster-balancer@.service", "cluster-master@.service", "cluster-mount.service",
                          "cluster-storage@.service", "cluster-worker.service"]


@pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))
@pytest.mark.parametrize("unit", UNIT_FILES)
def test_systemd_analyze_verify_with_the_binaries_in_place(unit):
    script = (f"mount -t tmpfs -o size=1m,mode=0755 rack-opt /opt && ln -s {shlex.quote(str(REPO))} /opt/cluster"
              f" && exec systemd-analyze verify {shlex.quote(str(UNITS / unit))}")
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=60)
    said = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and said == "", f"systemd-analyze verify {unit}: exit {done.returncode}\n{said}"
