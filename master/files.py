"""The ledger's file table: which stored files exist, where their replicas are, who refers to them.

Theory of operation
-------------------
A file is kept while something refers to it: a job (its outputs, named ``task-<id>.<name>``
in the job's listing) or a user's pin (owner ``PIN``). ``LedgerState.files`` holds each file's
size, replicas and references (owner → name); ``LedgerState.named`` is the same references
indexed the other way (owner → name → file id), so a job's listing is one lookup. The two
always agree (``validate``). A file whose last reference goes is dropped from the table, and
the storage nodes collect it.

Every registration is checked whole (``refusal``) before anything changes (``store``), so a
completion that registers many files registers all of them or none. Functions over
``master.state.LedgerState``; the ledger (``master.ledger``) calls them while applying the log.
"""

from __future__ import annotations

from typing import Any

from master.commands import CompleteTask, DropFile, RegisterFile, ReleaseFile
from master.state import (
    INT64_MAX,
    MAX_NAME,
    MAX_TASK_FILES,
    PIN,
    PIN_PREFIX,
    is_pin,
    Applied,
    FileRecord,
    Job,
    LedgerState,
    count,
    refused,
)

# ---- the commands ---------------------------------------------------------------------------


def register(state: LedgerState, c: RegisterFile) -> Applied:
    """REGISTER_FILE: a file stored, pinned or named by a job, or more replicas of one."""
    problem = refusal(state, c)
    if problem is not None:
        return problem
    record = store(state, c)
    return Applied(True, value={"file": c.file_id, "replicas": record.replicas})


def refusal(state: LedgerState, c: RegisterFile) -> Applied | None:
    """Why ``c`` cannot apply, or None: every check of a registration, before any change
    (a completion checks all its files with this before it registers one)."""
    if len(c.file_id) != 16:
        return refused("bad_file_id", "a file id is 16 bytes")
    if not c.replicas:
        return refused("no_replicas", f"file {c.file_id.hex()} has no replica")
    record = state.files.get(c.file_id)
    if record is not None and record.size != c.size:
        return refused("size_mismatch", f"file {c.file_id.hex()} is {record.size} bytes, not {c.size}")
    owner = PIN if c.owner is None else c.owner
    name = c.name or c.file_id.hex()
    if c.add_ref:
        if c.owner is not None and not is_pin(c.owner) and c.owner not in state.jobs:
            return refused("unknown_job", f"no job {c.owner.hex()} to own file {c.file_id.hex()}")
        problem = _name_problem(name)
        if problem:
            return refused("bad_name", f"file name {name!r} {problem}")
        taken = state.named.get(owner, {}).get(name)
        if taken is not None and taken != c.file_id:
            return refused("name_taken", f"{_owner_text(owner)} already has a file named {name!r} ({taken.hex()})")
    elif record is None:
        return refused("unknown_file", f"no file {c.file_id.hex()} to add replicas to (it was released or never registered)")
    return None


def store(state: LedgerState, c: RegisterFile) -> FileRecord:
    """Record ``c`` (already checked by ``refusal``): the file, its replicas, its reference."""
    record = state.files.get(c.file_id)
    if record is None:
        record = state.files[c.file_id] = FileRecord(c.size, sorted(set(c.replicas)), c.now)
    else:
        record.replicas = sorted(set(record.replicas) | set(c.replicas))
    if c.add_ref:
        owner = PIN if c.owner is None else c.owner
        name = c.name or c.file_id.hex()
        old = record.refs.get(owner)
        if old is not None and old != name:
            del state.named[owner][old]
        record.refs[owner] = name
        state.named.setdefault(owner, {})[name] = c.file_id
    return record


def release(state: LedgerState, c: ReleaseFile) -> Applied:
    """RELEASE_FILE: an owner lets go of one file, or of all it refers to."""
    owner = PIN if c.owner is None else c.owner
    if c.file_id is None:
        if c.owner is None or is_pin(c.owner):
            return refused("bad_release", "release every file of whom? name a job (or a file id)")
        targets = list(state.named.get(owner, {}).values())
    else:
        record = state.files.get(c.file_id)
        if record is None:
            return refused("unknown_file", f"no file {c.file_id.hex()}")
        if owner not in record.refs:
            return refused("not_referenced", f"{_owner_text(owner)} does not refer to file {c.file_id.hex()}")
        targets = [c.file_id]
    dropped = []
    for file_id in targets:
        record = state.files[file_id]
        unname(state, owner, record.refs.pop(owner))
        if not record.refs:
            del state.files[file_id]
            dropped.append(file_id)
    return Applied(True, value={"released": len(targets), "dropped": dropped})


def drop(state: LedgerState, c: DropFile) -> Applied:
    """DROP_FILE: the file is gone (every replica lost): forget it and every reference."""
    record = state.files.pop(c.file_id, None)
    if record is None:
        return refused("unknown_file", f"no file {c.file_id.hex()}")
    for owner, name in record.refs.items():
        unname(state, owner, name)
    return Applied(True, value={"released": len(record.refs), "dropped": [c.file_id]})


def unname(state: LedgerState, owner: bytes, name: str) -> None:
    names = state.named[owner]
    del names[name]
    if not names:
        del state.named[owner]


# ---- a task's files -------------------------------------------------------------------------


def task_files(state: LedgerState, job: Job, c: CompleteTask) -> tuple[list[RegisterFile], Applied | None]:
    """The registrations that recording ``c`` makes, every one checked; or the refusal.
    Each listed file is named ``task-<id>.<name>`` in the job's listing; a result file the
    ledger already knows is referenced too, as ``task-<id>.result``, unless listed."""
    out = [
        RegisterFile(file_id, size, list(replicas), job.job_id, c.now, task_file_name(c.task_id, name or file_id.hex()))
        for file_id, size, replicas, name in c.files
    ]
    known = state.files.get(c.result_file) if c.result_file is not None else None
    listed = {entry[0] for entry in c.files}
    if known is not None and c.result_file not in listed and job.job_id not in known.refs:
        out.append(RegisterFile(c.result_file, known.size, list(known.replicas), job.job_id, c.now,
                                task_file_name(c.task_id, "result")))
    for command in out:
        problem = refusal(state, command)
        if problem is not None:
            return [], refused(problem.code, f"task {c.task_id}'s files: {problem.text}")
    return out, None


def store_task_files(state: LedgerState, commands: list[RegisterFile]) -> None:
    """Register what ``task_files`` checked."""
    for command in commands:
        store(state, command)
    if commands:
        count(state, "task_files_registered", len(commands))


def release_task_files(state: LedgerState, job: Job, task_id: int) -> None:
    """A folded task's stored outputs (a tile's boundary) have been read by every task that
    needed them: the job lets go of them, and the storage nodes collect those nothing else
    refers to. A wavefront job so keeps O(frontier) files, not one per tile."""
    names = state.named.get(job.job_id)
    if not names:
        return
    prefix = f"task-{task_id}."
    kept = {prefix + n for n in job.spec.get("keep_files", ())}
    for name in [n for n in names if n.startswith(prefix) and n not in kept]:
        file_id = names[name]
        unname(state, job.job_id, name)
        record = state.files.get(file_id)
        if record is not None:
            record.refs.pop(job.job_id, None)
            if not record.refs:
                del state.files[file_id]
        count(state, "files_released_on_fold")


def task_file_name(task_id: int, name: str) -> str:
    """A task's file's name in its job's listing: one path component, unique per task."""
    return f"task-{task_id}.{name}"


def task_files_problem(files: Any, task_id: int, result_file: bytes | None) -> str | None:
    """What is wrong with a completion's ``files``, or None. Each entry is ``[file id (16 bytes),
    size (0 .. 2**63 - 1), [storage node names, at least one], name]``; ids and names are unique
    and ``result`` is kept for the result file unless that is listed. Needs no state: the core
    runs it on TASK_RESULT before proposing, the ledger again on apply."""
    if not isinstance(files, (list, tuple)):
        return "'files' must be a list of [file id, size, replicas, name]"
    if len(files) > MAX_TASK_FILES:
        return f"{len(files)} files; one task registers at most {MAX_TASK_FILES}"
    ids: set[bytes] = set()
    names: set[str] = set()
    for i, entry in enumerate(files):
        problem = _entry_problem(i, entry, task_id)
        if problem:
            return problem
        file_id, name = entry[0], entry[3] or entry[0].hex()
        if file_id in ids:
            return f"file {i} ({file_id.hex()}) is listed twice"
        if name in names:
            return f"file {i} ({file_id.hex()}): two files are named {name!r}"
        ids.add(file_id)
        names.add(name)
    if "result" in names and result_file is not None and result_file not in ids:
        return "the name 'result' is kept for the task's result file (list the result file to give it that name)"
    return None


def _entry_problem(i: int, entry: Any, task_id: int) -> str | None:
    """What is wrong with entry ``i`` of a completion's ``files`` on its own, or None."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 4:
        return f"file {i} must be [file id, size, replicas, name], not {entry!r:.80}"
    file_id, size, replicas, name = entry
    if not isinstance(file_id, bytes) or len(file_id) != 16:
        return f"file {i}: a file id is 16 bytes, not {file_id!r:.40}"
    what = f"file {i} ({file_id.hex()})"
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= INT64_MAX:
        return f"{what}: the size must be an integer from 0 to 2**63 - 1, not {size!r:.40}"
    if not isinstance(replicas, (list, tuple)) or not replicas or not all(isinstance(r, str) and r for r in replicas):
        return f"{what}: replicas must be a non-empty list of storage node names, not {replicas!r:.80}"
    if not isinstance(name, str):
        return f"{what}: the name must be a string, not {name!r:.40}"
    name = name or file_id.hex()
    problem = _name_problem(name) or _name_problem(task_file_name(task_id, name))
    if problem:
        return f"{what}: the name {name!r:.80} (as {task_file_name(task_id, name)!r:.80}) {problem}"
    return None


# ---- invariants -----------------------------------------------------------------------------


def validate(state: LedgerState) -> None:
    """Raise AssertionError unless every file is referenced and the two indexes agree."""
    for file_id, record in state.files.items():
        assert record.refs, f"file {file_id.hex()} has no reference left"
        assert record.replicas == sorted(set(record.replicas)) and record.replicas
        for owner, name in record.refs.items():
            assert state.named[owner][name] == file_id, f"file {file_id.hex()} missing from {owner.hex()}'s names"
    for owner, names in state.named.items():
        assert names, f"empty name table for {owner.hex()}"
        for name, file_id in names.items():
            assert state.files[file_id].refs[owner] == name


def _name_problem(name: str) -> str | None:
    if "/" in name or "\0" in name:
        return "has a '/' or NUL: names are single path components"
    if name in (".", ".."):
        return "is reserved"
    if len(name.encode()) > MAX_NAME:
        return f"is over {MAX_NAME} bytes"
    return None


def _owner_text(owner: bytes) -> str:
    if owner == PIN:
        return "the user pin"
    if is_pin(owner):
        return f"the pin of {owner[len(PIN_PREFIX):].decode(errors='replace')}"
    return f"job {owner.hex()}"
