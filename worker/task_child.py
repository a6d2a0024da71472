"""The child process that runs one shipped Python callable (``python -m worker.task_child DIR``).

``worker.executor.run_callable`` writes ``DIR/call.pkl`` (cloudpickle of ``(fn, args, kwargs)``)
and starts this module in a fresh interpreter under the task's limits. It answers through files
in ``DIR``, each written under a temporary name and renamed, so a child killed mid-write never
leaves a half answer:

- ``result.pkl``: cloudpickle of the return value (exit status 0);
- ``error.txt``: one line naming what went wrong (exit status 1 when the callable raised,
  2 when the call could not be loaded or its result could not be pickled); the traceback goes
  to stderr, which the executor captures.

Any other ending (``os._exit``, a signal, the memory limit) leaves neither file; the executor
reports it from the exit status.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import cloudpickle

RAISED = 1
UNUSABLE = 2


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _fail(box: Path, status: int, what: str, exc: BaseException) -> int:
    traceback.print_exception(exc, file=sys.stderr)
    summary = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
    _write(box / "error.txt", f"{what}{summary}".encode())
    return status


def main(box: Path) -> int:
    try:
        fn, args, kwargs = cloudpickle.loads((box / "call.pkl").read_bytes())
    except BaseException as exc:  # noqa: BLE001 - any load failure is the task's, not ours
        return _fail(box, UNUSABLE, "cannot load the callable: ", exc)
    try:
        value = fn(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt are failures too
        return _fail(box, RAISED, "", exc)
    try:
        data = cloudpickle.dumps(value)
    except BaseException as exc:  # noqa: BLE001
        return _fail(box, UNUSABLE, "result cannot be pickled: ", exc)
    _write(box / "result.pkl", data)
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
