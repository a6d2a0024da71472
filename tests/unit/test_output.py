"""worker/output.py and the worker core's OUTPUT_FOLLOW: a task's output as timed lines, bounded,
read by cursor, to its owner only."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cluster.node.events import Forbidden, MessageReceived, Peer, Send
from proto.ids import split128
from proto.messages import OutputFollow, OutputLines
from worker import output
from worker.core import ENDED, NOT_HERE, RUNNING, OutputRead
from worker.output import Outputs, Ring

from .test_worker_core import JOB, registered


def test_chunks_become_numbered_timed_lines_and_a_partial_line_waits_for_its_end():
    ring = Ring("alice")
    ring.feed(1, b"line 1\nline", 10.0)
    ring.feed(2, b"oops\n", 10.5)
    ring.feed(1, b" 2\n", 11.0)
    lines, nxt, dropped = ring.read(0)
    assert lines == [[1, 10.0, 1, "line 1"], [2, 10.5, 2, "oops"], [3, 11.0, 1, "line 2"]] and (nxt, dropped) == (3, 0)
    ring.feed(1, b"no newline", 12.0)
    assert ring.read(3)[0] == []
    ring.end(13.0)
    assert ring.read(3)[0] == [[4, 13.0, 1, "no newline"]] and ring.ended


def test_a_chatty_task_costs_a_bounded_ring_and_a_slow_follower_learns_what_it_lost():
    ring = Ring("alice")
    for i in range(output.LINES_KEPT + 500):
        ring.feed(1, f"{i}\n".encode(), float(i))
    assert len(ring.lines) == output.LINES_KEPT and ring.dropped == 500
    lines, _, dropped = ring.read(0)
    assert dropped == 500 and lines[0][3] == "500"
    huge = Ring("a")
    huge.feed(1, b"x" * (3 * output.LINE_MAX) + b"\n", 1.0)
    assert [len(t) for *_, t in huge.read(0)[0]] == [output.LINE_MAX] * 3
    big = Ring("a")
    for _ in range(40):
        big.feed(1, b"y" * 60_000 + b"\n", 1.0)
    assert big.size <= output.BYTES_KEPT


@given(st.lists(st.binary(max_size=200), max_size=40), st.integers(1, 20_000))
def test_reading_page_by_page_gives_every_line_once_in_order(chunks, page):
    ring = Ring("a")
    for i, chunk in enumerate(chunks):
        ring.feed(1 + i % 2, chunk, float(i))
    ring.end(99.0)
    seen, after = [], 0
    while True:
        lines, after, _ = ring.read(after, page)
        if not lines:
            break
        seen += [seq for seq, *_ in lines]
    assert seen == list(range(1, ring.next_seq))


def test_ended_rings_are_kept_for_late_followers_within_a_bound():
    outputs = Outputs()
    for t in range(output.ENDED_KEPT + 3):
        outputs.start((JOB, t), "alice")
        outputs.feed((JOB, t), 1, b"hi\n", 1.0)
        outputs.end((JOB, t), 2.0)
    assert outputs.find((JOB, 0)) is None and outputs.find((JOB, output.ENDED_KEPT + 2)).ended
    assert len(outputs.ended) == output.ENDED_KEPT


def follow(h, peer: Peer, task: int = 1, after: int = 0):
    up, lo = split128(JOB)
    return h.event(MessageReceived("control", b"r", 1, OutputFollow(9, up, lo, task, after), "m", peer))


def test_the_worker_serves_a_running_tasks_lines_to_its_owner_only():
    h = registered()
    h.request(1, fence=(5, 1))
    h.core.outputs.running[(JOB, 1)].owner = "alice"  # as the master's order names it (arguments["owner"])
    h.event(OutputRead(JOB, 1, 1, b"hello\n", 50.0))
    (sent,) = follow(h, Peer("alice", "client"))
    assert isinstance(sent, Send) and sent.message == OutputLines(9, 1, 0, RUNNING, [[1, 50.0, 1, "hello"]])
    (refused,) = follow(h, Peer("mallory", "client"))
    assert isinstance(refused, Forbidden) and refused.reply.detail["code"] == "not_owner"
    (sent,) = follow(h, Peer("ops", "operator"))
    assert sent.message.lines == [[1, 50.0, 1, "hello"]]
    (forbidden,) = follow(h, Peer("w9", "worker"))
    assert isinstance(forbidden, Forbidden)
    (elsewhere,) = follow(h, Peer("alice", "client"), task=7)
    assert elsewhere.message.status == NOT_HERE


def test_an_ended_tasks_follower_gets_the_end_and_is_told_so():
    from worker.core import TaskEnded

    h = registered()
    h.request(1, fence=(5, 1))
    h.event(OutputRead(JOB, 1, 1, b"last words", 50.0))
    h.event(TaskEnded(JOB, 1, (5, 1), 0, 0, {}, None, None, [], (), "e"))
    (sent,) = follow(h, Peer("ops", "operator"))
    assert sent.message.status == ENDED and sent.message.lines[0][3] == "last words"
