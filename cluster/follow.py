"""Following a task's output while it runs (issue 21): what `cluster submit` prints as it comes,
`cluster logs --task JOB/N -f` and ``TaskFuture.stream()``.

Output never passes through masters or balancers. A worker keeps its running tasks' output as
timed lines (``worker.output``) and serves them on its control port (OUTPUT_FOLLOW /
OUTPUT_LINES, CURVE, to the task's owner, operators and monitors). The active balancer's worker
list says where each worker's port is; the follower asks every worker once whether it runs the
task, then polls the one that does, a few times a second, until the task has ended there. A task
not started yet is looked for again every second; one that ran on no worker this follower can
reach ends the stream with nothing, and its stored output (``TaskFuture.result()``) is all there is.
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import zmq

from cluster.node import keys
from cluster.node.masterlink import ClusterError
from cluster.node.status import query_status
from proto import Codec, ProtocolError, new_node_id
from proto.ids import split128
from proto.messages import Error, OutputFollow, OutputLines

POLL_S = 0.25  # between two asks of the worker that runs the task
LOOK_S = 1.0  # between two searches for it while no worker has it
ANSWER_S = 2.0  # how long one worker may take to answer
RUNNING, ENDED, NOT_HERE = 0, 1, 2
STREAMS = {1: "stdout", 2: "stderr"}


@dataclass(frozen=True)
class Line:
    """One line a task wrote: ``at`` when the worker read it (Unix seconds), ``stream``
    ("stdout" or "stderr"), ``text`` without its newline; ``dropped``: lines lost before it
    to the worker's bound (a follower too slow for a chatty task)."""

    seq: int
    at: float
    stream: str
    text: str
    dropped: int = 0


def follow(balancers: list[str], credentials: keys.Credentials | None, job: str, task: int, *,
           done: Callable[[], bool], give_up_s: float = 3.0, state: dict[str, Any] | None = None,
           live: bool = True) -> Iterator[Line]:
    """The lines of task ``task`` of ``job`` (hex id) as they come, until it has ended on its
    worker; ``done()`` says whether the task has ended in the ledger (then a task no worker
    holds will never show up); ``give_up_s``: how long to look for it after that. ``state``
    learns ``ended`` (the worker said the output is complete) and ``dropped`` (lines lost).
    ``live`` False: only the lines there are now (it returns once caught up)."""
    state = state if state is not None else {}
    state.setdefault("ended", False)
    state.setdefault("dropped", 0)
    upper, lower = split128(bytes.fromhex(job))
    ctx = zmq.Context.instance()
    codec = Codec(new_node_id())
    ids = itertools.count(random.getrandbits(40))
    after, ended_at, looked = 0, None, 0
    while True:
        found = _find(ctx, codec, ids, _outputs(balancers, credentials), credentials, upper, lower, task)
        if found is None:
            if not live:
                return
            if done():
                ended_at = ended_at or time.monotonic()
                if time.monotonic() - ended_at > give_up_s or not balancers:
                    return
            looked += 1  # a task just submitted starts within moments: look again soon, then less often
            time.sleep(min(LOOK_S, 0.05 * 2 ** looked))  # the poll interval of a search, not a wait for a condition
            continue
        sock, first = found
        try:
            reply = first
            while True:
                state["dropped"] += reply.dropped
                for seq, at, stream, text in reply.lines:
                    yield Line(seq, at, STREAMS.get(stream, str(stream)), text, reply.dropped if seq == reply.lines[0][0] else 0)
                after = reply.next
                if reply.status == ENDED:
                    state["ended"] = True
                    return
                if reply.status == NOT_HERE:
                    break  # it moved (a rerun elsewhere): look again
                if not live and not reply.lines:
                    return
                time.sleep(POLL_S)
                reply = _ask(sock, codec, next(ids), upper, lower, task, after)
                if reply is None:
                    break  # the worker went silent: look again
        finally:
            sock.close(0)


def _outputs(balancers: list[str], credentials: keys.Credentials | None) -> dict[str, str]:
    """Worker name -> its output endpoint, as the active balancer lists them."""
    for result in query_status(balancers, timeout=ANSWER_S, credentials=credentials):
        detail = result.reply.detail if result.reply is not None else {}
        if detail.get("state") == "active":
            return {w["name"]: w["output"] for w in detail.get("workers", []) if w.get("output")}
    return {}


def _find(ctx: zmq.Context, codec: Codec, ids: Iterator[int], outputs: dict[str, str],
          credentials: keys.Credentials | None, upper: int, lower: int, task: int) -> tuple[zmq.Socket, OutputLines] | None:
    """The worker that runs (or lately ran) the task: its socket and first answer."""
    for name, endpoint in outputs.items():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            keys.connect(sock, endpoint, credentials, name=name)
        except (zmq.ZMQError, keys.KeysError):
            sock.close(0)
            continue
        reply = _ask(sock, codec, next(ids), upper, lower, task, 0)
        if reply is not None and reply.status != NOT_HERE:
            return sock, reply
        sock.close(0)
    return None


def _ask(sock: zmq.Socket, codec: Codec, rid: int, upper: int, lower: int, task: int, after: int) -> OutputLines | None:
    codec.send(sock, OutputFollow(rid, upper, lower, task, after))
    deadline = time.monotonic() + ANSWER_S
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(left * 1000):
            return None
        try:
            _, _, reply = codec.recv(sock)
        except ProtocolError:
            return None
        if isinstance(reply, OutputLines) and reply.request_id == rid:
            return reply
        if isinstance(reply, Error) and reply.request_id == rid:
            raise ClusterError(f"the worker refused to show the task's output: {reply.text}")
    return None


def print_line(line: Line, out: Any, err: Any, *, times: bool = False) -> None:
    """A line on stdout or stderr as the task wrote it (with its time first, if asked)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(line.at)) + f".{int(line.at % 1 * 1000):03d} " if times else ""
    target = out if line.stream == "stdout" else err
    if line.dropped:
        err.write(f"[{line.dropped} lines of output lost: the task wrote faster than this follower read]\n")
    target.write(f"{stamp}{line.text}\n")
    target.flush()
