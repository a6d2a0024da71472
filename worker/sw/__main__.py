"""``python -m worker.sw A.fa B.fa [--threads N] [--json]``: align two FASTA files locally.

A is the query and B the reference, in parasail's sense (its s1 and s2); the best cell follows
parasail's tie-break. ``--json`` prints one object: score, end_a, end_b (0-based positions of
the last aligned letter in A and in B), cells, seconds (the alignment itself, JIT compile or
cache load excluded), gcups, threads.
"""

from __future__ import annotations

import json
import logging
import sys

import click

from .align import align
from .fasta import RecordNotFound, read_fasta
from .scoring import Scoring, ScoringError, SequenceError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("fasta_a", type=click.Path(dir_okay=False))
@click.argument("fasta_b", type=click.Path(dir_okay=False))
@click.option("--record-a", help="Record of A to align (default: the first).")
@click.option("--record-b", help="Record of B to align (default: the first).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True)
@click.option("--match", type=int, default=2, show_default=True)
@click.option("--mismatch", type=int, default=-3, show_default=True)
@click.option("--open", "gap_open", type=int, default=5, show_default=True,
              help="Gap open penalty: a gap of length k costs open + (k-1)*extend.")
@click.option("--extend", "gap_extend", type=int, default=2, show_default=True)
@click.option("--kernel", type=click.Choice(["int16", "int32"]), default="int16",
              show_default=True, help="int16: exact int16 lanes with int32 fallback.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--log-level", default="WARNING", show_default=True)
def main(fasta_a, fasta_b, record_a, record_b, threads, match, mismatch, gap_open, gap_extend,
         kernel, as_json, log_level) -> None:
    """Exact Smith-Waterman local alignment (affine gaps) of A (query) against B (reference)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        scoring = Scoring(match, mismatch, gap_open, gap_extend)
        name_a, seq_a = read_fasta(fasta_a, record_a)
        name_b, seq_b = read_fasta(fasta_b, record_b)
        result = align(seq_a, seq_b, scoring, threads=threads, kernel=kernel)
    except (ScoringError, SequenceError, RecordNotFound, FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    out = {"score": result.score, "end_a": result.end_a, "end_b": result.end_b,
           "cells": result.cells, "seconds": round(result.seconds, 6),
           "gcups": round(result.gcups, 4), "threads": result.threads}
    if as_json:
        print(json.dumps(out))
    else:
        print(f"A {name_a} ({len(seq_a)} bp) x B {name_b} ({len(seq_b)} bp)")
        print(f"score {result.score}, ends at A[{result.end_a}] B[{result.end_b}]")
        print(f"{result.cells:,} cells in {result.seconds:.3f} s: {result.gcups:.2f} GCUPS "
              f"({threads} thread{'s' if threads > 1 else ''}, {kernel})")


if __name__ == "__main__":
    main(prog_name="python -m worker.sw")
    sys.exit(0)
