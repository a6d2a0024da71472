"""House rule: node cores and the event vocabulary touch no I/O (sockets, clocks, threads, disk)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"zmq", "time", "threading", "os", "socket", "asyncio", "subprocess", "pysyncobj", "signal", "random", "select"}
PURE = sorted(
    p for pkg in ("cluster", "master", "balancer", "storage", "worker") for p in (ROOT / pkg).rglob("core.py")
) + [ROOT / "cluster/node/events.py", ROOT / "balancer/binary_star.py", ROOT / "balancer/registry.py", ROOT / "balancer/dispatch.py", ROOT / "balancer/masters.py", ROOT / "balancer/intake.py"] + [ROOT / "master" / f for f in ("ledger.py", "jobs.py", "commands.py", "workspec.py", "views.py",
    "state.py", "files.py", "joblife.py", "attempts.py", "standing.py", "batching.py", "api.py", "stream.py",
    "watches.py", "specs.py", "work_units.py", "work_specs.py", "work_history.py", "work_quorum.py",
    "work_share.py", "reasons.py", "runs.py", "pending.py", "diskfull.py", "ready.py", "work_offer.py")] + [ROOT / "storage/core.py", ROOT / "worker/core.py",
    ROOT / "worker/output.py", ROOT / "worker/prefetch.py", ROOT / "cluster/node/acting.py", ROOT / "cluster/node/sendqueue.py",
    ROOT / "cluster/readplan.py"]


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_there_are_cores_to_check():
    assert ROOT / "cluster/probe/core.py" in PURE


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_core_imports_no_io(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: cores take `now` and return effects"
