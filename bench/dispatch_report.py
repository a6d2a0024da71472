"""The printed report of ``bench/dispatch.py`` and issue 23's acceptance bounds against its
figures (``acceptance``, also written to the JSON)."""

from __future__ import annotations

from typing import Any, Callable

# issue 23's acceptance: (key, what, bound, "min" (figure >= bound) or "max" (figure <= bound))
BOUNDS = (
    ("ours_over_ray_tasks_per_s", "ours / Ray no-op tasks/s (ratio of medians)", 1.5, "min"),
    ("ours_over_ray_latency_median", "ours / Ray submit -> result latency median", 2.0, "max"),
    ("drain_call_units_per_s", "drain of callable no-op units, units/s", 2000.0, "min"),
    ("drain_command_units_per_s", "drain of `true` command units, units/s", 1000.0, "min"),
    ("leader_us_per_task", "leader CPU per task at its sustained rate, µs (worst feed)", 150.0, "max"),
)


def _get(d: Any, *path: str) -> Any:
    for key in path:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def acceptance(res: dict) -> dict[str, dict]:
    """Each bound with the run's figure (None where the part did not run or failed) and whether
    it is met."""
    ray = _get(res, "peers", "ratios", "ray") or {}
    # a feed's figure exists only where one master led its whole window (dispatch_leader)
    feeds = {f: _get(res, "leader", f, "leader_us_per_task") for f in ("map", "units")}
    feeds = {f: v for f, v in feeds.items() if v is not None}
    worst = max(feeds, key=feeds.get) if feeds else None
    figures = {
        "ours_over_ray_tasks_per_s": ray.get("tasks_per_s"),
        "ours_over_ray_latency_median": ray.get("latency_median"),
        "drain_call_units_per_s": _get(res, "drain", "call", "units_per_s"),
        "drain_command_units_per_s": _get(res, "drain", "command", "units_per_s"),
        "leader_us_per_task": feeds.get(worst) if worst else None,
    }
    out = {}
    for key, what, bound, kind in BOUNDS:
        v = figures[key]
        out[key] = {"what": what, "value": v, "bound": bound, "kind": kind,
                    "met": None if v is None else (v >= bound if kind == "min" else v <= bound)}
    if worst:
        out["leader_us_per_task"]["feed"] = worst
        out["leader_us_per_task"]["by_feed"] = {
            f: {"us_per_task": v, **{k: _get(res, "leader", f, k) for k in ("committed_per_s", "saturated", "bound")}}
            for f, v in feeds.items()}
    if ray.get("tasks_per_s_paired_median") is not None:
        out["ours_over_ray_tasks_per_s"]["paired_median"] = ray["tasks_per_s_paired_median"]
    return out


# ---- printing -------------------------------------------------------------------------------------


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}"
    return str(x)


class _Out:
    """Tables through rich where it is installed, plain text otherwise."""

    def __init__(self) -> None:
        try:
            from rich.console import Console

            self.console = Console(width=max(140, Console().width))
        except ImportError:
            self.console = None

    def line(self, text: str = "") -> None:
        if self.console is not None:
            self.console.print(text, markup=False, highlight=False)
        else:
            print(text)

    def table(self, title: str, cols: list[str], rows: list[list[str]]) -> None:
        if not rows:
            return
        if self.console is not None:
            from rich.table import Table

            t = Table(title=title, title_justify="left")
            for i, c in enumerate(cols):
                t.add_column(c, justify="left" if i == 0 else "right")
            for r in rows:
                t.add_row(*r)
            self.console.print(t)
            return
        print(title)
        w = [max(len(x[i]) for x in [cols] + rows) for i in range(len(cols))]
        for r in [cols] + rows:
            print("  ".join(x.ljust(w[i]) for i, x in enumerate(r)))


def _peers(out: _Out, p: dict) -> None:
    idle = p.get("idle_cores", {})
    rows = []
    for name, r in p.get("systems", {}).items():
        lat = r.get("latency", {})
        versions = ", ".join(f"{k} {v}" for k, v in (r.get("info") or {}).get("versions", {}).items())
        rows.append([name, "yes" if name == "ours" else "no", _fmt(r.get("tasks_per_s_median")),
                     " ".join(_fmt(x) for x in r.get("tasks_per_s_rounds", [])), _fmt(lat.get("median_ms"), 2),
                     _fmt(lat.get("p99_ms"), 2), _fmt(idle.get(name), 3), r.get("error", versions)[:60]])
    out.table(f"No-op tasks, interleaved: {p.get('rounds')} rounds of {_fmt(p.get('tasks'))} tasks and "
              f"{p.get('round_trips_per_round')} round trips per system (medians)",
              ["system", "durable", "tasks/s", "per round", "latency ms", "p99 ms", "idle cores", "versions / error"], rows)
    for name, why in p.get("not_run", {}).items():
        out.line(f"{name} not run: {why[:300]}")
    for peer, r in p.get("ratios", {}).items():
        out.line(f"ours / {peer}: tasks/s {_fmt(r['tasks_per_s'], 2)}x (paired per round {_fmt(r['tasks_per_s_paired_median'], 2)}x), "
                 f"latency median {_fmt(r.get('latency_median'), 2)}x, p99 {_fmt(r.get('latency_p99'), 2)}x")
    for name, r in p.get("systems", {}).items():
        if r.get("leftovers"):
            out.line(f"{name}: LEFTOVER processes stopped: {len(r['leftovers'])}")


def _hops(out: _Out, title: str, h: dict, roles: dict[str, str] | None = None) -> None:
    out.table(title, ["hop", "tasks", "tasks/s"],
              [[x["hop"], _fmt(x["tasks"]), _fmt(x["per_s"])] for x in h.get("hops", [])])
    raft = h.get("raft", {})
    out.line(f"  Raft: {_fmt(raft.get('entries'))} entries committed ({_fmt(raft.get('entries_per_s'))}/s), "
             f"{_fmt(raft.get('commands_per_proposal'), 1)} commands per proposal, "
             f"{_fmt(raft.get('tasks_per_entry'), 1)} tasks per entry; leader {h.get('leader')}"
             f"{' (CHANGED in the window)' if h.get('leader_changed') else ''}")
    rows = []
    for name, c in h.get("cpu", {}).items():
        m = h.get("messages", {}).get(name, {})
        role = (roles or {}).get(name, "")
        rows.append([f"{name} {role}".strip(), _fmt((c or {}).get("cores"), 3), _fmt((c or {}).get("us_per_task"), 1),
                     _fmt(m.get("in_per_s")), _fmt(m.get("out_per_s")), _fmt(m.get("in_per_task"), 3), _fmt(m.get("out_per_task"), 3),
                     _fmt(m.get("items_per_message_in"), 1), _fmt(m.get("items_per_message_out"), 1)])
    out.table("  per process (CPU with its descendants; messages from its status counters, a MESSAGE_BATCH counting once)",
              ["process", "cores", "µs/task", "msgs in/s", "out/s", "in/task", "out/task", "items/msg in", "out"], rows)


def _leader(out: _Out, lead: dict) -> None:
    out.line(f"Leader with simulated workers: {_get(lead, 'config', 'cluster')}")
    for feed in ("map", "units"):
        r = lead.get(feed)
        if not r:
            continue
        out.line(f"  feed {feed} ({r.get('feed')}): {_fmt(r.get('committed_per_s'))} tasks/s committed"
                 + (f", offered {_fmt(r.get('offered_per_s'))}/s" if r.get("offered_per_s") else "")
                 + f", leader {_fmt(r.get('leader_us_per_task'), 1)} µs per task at {_fmt(r.get('leader_cores'), 2)} cores"
                 + ("" if r.get("saturated") else "; NOT saturated (work ran out)")
                 + (f"; bound by {r['bound']}" if r.get("bound") else "")
                 + (f"; feeder errors: {r['feeder_errors']}" if r.get("feeder_errors") else ""))
        roles = {n: c.get("role", "") for n, c in r.get("cpu_by_process", {}).items()}
        _hops(out, f"  through each hop (feed {feed})", r.get("hops", {}), roles)


def _drain(out: _Out, d: dict) -> None:
    rows = [[v, _fmt(r.get("units")), _fmt(r.get("drain_s"), 1), _fmt(r.get("units_per_s")), _fmt(r.get("finished")),
             _fmt(r.get("failed")), _fmt(r.get("all_finished")), r.get("error", r.get("run", ""))[:60]]
            for v, r in d.items()]
    out.table("Work units drained (3 masters, balancer pair, 1 worker x 2 slots)",
              ["variant", "units", "seconds", "units/s", "finished", "failed", "all finished", "run / error"], rows)


def _findings(out: _Out, res: dict) -> None:
    found = {"ours": res.get("ours_log_findings"), "leader": _get(res, "leader", "log_findings")}
    found.update({f"drain {v}": r.get("log_findings") for v, r in (res.get("drain") or {}).items()})
    for where, f in found.items():
        if f:
            out.line(f"node logs ({where}): " + "; ".join(f"{n} " + ", ".join(f"{k} {v}" for k, v in c.items())
                                                        for n, c in f.items()))


def _section(out: _Out, res: dict, key: str, show: Callable[[_Out, dict], None]) -> None:
    r = res.get(key)
    if r is None:
        return
    if "error" in r and len(r) <= 3:
        out.line(f"{key} failed: {r['error']}" + (f" (logs in {r['logs']})" if r.get("logs") else ""))
        return
    show(out, r)


def print_report(res: dict) -> None:
    out = _Out()
    m = res["machine"]
    out.line(f"Dispatch benchmark {m['date']}  {m['nproc']} cpus ({m['cpu']}), Python {m['python']}; parts "
             f"{', '.join(res['parts'])}{' (quick)' if res['config']['quick'] else ''}; machine busy "
             f"{_fmt(100 * ((m.get('cpu_shares_during_run') or {}).get('busy') or 0))}% during the run; masters' Raft "
             f"options {res['config'].get('raft_options', 'as shipped')}")
    _section(out, res, "peers", _peers)
    _section(out, res, "hops", lambda o, h: _hops(o, f"Through each hop of ours ({h.get('feed')}, "
                                                    f"{_fmt(h.get('seconds'), 1)} s window)", h))
    _section(out, res, "leader", _leader)
    if res.get("drain"):
        _drain(out, res["drain"])
    _section(out, res, "slot", lambda o, s: o.line(
        f"one slot alone: {_fmt(s['tasks_per_s'])} no-op tasks/s ({s['ok']:,} of {s['tasks']:,} ok, "
        f"{s['spawns']} child process(es) started)"))
    _section(out, res, "takeover", lambda o, t: o.line(
        f"balancer takeover (SIGKILL of the active one to the first task through the other): median "
        f"{_fmt(t['median_s'], 2)} s of {t['kills']} ({', '.join(_fmt(x, 2) for x in t['seconds'])})"))
    _section(out, res, "curve", lambda o, c: o.line(
        f"CURVE against plaintext ({c['rounds']} interleaved batches of {c['tasks']:,}): {_fmt(c['curve']['median'])} "
        f"against {_fmt(c['plaintext']['median'])} tasks/s, ratio {_fmt(c['curve_over_plaintext'], 2)}"))
    _findings(out, res)
    acc = res.get("acceptance", {})
    out.table("Issue 23 acceptance", ["figure", "value", "bound", "met"],
              [[a["what"], _fmt(a["value"], 2 if isinstance(a["value"], float) and a["value"] < 10 else 0),
                ("≥ " if a["kind"] == "min" else "≤ ") + _fmt(a["bound"], 1), _fmt(a["met"])] for a in acc.values()])
    out.line(f"total {res['elapsed_s']:.1f} s; results in {res['json_path']}")
