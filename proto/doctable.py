"""Renders the message table of doc/protocol.md from the catalogue, so the doc cannot drift.

``python -m proto.doctable`` rewrites the table between its markers; ``--check`` exits 1 when
the committed doc differs (``make test`` runs it).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from proto.codec import SPECS, MessageSpec

DOC = Path(__file__).resolve().parents[1] / "doc" / "protocol.md"
BEGIN, END = "<!-- catalogue:begin -->", "<!-- catalogue:end -->"


def _type_name(hint: object) -> str:
    text = str(hint).replace("typing.", "")
    if "PayloadMarker" in text:
        return "payload"
    return getattr(hint, "__name__", text) if not typing.get_args(hint) else text


def _row(spec: MessageSpec) -> str:
    hints = typing.get_type_hints(spec.cls, include_extras=True)
    header = ", ".join(f"{c.c_name} {n}" for n, c in spec.header_fields) or "—"
    fields = {f.name: f for f in __import__("msgspec").structs.fields(spec.cls)}
    body = ", ".join(
        f"{n}: {_type_name(hints[n])}" + ("" if fields[n].required else " = default") for n in spec.body_fields
    ) or "—"
    doc = (spec.cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    doc = " ".join(doc.split())
    return (
        f"| {spec.code} | {spec.name} | `{spec.cls.struct_name}` ({spec.header_length} B): {header} "
        f"| {body} | {spec.cls.sender} → {spec.cls.receiver} | {doc} |"
    )


def render() -> str:
    """The markdown table of every message type."""
    lines = [
        "| code | name | packed header (generic 28 B + specific) | body (MessagePack array, in order) | who → whom | meaning |",
        "|---:|---|---|---|---|---|",
    ]
    lines += [_row(s) for s in sorted(SPECS, key=lambda s: s.code)]
    return "\n".join(lines)


def updated(text: str) -> str:
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = updated(text)
    if "--check" in argv:
        if new != text:
            print("doc/protocol.md's message table is out of date: run `python -m proto.doctable`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
