"""The persistent process of one task slot (``python -m worker.slot_child REQ_FD REP_FD [MEMORY] [--unprivileged]``).

``worker.slots.Slot`` starts this module once and sends it task after task; it serves them one
at a time until its request pipe reaches EOF. It talks over two private pipes inherited as file
descriptors ``REQ_FD`` (requests in) and ``REP_FD`` (replies out), never over stdin/stdout,
which belong to the user's code. Each message is one frame: an 8-byte little-endian length,
then a pickle of plain data (dicts of str, bytes, int, float, bool, None).

Requests: ``{"op": "call", "scratch", "function", "arguments"}`` (cloudpickle bytes of the
function, and of ``(args, kwargs)``; the result is cloudpickle bytes) or ``{"op": "tile",
"scratch", "request", "out"}`` (see worker/tiles.py; the result is the summary in MessagePack,
as the rest of the cluster's messages). Reply: ``{"ok", "status", "error", "result", "cpu_total_s", "max_rss_bytes"}``: ``status``
follows worker.task_child (0 ok, 1 raised, 2 unusable), ``cpu_total_s`` is this process's CPU
time since it started (the parent takes differences) and ``max_rss_bytes`` the task's peak.

Per task the process changes into the scratch directory and points fds 1 and 2 at
``scratch/.slot/stdout`` and ``.slot/stderr`` (dup2), so that ``print``, tracebacks and the
output of C code land in the task's files; it points them back afterwards. A map ships one
function with many argument tuples, so unpickled functions are kept in a small LRU keyed by a
hash of their bytes.

``MEMORY`` caps the address space (RLIMIT_AS) from the start: see executor._address_space_limit
for why RLIMIT_AS, and Slot for how a task's own limit is honoured.

``--unprivileged`` (a worker with ``--task-user``): the process refuses to serve, exiting with
status 2 and one line on stderr, if it runs as root or holds any capability, so that a worker
that failed to drop its own never lends them to user code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import resource
import struct
import sys
import traceback
from collections import OrderedDict

RAISED = 1
UNUSABLE = 2
FUNCTION_CACHE = 8
OUTPUT_DIR = ".slot"
UNPRIVILEGED = "--unprivileged"
_LENGTH = struct.Struct("<Q")


class _Channel:
    """Blocking frame I/O on the two pipes (the parent does the waiting and the timeouts)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self.reader = os.fdopen(read_fd, "rb", buffering=1 << 16)
        self.write_fd = write_fd

    def receive(self) -> dict | None:
        """The next request, or None at EOF (the slot is closing)."""
        header = self.reader.read(_LENGTH.size)
        if len(header) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack(header)
        body = self.reader.read(length)
        if len(body) < length:
            return None
        return pickle.loads(body)

    def send(self, message: dict) -> None:
        body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_LENGTH.pack(len(body)) + body)
        while view:
            view = view[os.write(self.write_fd, view):]


class _Redirect:
    """Fds 1 and 2 pointed at the task's output files for the length of a ``with`` block."""

    def __init__(self) -> None:
        # The slot's own stdout/stderr, restored after every task.
        self.saved = (os.dup(1), os.dup(2))

    def __enter__(self) -> _Redirect:
        _flush()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
        out = os.open(os.path.join(OUTPUT_DIR, "stdout"), flags, 0o644)
        try:
            err = os.open(os.path.join(OUTPUT_DIR, "stderr"), flags, 0o644)
        except OSError:
            os.close(out)
            raise
        for fd, target in ((out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        return self

    def __exit__(self, *exc) -> None:
        _flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)


def _flush() -> None:
    for stream in {id(s): s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__)
                   if s is not None}.values():
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a user's replacement stream must not break the slot
            pass


def _summary(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]


EXCEPTION_MAX = 64 << 10  # a raised exception travels pickled to the caller up to this size


class _Failed(Exception):
    """A task that failed: ``status``, the one line for ``Outcome.error`` and, for a callable
    that raised, the exception pickled (so the caller can raise it again, as Ray does)."""

    def __init__(self, status: int, line: str, exception: bytes | None = None) -> None:
        super().__init__(line)
        self.status = status
        self.line = line
        self.exception = exception


def _fail(status: int, what: str, exc: BaseException) -> _Failed:
    try:  # to fd 2 (the task's stderr file) even if the task replaced or closed sys.stderr
        traceback.print_exception(exc, file=sys.__stderr__)
    except Exception:  # noqa: BLE001
        pass
    pickled = None
    if status == RAISED and isinstance(exc, Exception):
        try:
            pickled = _cloudpickle().dumps(exc)
        except BaseException:  # noqa: BLE001 - an exception that does not pickle travels as its line
            pickled = None
        if pickled is not None and len(pickled) > EXCEPTION_MAX:
            pickled = None
    return _Failed(status, f"{what}{_summary(exc)}", pickled)


class Server:
    """Serves requests one at a time; keeps the unpickled functions of recent maps."""

    def __init__(self) -> None:
        self.functions: OrderedDict[bytes, object] = OrderedDict()
        self.redirect = _Redirect()
        self.tiles = None  # worker.tiles, imported on the first tile (numpy, numba are heavy)

    def serve(self, request: dict) -> dict:
        _reset_peak_rss()
        exception = None  # what a callable raised, pickled
        try:
            os.chdir(request["scratch"])
            with self.redirect:
                ok, status, error, result = True, 0, None, self._run(request)
        except _Failed as failed:
            ok, status, error, result = False, failed.status, failed.line, None
            exception = failed.exception
        except OSError as exc:  # chdir or the output files: the scratch directory is unusable
            ok, status, error, result = False, UNUSABLE, f"cannot set up the task: {exc}", None
        finally:
            os.chdir("/")  # the worker may remove the scratch directory once we reply
        return {"ok": ok, "status": status, "error": error, "result": result, "exception": exception,
                "cpu_total_s": _cpu_total(), "max_rss_bytes": _peak_rss()}

    def _run(self, request: dict) -> bytes:
        if request["op"] == "tile":
            return self._tile(request)
        if request["op"] == "trace":
            return self._trace(request)
        fn = self._function(request["function"])
        try:
            args, kwargs = pickle.loads(request["arguments"])
            args, kwargs = tuple(args), dict(kwargs)
        except BaseException as exc:  # noqa: BLE001 - any load failure is the task's
            raise _fail(UNUSABLE, "cannot load the arguments: ", exc) from None
        try:
            value = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt fail the task too
            raise _fail(RAISED, "", exc) from None
        try:
            return _cloudpickle().dumps(value)
        except BaseException as exc:  # noqa: BLE001
            raise _fail(UNUSABLE, "result cannot be pickled: ", exc) from None

    def _function(self, data: bytes):
        key = hashlib.blake2b(data, digest_size=16).digest()
        fn = self.functions.get(key)
        if fn is not None:
            self.functions.move_to_end(key)
            return fn
        try:
            fn = _cloudpickle().loads(data)
        except BaseException as exc:  # noqa: BLE001
            raise _fail(UNUSABLE, "cannot load the callable: ", exc) from None
        if not callable(fn):
            raise _Failed(UNUSABLE, f"cannot load the callable: got a {type(fn).__name__}, "
                                    "which is not callable")
        self.functions[key] = fn
        if len(self.functions) > FUNCTION_CACHE:
            self.functions.popitem(last=False)
        return fn

    def _trace(self, request: dict) -> bytes:
        # lazy, as tiles below: a slot that only runs callables and commands never loads numba
        from worker import trace_tasks

        try:
            summary = trace_tasks.run_trace(request["request"], request["out"])
        except trace_tasks.TraceTaskError as exc:
            print(f"trace task refused: {exc}", file=sys.stderr)
            raise _Failed(RAISED, str(exc)) from None
        except BaseException as exc:  # noqa: BLE001
            raise _fail(RAISED, "", exc) from None
        import msgspec

        return msgspec.msgpack.encode(summary)

    def _tile(self, request: dict) -> bytes:
        if self.tiles is None:
            # lazy: the tile kernels load numba (and compile or load their build) on first use
            from worker import tiles

            self.tiles = tiles
        try:
            summary = self.tiles.run_tile(request["request"], request["out"])
        except self.tiles.TileError as exc:  # a bad request: its message is the whole story
            print(f"tile request refused: {exc}", file=sys.stderr)
            raise _Failed(RAISED, str(exc)) from None
        except BaseException as exc:  # noqa: BLE001
            raise _fail(RAISED, "", exc) from None
        import msgspec

        return msgspec.msgpack.encode(summary)


def _cloudpickle():
    import cloudpickle

    return cloudpickle


def _cpu_total() -> float:
    """CPU seconds of this process and the children it waited for, since it started."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _reset_peak_rss() -> None:
    """Start a new peak resident set for this task (Linux: clear_refs 5 resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "wb", buffering=0) as f:
            f.write(b"5")
    except OSError:
        pass  # elsewhere the peak stays the slot's since it started


def _peak_rss() -> int:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) * 1024  # Linux reports KiB


def _privileges() -> str | None:
    """What this process holds that a task must not: root, or any capability."""
    if os.geteuid() == 0 or os.getuid() == 0:
        return "it runs as root"
    with open("/proc/self/status") as f:
        held = [line.split(":")[0] for line in f
                if line.startswith(("CapInh:", "CapPrm:", "CapEff:", "CapAmb:")) and int(line.split(":")[1], 16)]
    return f"it holds capabilities ({', '.join(held)})" if held else None


def main(argv: list[str]) -> int:
    if UNPRIVILEGED in argv:
        argv = [a for a in argv if a != UNPRIVILEGED]
        problem = _privileges()
        if problem:
            print(f"slot process {os.getpid()} refuses to run tasks: {problem}", file=sys.stderr)
            return UNUSABLE
    read_fd, write_fd = int(argv[0]), int(argv[1])
    if len(argv) > 2:
        limit = int(argv[2])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Our pipes must not leak into what user code starts (subprocess with close_fds=False, exec).
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    _cloudpickle()  # imported now, not inside the first task's clock and output files
    channel = _Channel(read_fd, write_fd)
    server = Server()
    while (request := channel.receive()) is not None:
        channel.send(server.serve(request))
    return 0


if __name__ == "__main__":
    status = main(sys.argv[1:])
    _flush()
    # Not sys.exit: a thread some task left running must not keep a closing slot alive.
    os._exit(status)
