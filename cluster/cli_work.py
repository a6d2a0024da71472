"""The work-spec commands of ``cluster``: ``add-spec``, ``load``, ``summary``, ``specs``, ``units``,
``pause``, ``resume``, ``prioritize``, ``reweight`` and ``retry`` (Coordinate's verbs; see
doc/workspecs.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cluster.cli_common import CONFIG_OPTION, WATCH_OPTION, WRITE_TIMEOUT, _ago, _json, _session, _table_console, _watch
from cluster.work import Work


@click.command("add-spec")
@click.argument("name")
@CONFIG_OPTION
@click.option("--run", "run_json", required=True,
              help='What each unit runs, as JSON: e.g. \'{"kind": "command", "argv": ["process.sh"]}\'.')
@click.option("--priority", type=int, default=0, show_default=True, help="Absolute: higher specs run first.")
@click.option("--weight", type=float, default=1.0, show_default=True,
              help="Share of the running slots among specs of equal priority.")
@click.option("--max-running", type=click.IntRange(0), default=None, help="At most this many units running at once.")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=3, show_default=True)
@click.option("--max-lost", type=click.IntRange(1, 100), default=10, show_default=True,
              help="Attempts lost to dead workers or expired leases before a unit fails (apart from --max-attempts).")
@click.option("--lease", "lease_s", type=float, default=300.0, show_default=True,
              help="Seconds a worker holds a unit before it is handed to another.")
@click.option("--then", default=None, help="The spec that gets each finished unit's output as a new unit.")
@click.option("--paused", is_flag=True, help="Create it paused (`cluster resume NAME` starts it).")
@click.option("--replicas", type=click.IntRange(1, 15), default=1, show_default=True,
              help="Run each unit on this many distinct workers and compare the results.")
@click.option("--quorum", type=click.IntRange(1, 15), default=None,
              help="How many of the replicas must agree (default: a majority).")
@click.option("--compare", type=click.Choice(["bytes", "text", "json"]), default="bytes", show_default=True,
              help="How replicas' outputs are compared: exactly, as text (trailing blanks ignored), or as JSON.")
@click.option("--every", "interval", type=float, default=None,
              help="Continuous: make a unit every this many seconds while none waits or runs.")
def add_spec(name: str, config_path: Path | None, run_json: str, priority: int, weight: float, max_running: int | None,
             max_attempts: int, max_lost: int, lease_s: float, then: str | None, paused: bool, replicas: int, quorum: int | None,
             compare: str, interval: float | None) -> None:
    """Create the work spec NAME."""
    try:
        run = json.loads(run_json)
    except json.JSONDecodeError as exc:
        raise click.ClickException(f"--run is not JSON: {exc}") from None
    keys: dict[str, Any] = {"priority": priority, "weight": weight, "max_attempts": max_attempts, "lease_s": lease_s,
                            "paused": paused}
    if max_lost != 10:  # only then: a master from before max_lost refuses the key
        keys["max_lost"] = max_lost
    if max_running is not None:
        keys["max_running"] = max_running
    if then:
        keys["then"] = then
    if replicas > 1:
        keys.update(replicas=replicas, compare=compare)
    if quorum is not None:
        keys["quorum"] = quorum
    if interval is not None:
        keys.update(continuous=True, interval=interval)
    with _session(config_path, WRITE_TIMEOUT) as client:
        _work(client).add_spec(name, run, **keys)
    click.echo(f"work spec {name} added")


def _units_from(path: Path) -> Iterator[tuple]:
    """Units from a file: one per line, ``key<TAB>data`` (data the rest of the line, as UTF-8),
    or JSON lines ``{"key": ..., "data": ..., "priority": ...}``."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line:
                continue
            if line.startswith("{"):
                try:
                    row = json.loads(line)
                    unit = (row["key"], str(row.get("data", "")).encode())
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise click.ClickException(f"{path}:{number}: not a unit ({exc}); a JSON line needs a 'key'") from None
                yield unit + ((row["priority"],) if "priority" in row else ())
            else:
                key, _, data = line.partition("\t")
                yield key, data.encode()


@click.command()
@click.argument("spec")
@click.argument("units_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@CONFIG_OPTION
def load(spec: str, units_file: Path, config_path: Path | None) -> None:
    """Add the units of UNITS_FILE to SPEC (a line each: key<TAB>data, or JSON lines), in
    batches, with a progress bar. A refused batch is named; the batches before it stay."""
    lines = sum(1 for line in open(units_file, "rb") if line.strip())
    with _session(config_path, WRITE_TIMEOUT) as client:
        work = _work(client)
        known = [r["spec"] for r in work.summary()]
        if spec not in known:  # refused up front: not batch by batch, naming units of a file never sent
            raise click.ClickException(f"no work spec named {spec!r} (known: {', '.join(known) or 'none'}); "
                                       "`cluster add-spec` makes one")
        with Progress(TextColumn("units"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True) as bar:
            task = bar.add_task("load", total=lines)
            added = work.add_units(spec, _units_from(units_file), progress=lambda n: bar.advance(task, n))
    click.echo(f"{added:,} units added to {spec}")


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@WATCH_OPTION
def summary(config_path: Path | None, as_json: bool, watch_s: float | None) -> None:
    """Units per state of every work spec (Coordinate's summary), highest priority first; with
    --watch, redrawn with each spec's units done per second over the last interval and an ETA."""
    if watch_s is not None and as_json:
        raise click.UsageError("--watch redraws the table: drop --json")
    with _session(config_path) as client:
        if watch_s is not None:
            pace = _Pace()
            _watch(lambda: _summary_table(_work(client).summary(), pace), watch_s)
            return
        rows = _work(client).summary()
    if as_json:
        click.echo(_json(rows))
        return
    _table_console().print(_summary_table(rows))


class _Pace:
    """Units ended (finished or failed) per second over the last interval, per spec and in all,
    and the time the units left (available and pending) take at that rate."""

    def __init__(self) -> None:
        self.last: tuple[float, dict[str, int]] | None = None

    def update(self, rows: list[dict[str, Any]], now: float) -> dict[str, tuple[float, float | None]]:
        """(rate, eta_s) per spec and for "" (all of them); empty on the first call."""
        ended = {r["spec"]: r["finished"] + r["failed"] for r in rows}
        left = {r["spec"]: r["available"] + r["pending"] for r in rows}
        last, self.last = self.last, (now, ended)
        if last is None or now <= last[0]:
            return {}
        seconds, before = now - last[0], last[1]
        done = {s: max(0, n - before[s]) for s, n in ended.items() if s in before}
        done[""], left[""] = sum(done.values()), sum(left[s] for s in done)
        return {s: (n / seconds, left[s] / (n / seconds) if n else None) for s, n in done.items()}


def _summary_table(rows: list[dict[str, Any]], pace: _Pace | None = None) -> Table:
    """The summary's rows as a table; with ``pace`` (--watch) each spec's rate and ETA too."""
    paced = pace.update(rows, _clock()) if pace is not None else None
    t = Table("spec", "available", "pending", "finished", "failed", "total", "disputed",
              *(("units/s", "ETA") if paced is not None else ()))
    for r in rows:
        cells = [r["spec"], *(f"{r[k]:,}" for k in ("available", "pending", "finished", "failed", "total")),
                 f"{r['disputed']:,}" if r.get("replicas", 1) > 1 else "-"]
        t.add_row(*cells, *(_paced(paced, r["spec"]) if paced is not None else ()))
    if paced:
        rate, eta = _paced(paced, "")
        t.caption = f"all specs: {rate} units/s, ETA {eta}"
    return t


def _paced(paced: dict[str, tuple[float, float | None]], spec: str) -> tuple[str, str]:
    if spec not in paced:
        return "-", "-"  # the first frame, or a spec new since the last
    rate, eta = paced[spec]
    return f"{rate:,.1f}", _ago(eta)


def _clock() -> float:
    return time.monotonic()


@click.command()
@CONFIG_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def specs(config_path: Path | None, as_json: bool) -> None:
    """Every work spec with its scheduling keys."""
    with _session(config_path) as client:
        rows = _work(client).summary()
    if as_json:
        click.echo(_json(rows))
        return
    t = Table("spec", "priority", "weight", "max running", "replicas", "every", "state", "units")
    for r in rows:
        replicas = f"{r['replicas']} (quorum {r['quorum']})" if r.get("replicas", 1) > 1 else "-"
        every = f"{r['continuous']:g} s" if r.get("continuous") else "-"
        t.add_row(r["spec"], str(r["priority"]), f"{r['weight']:g}", "-" if r["max_running"] is None else str(r["max_running"]),
                  replicas, every, "paused" if r["paused"] else "active", f"{r['total']:,}")
    _table_console().print(t)


@click.command()
@click.argument("spec")
@CONFIG_OPTION
@click.option("--state", type=click.Choice(["available", "pending", "finished", "failed"]), default=None,
              help="Only the units in this state.")
@click.option("--attempts", "min_attempts", type=click.IntRange(0), default=0, help="Only units tried at least this often.")
@click.option("--disputed", is_flag=True, help="Only units whose replicas disagreed, with every vote.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the units and their attempts as JSON.")
def units(spec: str, config_path: Path | None, state: str | None, min_attempts: int, disputed: bool, limit: int,
          as_json: bool) -> None:
    """SPEC's units (e.g. `--state failed`) with every attempt: worker, start, end, outcome;
    for a redundant spec, each worker's vote (the digest of its output; * marks the quorum's)."""
    with _session(config_path) as client:
        view = _work(client).units(spec, state=state, limit=limit, min_attempts=min_attempts, disputed=disputed)
    if as_json:
        click.echo(_json(view))
        return
    voted = any("ballots" in u for u in view["units"])
    t = Table("unit", "key", "state", "attempts", *(["votes"] if voted else []))
    for u in view["units"]:
        tried = "; ".join(f"{a['worker']}: {a['outcome'] or 'running'}" + (f" ({a['reason']})" if a.get("reason") else "")
                          for a in u["attempts"]) or "-"
        row = [str(u["unit"]), u["key"], u["state"], tried]
        if voted:
            b = u.get("ballots")
            row.append("; ".join(f"{w}: {d[:8]}{'*' if d == b['winner'] else ''}" for w, d in b["votes"])
                       + ("" if b["winner"] or not b["disputed"] else " (no quorum)") if b else "-")
        t.add_row(*row)
    _table_console().print(t)
    _failure_tails(view["units"])
    if view["next"] is not None:
        click.echo(f"(more: the first {limit} shown)")


TAILS_SHOWN = 5


def _failure_tails(rows: list[dict[str, Any]]) -> None:
    """Under the table, what the last failed attempt of the first few failed units wrote: the
    end of a traceback, or of a command's stderr (the ledger keeps it: master.reasons)."""
    shown = 0
    for u in rows:
        last = next((a for a in reversed(u["attempts"]) if a.get("tail")), None)
        if last is None:
            continue
        if shown == TAILS_SHOWN:
            click.echo("(--json shows the rest)")
            return
        shown += 1
        click.echo(f"\nunit {u['unit']} ({u['key']}), on {last['worker']}: {last['reason']}")
        click.echo("\n".join(f"  {line}" for line in last["tail"].splitlines()))


def _control(action: str, doc: str, value_type: Any = None):
    @click.command(action, help=doc)
    @click.argument("spec")
    @CONFIG_OPTION
    def command(spec: str, config_path: Path | None, **kw: Any) -> None:
        with _session(config_path, WRITE_TIMEOUT) as client:
            result = _work(client).control(spec, {"reweight": "weight"}.get(action, action), kw.get("value"))
        click.echo(f"{action} {spec}" + (f": {result['retried']:,} failed units available again" if "retried" in result else ""))

    if value_type is not None:
        command = click.argument("value", type=value_type)(command)
    return command


pause = _control("pause", "Hand out no more units of SPEC (running ones finish).")
resume = _control("resume", "Hand out SPEC's units again.")
prioritize = _control("prioritize", "Set SPEC's priority to VALUE (absolute: higher specs run first).", int)
reweight = _control("reweight", "Set SPEC's weight to VALUE (its share among specs of equal priority).", float)
retry = _control("retry", "Make SPEC's failed units available again, with fresh attempts.")


def _work(client: Any):
    return Work(client)


COMMANDS = (add_spec, load, summary, specs, units, pause, resume, prioritize, reweight, retry)
