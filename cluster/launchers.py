"""Console scripts of the node tiers; those not built yet say so in one line and exit 2."""

from __future__ import annotations

import sys


def _not_built(name: str, issue: str) -> None:
    print(f"{name}: not built yet ({issue}); see README.md for what runs today", file=sys.stderr)
    sys.exit(2)


def master() -> None:
    """``cluster-master --config masters.toml --name m1 [--data-dir D]``: one master."""
    from cluster.cli import master_command

    master_command(prog_name="cluster-master")


def balancer() -> None:
    """``cluster-balancer``: the Binary Star pair (the balancer/worker issue)."""
    _not_built("cluster-balancer", "the balancer/worker issue builds it")


def storage() -> None:
    """``cluster-storage --config cluster.toml --name s1 --data-dir D``: one storage node."""
    from cluster.cli import storage_command

    storage_command(prog_name="cluster-storage")


def worker() -> None:
    """``cluster-worker``: task execution and the FUSE view (the balancer/worker issue)."""
    _not_built("cluster-worker", "the balancer/worker issue builds it")
