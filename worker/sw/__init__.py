"""Smith-Waterman tile kernels (local alignment, affine gaps), exact in int16 and int32.

Public API: ``Scoring``, ``encode``, ``sw_tile`` (the tile contract), ``align`` (a whole pair
on this machine), ``kernels.load`` (compile or load a kernel build). ``python -m worker.sw``
aligns two FASTA files. Design and proofs: doc/kernels.md.
"""

from .align import Alignment, align
from .scoring import Scoring, ScoringError, SequenceError, encode
from .tile import NEG, TileResult, edge_left, edge_top, sw_tile

__all__ = ["Alignment", "NEG", "Scoring", "ScoringError", "SequenceError", "TileResult",
           "align", "edge_left", "edge_top", "encode", "sw_tile"]
