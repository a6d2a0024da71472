"""Console scripts of the node tiers: each is the matching ``cluster`` subcommand."""

from __future__ import annotations


def master() -> None:
    """``cluster-master --config masters.toml --name m1 [--data-dir D]``: one master."""
    from cluster.cli import master_command

    master_command(prog_name="cluster-master")


def balancer() -> None:
    """``cluster-balancer --config cluster.toml --name b1``: one balancer of the pair."""
    from cluster.cli import balancer_command

    balancer_command(prog_name="cluster-balancer")


def storage() -> None:
    """``cluster-storage --config cluster.toml --name s1 --data-dir D``: one storage node."""
    from cluster.cli import storage_command

    storage_command(prog_name="cluster-storage")


def worker() -> None:
    """``cluster-worker --config cluster.toml --name w1 --data-dir D``: one worker."""
    from cluster.cli import worker_command

    worker_command(prog_name="cluster-worker")
