"""proto/cluster_proto.h against the Python codec: layout, and headers decoded byte for byte both ways.

A C program is generated from the catalogue, compiled against the committed header with gcc and
run in three modes: ``layout`` (sizeof/offsetof of every field), ``decode FILE`` (headers packed
by ``proto.codec.Codec``, read through the structs, every field printed) and ``encode FILE``
(every struct filled in C and written raw, unpacked here with ``spec.struct``).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest

from proto import cheader
from proto.codec import (
    GENERIC_FIELDS,
    GENERIC_SIZE,
    GENERIC_STRUCT,
    MAGIC,
    PROTOCOL_VERSION,
    SPECS,
    Codec,
    MessageSpec,
)
from proto.messages import Credit, MessageBatch, WorkerRequest
from proto.types import Message, PayloadMarker

GCC = shutil.which("gcc")
NO_GCC = "gcc is not installed (`make test` installs it: deploy/system-packages.sh)"
needs_gcc = pytest.mark.skipif(GCC is None, reason=NO_GCC)
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-O2"]

GENERIC_CODES = GENERIC_STRUCT.format.lstrip("<")  # HBBQQQ
NODE_ID = 0x0123456789ABCDEF_F0E1D2C3B4A59687


# ---- what Python says ----------------------------------------------------------------------------


def struct_name(spec: MessageSpec | None) -> str:
    return "cluster_generic_message" if spec is None else f"cluster_{spec.cls.struct_name}"


def fields(spec: MessageSpec | None) -> list[tuple[str, str]]:
    """(C member designator, struct code) of every field of a struct, generic header first."""
    generic = [(name, code) for (name, _), code in zip(GENERIC_FIELDS, GENERIC_CODES)]
    if spec is None:
        return generic
    return [(f"generic.{n}", c) for n, c in generic] + [(n, ct.struct_code) for n, ct in spec.header_fields]


def layout(spec: MessageSpec | None) -> dict[str, tuple[int, int]]:
    """Field -> (offset, size) as the packed little-endian struct format has it."""
    out, offset = {}, 0
    for name, code in fields(spec):
        size = struct.calcsize("<" + code)
        out[name] = (offset, size)
        offset += size
    return out


def distinctive(code: str, seed: int) -> int | float:
    """A value of a field's type whose bytes all differ, and differ from other seeds'."""
    if code == "d":
        return -(seed + 1) / 7.0
    size = struct.calcsize("<" + code)
    raw = bytes((seed * 37 + 0x11 * i + 1) & 0xFF for i in range(size))
    return int.from_bytes(raw, "little", signed=code.islower())


def body_value(hint: Any) -> Any:
    """A sensible value of a body field's annotated type."""
    if any(isinstance(m, PayloadMarker) for m in getattr(hint, "__metadata__", ())):
        return b"payload bytes"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return [body_value(args[0])]
    if origin is dict:
        return {"key": 1}
    if args:  # a union such as str | None: its first non-None member
        return body_value(next(a for a in args if a is not type(None)))
    return {str: "text", bytes: bytes(range(16)), int: 7, float: 0.5, bool: True}.get(hint, 1)


def sample(spec: MessageSpec, seed: int) -> tuple[Message, dict[str, Any]]:
    """A valid message of the type with distinctive header values, and those values."""
    hints = typing.get_type_hints(spec.cls, include_extras=True)
    header = {name: distinctive(ct.struct_code, seed + i) for i, (name, ct) in enumerate(spec.header_fields)}
    body = {name: body_value(hints[name]) for name in spec.body_fields}
    if spec.cls is WorkerRequest:  # its lengths must agree with its body
        header.update(program_length=0x0203, num_input_files=3)
        body.update(program=bytes(0x0203), input_files=[bytes([i]) * 16 for i in range(3)])
    if spec.cls is MessageBatch:  # its count must agree with its items
        header.update(count=3)
        body.update(items=Codec(seed).encode_items([Credit(i, 1, 0) for i in range(3)]))
    return spec.cls(**header, **body), header


def expected_generic(spec: MessageSpec, node_id: int) -> dict[str, int]:
    return {
        "generic.magic": MAGIC,
        "generic.version": PROTOCOL_VERSION,
        "generic.message_type": spec.code,
        "generic.node_uuid_upper": node_id >> 64,
        "generic.node_uuid_lower": node_id & (2**64 - 1),
        "generic.header_length": spec.header_length,
    }


# ---- the C program -------------------------------------------------------------------------------


def c_literal(code: str, value: int | float) -> str:
    if code == "d":
        return float(value).hex()
    return f"INT64_C({value})" if code.islower() else f"UINT64_C({value})"


def c_print(struct: str, var: str, name: str, code: str) -> str:
    if code == "d":
        fmt, cast = "%a", "(double)"
    elif code.islower():
        fmt, cast = "%lld", "(long long)"
    else:
        fmt, cast = "%llu", "(unsigned long long)"
    return f'    printf("value {struct} {name} {fmt}\\n", {cast}{var}->{name});'


def c_source() -> str:
    """The C program's source, generated from the catalogue."""
    lay, dec, enc = [], [], []
    for spec in (None, *SPECS):
        s = struct_name(spec)
        lay.append(f'    printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for name, _ in fields(spec):
            where = f"offsetof(struct {s}, {name}), sizeof(((struct {s} *)0)->{name})"
            lay.append(f'    printf("field {s} {name} %zu %zu\\n", {where});')
    lay.append('    printf("const CLUSTER_PROTO_MAGIC %u\\n", CLUSTER_PROTO_MAGIC);')
    lay.append('    printf("const CLUSTER_PROTO_VERSION %u\\n", CLUSTER_PROTO_VERSION);')
    lay.append('    printf("const CLUSTER_GENERIC_HEADER_SIZE %u\\n", CLUSTER_GENERIC_HEADER_SIZE);')
    for spec in SPECS:
        lay.append(f'    printf("const CLUSTER_MSG_{spec.name} %d\\n", (int)CLUSTER_MSG_{spec.name});')
        lay.append(f'    printf("const CLUSTER_{spec.name}_HEADER_LENGTH %u\\n", CLUSTER_{spec.name}_HEADER_LENGTH);')

    for k, spec in enumerate(SPECS):
        s = struct_name(spec)
        dec += [
            "    {",
            f"        const struct {s} *m = (const struct {s} *)(buf + off);",
            *("    " + c_print(s, "m", name, code) for name, code in fields(spec)),
            f"        off += sizeof(struct {s});",
            "    }",
        ]
        values = c_encoded_values(spec, k)
        enc += [
            "    {",
            f"        struct {s} m;",
            "        memset(&m, 0, sizeof m);",
            "        m.generic.magic = CLUSTER_PROTO_MAGIC;",
            "        m.generic.version = CLUSTER_PROTO_VERSION;",
            f"        m.generic.message_type = CLUSTER_MSG_{spec.name};",
            f"        m.generic.node_uuid_upper = UINT64_C({values['generic.node_uuid_upper']});",
            f"        m.generic.node_uuid_lower = UINT64_C({values['generic.node_uuid_lower']});",
            f"        m.generic.header_length = CLUSTER_{spec.name}_HEADER_LENGTH;",
            *(f"        m.{n} = {c_literal(ct.struct_code, values[n])};" for n, ct in spec.header_fields),
            "        if (fwrite(&m, sizeof m, 1, f) != 1) return 3;",
            "    }",
        ]
    total = sum(s.header_length for s in SPECS)
    nl = "\n"
    return f"""\
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cluster_proto.h"

static int layout(void) {{
{nl.join(lay)}
    return 0;
}}

static int decode(const char *path) {{
    FILE *f = fopen(path, "rb");
    if (!f) return 2;
    unsigned char *buf = malloc({total});
    if (!buf) return 2;
    size_t n = fread(buf, 1, {total}, f);
    int extra = fgetc(f);
    fclose(f);
    if (n != {total} || extra != EOF) {{ fprintf(stderr, "read %zu bytes, want {total}\\n", n); return 2; }}
    size_t off = 0;
{nl.join(dec)}
    free(buf);
    return 0;
}}

static int encode(const char *path) {{
    FILE *f = fopen(path, "wb");
    if (!f) return 2;
{nl.join(enc)}
    return fclose(f) == 0 ? 0 : 3;
}}

int main(int argc, char **argv) {{
    if (argc == 2 && strcmp(argv[1], "layout") == 0) return layout();
    if (argc == 3 && strcmp(argv[1], "decode") == 0) return decode(argv[2]);
    if (argc == 3 && strcmp(argv[1], "encode") == 0) return encode(argv[2]);
    fprintf(stderr, "usage: %s layout | decode FILE | encode FILE\\n", argv[0]);
    return 1;
}}
"""


def c_encoded_values(spec: MessageSpec, k: int) -> dict[str, Any]:
    """What the C program's ``encode`` writes into the k-th message struct (besides the constants)."""
    node_id = NODE_ID ^ (k + 1) * 0x0101_0101_0101_0101_0101_0101_0101_0101
    values: dict[str, Any] = expected_generic(spec, node_id)
    for i, (name, ct) in enumerate(spec.header_fields):
        values[name] = distinctive(ct.struct_code, 1000 + 16 * k + i)
    return values


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The C program, compiled against the committed header."""
    if GCC is None:
        pytest.skip(NO_GCC)
    work = tmp_path_factory.mktemp("c")
    src = work / "check_header.c"
    src.write_text(c_source())
    exe = work / "check_header"
    done = subprocess.run([GCC, *CFLAGS, "-I", str(cheader.HEADER_PATH.parent), str(src), "-o", str(exe)],
                          capture_output=True, text=True)
    assert done.returncode == 0, f"gcc failed:\n{done.stderr}"
    return exe


def run(program: Path, *args: str) -> list[list[str]]:
    done = subprocess.run([str(program), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{program.name} {' '.join(args)} exited {done.returncode}: {done.stderr}"
    return [line.split() for line in done.stdout.splitlines()]


# ---- the tests -----------------------------------------------------------------------------------


def test_committed_header_is_current() -> None:
    assert cheader.HEADER_PATH.read_text(encoding="utf-8") == cheader.render(), (
        "proto/cluster_proto.h is stale: regenerate it with `python -m proto.cheader`"
    )


def test_check_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(cheader, "HEADER_PATH", tmp_path / "cluster_proto.h")
    assert cheader.main(["--check"]) == 1  # missing
    assert cheader.main([]) == 0
    assert cheader.main(["--check"]) == 0
    (tmp_path / "cluster_proto.h").write_text(cheader.render().replace("uint8_t", "uint16_t", 1))
    assert cheader.main(["--check"]) == 1
    assert "python -m proto.cheader" in capsys.readouterr().err


def test_generic_offsets_are_the_seeds() -> None:
    assert [off for off, _ in layout(None).values()] == [0, 2, 3, 4, 12, 20]
    assert GENERIC_SIZE == 28


@needs_gcc
def test_layout_matches_python(program: Path) -> None:
    sizes, got, consts = {}, {}, {}
    for line in run(program, "layout"):
        if line[0] == "sizeof":
            sizes[line[1]] = int(line[2])
        elif line[0] == "field":
            got[line[1], line[2]] = (int(line[3]), int(line[4]))
        else:
            consts[line[1]] = int(line[2])
    for spec in (None, *SPECS):
        s = struct_name(spec)
        assert sizes[s] == (GENERIC_SIZE if spec is None else spec.header_length), s
        assert sizes[s] == struct.calcsize(GENERIC_STRUCT.format if spec is None else spec.struct.format), s
        for name, where in layout(spec).items():
            assert got.pop((s, name)) == where, f"{s}.{name}: (offset, size) C vs Python"
    assert not got, f"C printed fields Python does not know: {sorted(got)}"
    want = {
        "CLUSTER_PROTO_MAGIC": MAGIC,
        "CLUSTER_PROTO_VERSION": PROTOCOL_VERSION,
        "CLUSTER_GENERIC_HEADER_SIZE": GENERIC_SIZE,
    }
    for spec in SPECS:
        want[f"CLUSTER_MSG_{spec.name}"] = spec.code
        want[f"CLUSTER_{spec.name}_HEADER_LENGTH"] = spec.header_length
    assert consts == want


@needs_gcc
def test_c_reads_what_python_writes(program: Path, tmp_path: Path) -> None:
    blob, want = bytearray(), {}
    for k, spec in enumerate(SPECS):
        message, header = sample(spec, seed=16 * k)
        node_id = NODE_ID + k
        frames = Codec(node_id).encode(message)
        assert len(frames) == 1
        blob += frames[0][: spec.header_length]
        s = struct_name(spec)
        for name, value in {**expected_generic(spec, node_id), **header}.items():
            want[s, name] = value
    path = tmp_path / "from_python.bin"
    path.write_bytes(bytes(blob))
    got = {}
    for _, s, name, text in run(program, "decode", str(path)):
        got[s, name] = float.fromhex(text) if "p" in text else int(text)
    assert got == want


@needs_gcc
def test_python_reads_what_c_writes(program: Path, tmp_path: Path) -> None:
    path = tmp_path / "from_c.bin"
    run(program, "encode", str(path))
    blob = path.read_bytes()
    assert len(blob) == sum(s.header_length for s in SPECS)
    offset = 0
    for k, spec in enumerate(SPECS):
        word, upper, lower, header_length, *values = spec.struct.unpack_from(blob, offset)
        want = c_encoded_values(spec, k)
        assert word == spec.word, f"{spec.name}: magic/version/type word {word:#x}, want {spec.word:#x}"
        assert (upper, lower, header_length) == (
            want["generic.node_uuid_upper"], want["generic.node_uuid_lower"], spec.header_length
        ), spec.name
        assert values == [want[name] for name, _ in spec.header_fields], spec.name
        if spec.body_decoder is None:  # a complete message: the codec accepts it as is
            sender, message = Codec(0).decode([blob[offset : offset + spec.header_length]])
            assert sender == upper << 64 | lower
            assert [getattr(message, n) for n, _ in spec.header_fields] == values
        offset += spec.header_length


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")
def test_header_compiles_as_cxx(tmp_path: Path) -> None:
    src = tmp_path / "use.cpp"
    src.write_text('#include "cluster_proto.h"\nint main() { return CLUSTER_MSG_HEARTBEAT; }\n')
    done = subprocess.run(["g++", "-std=c++11", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                           "-I", str(cheader.HEADER_PATH.parent), str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
