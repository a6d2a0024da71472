"""The ``cluster`` command line: for users and operators.

Built so far: ``up``/``down``/``restart`` (a local cluster in the background, see ``cluster.up``), ``status``
(every node of a cluster, or any node by address), ``probe`` (a probe node between machines), the node
commands ``master``, ``balancer``, ``storage`` and ``worker``, the file commands ``upload``, ``download``, ``files``,
``align``, for users and operators ``jobs``, ``workers``, ``submit``, ``cancel`` and ``logs``, and the
work-spec commands ``add-spec``, ``load``, ``summary``, ``specs``, ``units``, ``pause``, ``resume``, ``prioritize``,
``reweight`` and ``retry``, and ``keys`` (the CURVE keys: init, add, revoke, rotate, list).
Read commands take ``--json``. Errors are one line that says what to do, never a traceback.
"""

from __future__ import annotations

import click

from cluster import __version__
from cluster.cli_common import CONFIG_OPTION, DIR_OPTION, _client, _progress
from cluster.cli_files import download, files, upload
from cluster.cli_jobs import align, jobs, workers
from cluster.cli_tasks import cancel, logs, submit
from cluster.cli_keys import keys_group
from cluster.cli_nodes import (balancer_command, down, master_command, mount_command, probe, restart, status,
                               storage_command, up, worker_command)
from cluster.cli_work import COMMANDS as WORK_COMMANDS

__all__ = ["cli", "main", "CONFIG_OPTION", "DIR_OPTION", "_client", "_progress",
           "master_command", "storage_command", "balancer_command", "worker_command"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cluster")
def cli() -> None:
    """Operate a ZeroMQ compute cluster."""


for _command in (status, up, down, restart, probe, master_command, storage_command, balancer_command, worker_command,
                 mount_command, upload, download, files, align, jobs, workers, submit, cancel, logs, keys_group,
                 *WORK_COMMANDS):
    cli.add_command(_command)


def main() -> None:
    """Entry point of the ``cluster`` console script."""
    cli()
