"""Source generator for the lane kernels (see doc/kernels.md).

A lane kernel computes L independent sub-tiles at once, one per SIMD lane. Their buffers are
stored lane by lane (``index = row * L + lane``) and every per-lane value is a scalar variable
of the generated source, so that LLVM's SLP vectorizer packs each group of L statements into
one ``<L x i32>`` or ``<L x i16>`` instruction. What the code must look like for that to
happen was measured, and each point is load-bearing:

- statements are grouped by operation across lanes (all loads, then each op, then all
  stores): interleaving a lane's store with the next lane's loads blocks reordering, since
  the buffers may alias;
- maxima are written as ``a if a > b else b``: numba's ``max()`` lowers to a form that the
  SLP vectorizer splits into 4+2+1+1 lane pieces (0.6-1.1 instead of 5-6 GCUPS);
- every add and sub is cast back to the lane type (numba widens int32 arithmetic to int64);
- the row-end best-cell rescan sits behind one branch for all lanes and in its own
  function: a per-lane call inside the row loop de-vectorizes the inner loop.

The inner loop is the "hgo" form: the row buffer and the carried left value hold H - GO, and
the substitution score is pre-biased by +GO, so one step is 12 vector operations.
"""

from __future__ import annotations

KERNEL_ARGS = ("rowh", "rowf", "colh", "cole", "qc", "rc", "nrows", "ncols", "corner",
               "floor", "prm", "cand", "cand_r", "cand_c", "colext")


def kernel_source(name: str, dtype: str, lanes: int) -> str:
    """Source of one lane kernel ``name`` over ``lanes`` lanes of numpy ``dtype``."""
    D = f"np.{dtype}"
    L = lanes
    out: list[str] = []

    def line(text: str, indent: int = 1) -> None:
        out.append("    " * indent + text)

    def each(fmt: str, indent: int) -> None:
        for lane in range(L):
            line(fmt.format(l=lane, i=f"cu + {lane}", r=f"ru + {lane}", D=D, L=L), indent)

    line(f"def {name}({', '.join(KERNEL_ARGS)}):", 0)
    line(f'"""{L} sub-tiles of nrows x ncols in lock-step ({dtype} lanes); see lanes.py."""')
    line(f"go = {D}(prm[0]); ge = {D}(prm[1]); sbm = {D}(prm[2]); sbx = {D}(prm[3])")
    each("dn{l} = {D}(corner[{l}] - go); fl{l} = {D}(floor[{l}]); c{l} = {D}(cand[{l}])", 1)
    each("m{l} = c{l}; mx{l} = {D}(colh[{l}]); mn{l} = mx{l}", 1)
    line("for r in range(nrows):")
    line(f"ru = r * {L}", 2)
    each("x{l} = {D}(rc[{r}])", 2)
    each("hl{l} = {D}(colh[{r}])", 2)
    each("e{l} = {D}(cole[{r}])", 2)
    each("dg{l} = dn{l}", 2)
    each("hg{l} = {D}(hl{l} - go)", 2)
    each("dn{l} = hg{l}", 2)
    line("for c in range(ncols):", 2)
    line(f"cu = c * {L}", 3)
    each("up{l} = rowh[{i}]", 3)
    each("fu{l} = rowf[{i}]", 3)
    each("q{l} = qc[{i}]", 3)
    each("fm{l} = {D}(fu{l} - ge)", 3)
    each("f{l} = up{l} if up{l} > fm{l} else fm{l}", 3)
    each("em{l} = {D}(e{l} - ge)", 3)
    each("e{l} = hg{l} if hg{l} > em{l} else em{l}", 3)
    each("h{l} = {D}(dg{l} + (sbm if q{l} == x{l} else sbx))", 3)
    each("h{l} = h{l} if h{l} > e{l} else e{l}", 3)
    each("h{l} = h{l} if h{l} > f{l} else f{l}", 3)
    each("h{l} = h{l} if h{l} > fl{l} else fl{l}", 3)
    each("m{l} = m{l} if m{l} > h{l} else h{l}", 3)
    each("dg{l} = up{l}", 3)
    each("hg{l} = {D}(h{l} - go)", 3)
    each("rowh[{i}] = hg{l}", 3)
    each("rowf[{i}] = f{l}", 3)
    each("hr{l} = {D}(hg{l} + go)", 2)
    each("colh[{r}] = hr{l}", 2)
    each("cole[{r}] = e{l}", 2)
    each("mx{l} = mx{l} if mx{l} > hr{l} else hr{l}", 2)
    each("mn{l} = mn{l} if mn{l} < hr{l} else hr{l}", 2)
    line("if " + " or ".join(f"m{lane} > c{lane}" for lane in range(L)) + ":", 2)
    each("cand[{L} + {l}] = m{l}", 3)
    line(f"rescan(rowh, cand, cand_r, cand_c, r, ncols, {L}, go)", 3)
    each("c{l} = m{l}", 3)
    each("colext[{l}] = mn{l}; colext[{L} + {l}] = mx{l}", 1)
    return "\n".join(out) + "\n"


RESCAN_SOURCE = '''
@njit(nogil=True, cache=True)
def rescan(rowh, cand, cand_r, cand_c, r, ncols, lanes, go):
    """After row r: for every lane whose running max (cand[lanes + lane]) beat its candidate
    (cand[lane]), record the row and the first column holding the new max: the first cell in
    row-major order, parasail's tie-break."""
    for lane in range(lanes):
        new = cand[lanes + lane]
        if new > cand[lane]:
            cand[lane] = new
            cand_r[lane] = r
            target = new - go
            for c in range(ncols):
                if rowh[c * lanes + lane] == target:
                    cand_c[lane] = c
                    break
'''
