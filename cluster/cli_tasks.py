"""The task commands of ``cluster``: ``submit`` (run a command on a worker, print its output as
it comes, exit with its status), ``cancel``, and ``logs`` (a node's log, or a task's output)."""

from __future__ import annotations

import concurrent.futures
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from cluster.cli_common import CONFIG_OPTION, WRITE_TIMEOUT, _json, _session
from cluster.follow import print_line
from cluster.futures import CommandFailed, TaskError, TaskTimeout
from cluster.node.config import cluster_home, find_config
from cluster.up import read_nodes
from proto.fileids import parse_id


def _pairs(values: tuple[str, ...], what: str, option: str) -> dict[str, str]:
    """``K=V`` option values as a dict; a value without ``=`` is a one-line error."""
    out = {}
    for v in values:
        key, eq, value = v.partition("=")
        if not eq or not key:
            raise click.ClickException(f"{option} {v!r} is not {what}")
        out[key] = value
    return out


@click.command(context_settings={"allow_interspersed_args": False})
@click.argument("argv", nargs=-1, required=True, metavar="-- CMD [ARGS...]")
@CONFIG_OPTION
@click.option("--env", "env", multiple=True, metavar="K=V", help="An environment variable for the command (repeatable).")
@click.option("--input", "inputs", multiple=True, metavar="NAME=FILEID",
              help="A stored file, visible to the command as NAME in its directory (repeatable).")
@click.option("--output", "outputs", multiple=True, metavar="NAME",
              help="A file the command must leave; it is stored and its id printed (repeatable).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds the command may run on its worker.")
@click.option("--after", "after", multiple=True, metavar="JOB",
              help="Start only once job JOB is done; if it fails, this one fails without running (repeatable).")
@click.option("--no-wait", is_flag=True, help="Print the job id and return; `cluster jobs JOB` follows it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (job, exit_code, stdout, stderr, outputs).")
def submit(argv: tuple[str, ...], config_path: Path | None, env: tuple[str, ...], inputs: tuple[str, ...],
           outputs: tuple[str, ...], timeout_s: float | None, after: tuple[str, ...], no_wait: bool, as_json: bool) -> None:
    """Run a command on a worker and print its output and exit code. E.g.
    `cluster submit -- sh -c "echo hi"`; a command that fails gives one line and exits with the
    command's own status (124: it timed out; 125: the cluster could not run it)."""
    try:
        _submit(argv, config_path, env, inputs, outputs, timeout_s, after, no_wait, as_json)
    except SubmitFailed:
        raise
    except click.ClickException as exc:  # bad options, no quorum, a refusal: not the command's status
        raise SubmitFailed(exc.format_message(), EXIT_CLUSTER) from None


def _submit(argv: tuple[str, ...], config_path: Path | None, env: tuple[str, ...], inputs: tuple[str, ...],
            outputs: tuple[str, ...], timeout_s: float | None, after: tuple[str, ...], no_wait: bool,
            as_json: bool) -> None:
    files = _pairs(inputs, "NAME=FILEID", "--input")
    for name, file_id in files.items():
        try:
            files[name] = parse_id(file_id).hex()
        except ValueError as exc:
            raise click.ClickException(f"--input {name}: {exc}")
    with _session(config_path, WRITE_TIMEOUT) as client:
        runner = client.options(timeout_s=timeout_s) if timeout_s else client
        if after:
            runner = runner.options(after=[j.lower() for j in after])
        future = runner.run(list(argv), env=_pairs(env, "K=V", "--env"), inputs=files, outputs=list(outputs))
        if no_wait:
            click.echo(_json({"job": future.job, "task": future.task}) if as_json else future.job)
            return
        echo = None if as_json else _Echo(client, future)
        try:
            result = _wait_command(future, argv[0])
        finally:
            if echo is not None:
                echo.finish()
    if as_json:
        click.echo(_json({"job": future.job, "exit_code": result.exit_code,
                          "stdout": result.stdout.decode(errors="replace"), "stderr": result.stderr.decode(errors="replace"),
                          "outputs": result.outputs, "stdout_file": result.stdout_file, "stderr_file": result.stderr_file}))
        return
    if not echo.complete:  # not followed to its end (no worker port reached, lines lost): the stored output
        if echo.printed:
            click.echo("(its output as stored with the result, whole or its end:)", err=True)
        click.get_binary_stream("stdout").write(result.stdout)
        sys.stdout.flush()
        click.get_binary_stream("stderr").write(result.stderr)
    for name, file_id in result.outputs.items():
        click.echo(f"output {name}: {file_id}", err=True)
    if result.stdout_file:
        click.echo(f"(the end of its output; all of it: `cluster download {result.stdout_file} PATH`)", err=True)
    click.echo(f"exit code {result.exit_code} (job {future.job})", err=True)


class _Echo(threading.Thread):
    """Prints the task's output as it comes (``cluster.follow``), while ``submit`` waits for its
    end: stdout lines to stdout, stderr lines to stderr. ``complete``: it saw the whole of it."""

    def __init__(self, client: Any, future: Any) -> None:
        super().__init__(name="output", daemon=True)
        self.client, self.future = client, future
        self.state: dict[str, Any] = {}
        self.printed = False
        self.start()

    def run(self) -> None:
        try:
            for line in self.client.follow(self.future.job, self.future.task, done=self.future.done, state=self.state):
                print_line(line, sys.stdout, sys.stderr)
                self.printed = True
        except Exception:  # noqa: BLE001 - following is a nicety: the stored output is printed instead
            self.state["ended"] = False

    def finish(self, timeout_s: float = 5.0) -> None:
        self.join(timeout_s)

    @property
    def complete(self) -> bool:
        return not self.is_alive() and bool(self.state.get("ended")) and not self.state.get("dropped")


# `cluster submit`'s exit status, as `srun` and `docker run` say theirs: the command's own status
# when it ran; else one of these, which no command of ours returns by itself (doc/operations.md).
EXIT_TIMEOUT = 124  # it ran past --timeout and was killed (as coreutils' `timeout` says it)
EXIT_CLUSTER = 125  # the cluster could not take or run the job (no quorum, refused, a task that could not start)


class SubmitFailed(click.ClickException):
    """One line on stderr, and the exit status ``code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


def _wait_command(future: Any, program: str) -> Any:
    """The CommandResult of ``future``; its failure as one line and its exit status; Ctrl-C
    leaves the job running."""
    try:
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                continue
    except TaskError as exc:
        tail = exc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        said = f"; its stderr ends: {tail[0].strip()[:300]!r}" if tail else ""
        code = exc.exit_code if isinstance(exc, CommandFailed) else EXIT_TIMEOUT if isinstance(exc, TaskTimeout) else EXIT_CLUSTER
        raise SubmitFailed(f"{program} failed on the cluster: {exc.error} (job {future.job}){said}", code) from None
    except KeyboardInterrupt:
        click.echo(f"\njob {future.job} keeps running: `cluster jobs {future.job}` follows it, "
                   f"`cluster cancel {future.job}` stops it", err=True)
        sys.exit(130)


@click.command()
@click.argument("job_id")
@CONFIG_OPTION
@click.option("--reason", default="", help="Why, recorded as the job's error.")
def cancel(job_id: str, config_path: Path | None, reason: str) -> None:
    """Cancel JOB: no more of its tasks start; those already running end on their workers and
    their results are dropped."""
    with _session(config_path, WRITE_TIMEOUT) as client:
        before = client.job(job_id.lower()).value["state"]  # the cancel's answer is the job's view after it
        if before != "active":
            click.echo(f"job {job_id} is already {before}: nothing to cancel")
            return
        after = client.cancel(job_id.lower(), reason or "cancelled with `cluster cancel`")
    click.echo(f"cancelled job {job_id}" if after.get("state") == "cancelled"
               else f"job {job_id} is {after.get('state')}: it ended before the cancel")


@click.command()
@click.argument("name", required=False)
@CONFIG_OPTION
@click.option("--lines", "-n", type=click.IntRange(0), default=20, show_default=True, help="How many of its last lines.")
@click.option("--follow", "-f", is_flag=True, help="Keep printing what the node (or the task) writes, until Ctrl-C "
                                                   "(or the task's end).")
@click.option("--task", "task", metavar="JOB/N", default=None,
              help="Task N of JOB's output instead (each line with its time): live from its worker while it runs.")
def logs(name: str | None, config_path: Path | None, lines: int, follow: bool, task: str | None) -> None:
    """The end of node NAME's log (m1, b1, s1, w1, ...) of a local cluster (`cluster up`), or with
    --task JOB/N a task's output, e.g. `cluster logs --task 92590000a656945e5bb9876e197bf2de/0 -f`."""
    if task is not None:
        if name is not None:
            raise click.UsageError("give a node NAME or --task JOB/N, not both")
        _task_output(config_path, task, follow)
        return
    if name is None:
        raise click.UsageError("which log? a node NAME (m1, w1, ...) or --task JOB/N")
    directory, known = _node_logs(config_path)
    if name not in known:
        raise click.ClickException(f"no node {name!r} in {directory}; known: {', '.join(sorted(known)) or 'none'}")
    path = known[name]
    out = click.get_binary_stream("stdout")
    try:
        text, offset = _tail(path, lines)
    except OSError as exc:
        raise click.ClickException(f"cannot read {name}'s log {path}: {exc.strerror or exc}")
    out.write(text)
    out.flush()
    if follow:
        try:
            _follow(path, offset, out)
        except KeyboardInterrupt:
            pass


def _task_output(config_path: Path | None, task: str, follow: bool) -> None:
    """A task's output: live from its worker while it runs (each line with its time), the stored
    output once it has ended."""
    job, _, number = task.partition("/")
    if len(job) != 32 or not number.isdigit():
        raise click.UsageError(f"--task takes JOB/N (a job's 32-digit id, a slash, a task number), not {task!r}")
    job, n = job.lower(), int(number)
    with _session(config_path) as client:
        view = client.task(job, n).value
        if view.get("state") in ("waiting", "ready", "assigned"):  # not ended: its worker has it, or will
            state: dict[str, Any] = {}
            try:
                for line in client.follow(job, n, live=follow, state=state):
                    print_line(line, sys.stdout, sys.stderr, times=True)
            except KeyboardInterrupt:
                return
            view = client.task(job, n).value
            if state.get("ended") or view.get("state") in ("waiting", "ready", "assigned"):
                return  # all of it was printed, or it runs on
    summary = view.get("summary") or {}
    for stream, target in (("stdout", "stdout"), ("stderr", "stderr")):
        data = summary.get(stream)
        if isinstance(data, bytes) and data:
            click.get_binary_stream(target).write(data)
        if summary.get(f"{stream}_file"):
            click.echo(f"(the end of its {stream}; all of it: `cluster download {summary[stream + '_file']} PATH`)", err=True)
    if not summary:
        click.echo(f"task {n} of job {job} is {view.get('state')}: it left no output", err=True)


def _node_logs(config_path: Path | None) -> tuple[Path, dict[str, Path]]:
    """The local cluster's directory (the config's) and its nodes' logs by name: from nodes.json,
    or, for a stopped cluster, the logs `cluster down` keeps."""
    path, looked = find_config(None, config_path)
    if path is None and config_path is not None:
        raise click.ClickException(f"no cluster config at {config_path}")
    directory = path.absolute().parent if path is not None else cluster_home()
    records = read_nodes(directory)
    if records:
        return directory, {r.name: Path(r.log) for r in records}
    if (directory / ".local-cluster").exists():
        kept = {p.stem: p for p in directory.glob("*.log")}
        if kept:
            return directory, kept
    raise click.ClickException(f"no local cluster in {directory} ({looked}): `cluster logs` reads the logs of a "
                               "cluster `cluster up` started (nodes elsewhere log where they were started)")


def _tail(path: Path, lines: int, block: int = 1 << 16) -> tuple[bytes, int]:
    """The last ``lines`` lines of ``path`` and its size, read from the end."""
    with open(path, "rb") as f:
        end = f.seek(0, 2)
        data, pos = b"", end
        while pos > 0 and data.count(b"\n") <= lines:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    kept = data.splitlines(keepends=True)[-lines:] if lines else []
    return b"".join(kept), end


def _follow(path: Path, offset: int, out: Any, poll_s: float = 0.25) -> None:
    """Print what is appended to ``path`` past ``offset`` until Ctrl-C (from the start again if
    the file is replaced or truncated, as by a new `cluster up`)."""
    while True:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            size = 0
        if size < offset:
            offset = 0
        if size > offset:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read(size - offset)
            offset += len(chunk)
            out.write(chunk)
            out.flush()
        time.sleep(poll_s)  # a log file gives no wake-up: poll it, like tail -f
