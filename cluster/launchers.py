"""Console scripts of the node tiers: each is the matching ``cluster`` subcommand."""

from __future__ import annotations

from cluster.cli_nodes import balancer_command, master_command, storage_command, worker_command


def master() -> None:
    """``cluster-master --config masters.toml --name m1 [--data-dir D]``: one master."""
    master_command(prog_name="cluster-master")


def balancer() -> None:
    """``cluster-balancer --config cluster.toml --name b1``: one balancer of the pair."""
    balancer_command(prog_name="cluster-balancer")


def storage() -> None:
    """``cluster-storage --config cluster.toml --name s1 --data-dir D``: one storage node."""
    storage_command(prog_name="cluster-storage")


def worker() -> None:
    """``cluster-worker --config cluster.toml --name w1 --data-dir D``: one worker."""
    worker_command(prog_name="cluster-worker")
