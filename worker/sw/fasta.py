"""Reading FASTA records (plain or gzipped) for the local entry point and the jobs.

pyfastx streams the file without writing an index next to it (inputs may sit on a read-only
mount).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyfastx


class RecordNotFound(LookupError):
    """A FASTA file without the requested record (or without any record)."""


def _record_name(name: str, comment: str | None) -> str:
    """The record's identifier: the first header word; ``> cat`` (space after '>') gives 'cat'."""
    if name:
        return name
    return (comment or "").split()[0] if (comment or "").split() else ""


def _matches(wanted: str, name: str) -> bool:
    """Exact name, or one '|' field of an NCBI-style name (``NC_017366.1`` in ``gi|..|ref|NC_017366.1|``)."""
    return wanted == name or wanted in name.split("|")


def read_fasta(path: str | os.PathLike, record: str | None = None) -> tuple[str, str]:
    """(name, sequence) of the first record of a FASTA file (plain or gzipped), or of the record
    named ``record``. The sequence keeps the file's letters and case (``encode`` maps lower
    case to the same codes). Raises RecordNotFound if there is no such record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FASTA file at {path}")
    names = []
    for name, seq, comment in pyfastx.Fastx(str(path), format="fasta", comment=True):
        name = _record_name(name, comment)
        if record is None or _matches(record, name):
            return name, seq
        names.append(name)
    if record is None:
        raise RecordNotFound(f"{path}: no FASTA record in the file")
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    raise RecordNotFound(f"{path}: no record named {record!r}; records: {shown or 'none'}")
