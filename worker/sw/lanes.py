"""The band driver: one rectangle of the DP matrix through the lane kernels.

Theory of operation. A rectangle of ``nbands * hb`` rows by ``nblocks * wb`` columns is cut into
row bands of ``hb`` rows, each swept left to right in column blocks of ``wb``. Lane ``l`` takes
bands ``l, l + L, l + 2L, ...``: band k starts one step after band k - 1 (it needs that band's
bottom row for the same block) and a lane starts its next band as soon as it is free, so the
skewed ramp is paid once per rectangle, not once per band. One shared boundary row
(``bnd_h``/``bnd_f``) holds for every column the bottom row of the latest band that passed
it: band k reads block j from it and writes its own bottom row back in the same step, just
before band k + 1 needs it. Each lane carries its band's current column (H and E) from block
to block in canonical int32. The corner of block j + 1 is the top row's value at the last
column of block j, saved before it is overwritten; the corner of block 0 travels in
``bnd_h[0]``, which ends as the rectangle's bottom-left corner, as the tile contract wants.

Every step, each active lane's inputs are bounded (min and max of H in, max of E/F in). The
int16 build runs the step in the int16 kernel when the bounds prove it exact, plainly (base 0,
floor 0) or rebased (a base subtracted, the floor provably inactive), and otherwise runs the
whole step in the int32 kernel. E and F inputs are clamped at (min H in) - GO, which changes
no H and no E/F output. doc/kernels.md has the proofs.

This file is not imported: kernels.py appends it to the generated kernel source, which defines
LANES, DT, NARROW, KERNEL and, for the int16 build, KERNEL32 and LANES32, and compiles the
module with the SLP vectorizer on.
"""

import numpy as np
from numba import njit

I16_MIN = -32768
I16_MAX = 32767
I32_MIN = -(2**31)
I32_MAX = 2**31 - 1


@njit(nogil=True, cache=True)
def better(score, row, col, best):
    """Whether (score, row, col) beats best = [score, row, col]: a higher score, then the
    smaller reference row, then the smaller query column (parasail's rule)."""
    if score != best[0]:
        return score > best[0]
    if row != best[1]:
        return row < best[1]
    return col < best[2]


@njit(nogil=True, cache=True)
def fill(lane, kl, stride, j, wb, hb, base, clampv, corner_in, a, b, r0, bnd_h, bnd_f,
         lcol_h, lcol_e, L, go, rowh, rowf, qc, rc, colh, cole, corner, load_rc, load_col):
    """Copy logical lane ``lane``'s step inputs, relative to ``base``, into kernel lane ``kl``
    of buffers laid out with ``stride`` lanes."""
    c0 = j * wb
    for c in range(wb):
        rowh[c * stride + kl] = bnd_h[c0 + 1 + c] - base - go
        f = bnd_f[c0 + c]
        rowf[c * stride + kl] = (f if f > clampv else clampv) - base
        qc[c * stride + kl] = a[c0 + c]
    if load_col:
        for r in range(hb):
            colh[r * stride + kl] = lcol_h[r * L + lane] - base
            e = lcol_e[r * L + lane]
            cole[r * stride + kl] = (e if e > clampv else clampv) - base
    if load_rc:
        for r in range(hb):
            rc[r * stride + kl] = b[r0 + r]
    corner[kl] = corner_in - base


@njit(nogil=True, cache=True)
def spill(lane, kl, stride, j, wb, hb, base, bnd_h, bnd_f, lcol_h, lcol_e, L, go, rowh, rowf,
          colh, cole, spill_row, spill_col):
    """Copy kernel lane ``kl``'s outputs back into canonical int32, adding ``base``."""
    c0 = j * wb
    if spill_row:
        for c in range(wb):
            bnd_h[c0 + 1 + c] = np.int32(rowh[c * stride + kl] + go + base)
            bnd_f[c0 + c] = np.int32(rowf[c * stride + kl] + base)
    if not spill_col:
        return
    for r in range(hb):
        lcol_h[r * L + lane] = np.int32(colh[r * stride + kl] + base)
        lcol_e[r * L + lane] = np.int32(cole[r * stride + kl] + base)


@njit(nogil=True, cache=True)
def take_candidate(value, r, c, k, j, hb, wb, row0, col0, best):
    row = row0 + k * hb + r
    col = col0 + j * wb + c
    if better(value, row, col, best):
        best[0] = value
        best[1] = row
        best[2] = col


@njit(nogil=True, cache=True)
def drive(a, b, bnd_h, bnd_f, col_h, col_e, nbands, hb, nblocks, wb, starts, prm, best):
    """Compute the rectangle; borders are updated in place (top -> bottom, left -> right).

    a, b: the rectangle's query (query-shifted codes) and reference codes; prm = [gap_open,
    gap_extend, match, mismatch, row0, col0]; best = [score, row, col] in global coordinates,
    raised when a cell beats it. Returns the number of steps run in the int32 fallback.

    One function on purpose (a Numba driver, over the ~80-line rule): the lanes' H, E and F
    values are locals of one loop nest, the code shape LLVM's SLP vectorizer was measured to
    turn into SIMD (doc/kernels.md); cut into calls, that state would cross function
    boundaries, and every change to the shape has to be measured again with bench/kernel.py.
    """
    L = LANES
    W = LANES32
    go = prm[0]
    ge = prm[1]
    match = prm[2]
    mismatch = prm[3]
    row0 = prm[4]
    col0 = prm[5]
    mn = min(hb, wb)
    low_margin = go + ge * mn + go + ge - mismatch
    high_margin = match * mn + match
    # narrow (int16 in the int16 build) kernel buffers
    rowh = np.zeros(wb * L, DT)
    rowf = np.zeros(wb * L, DT)
    qc = np.zeros(wb * L, DT)
    rc = np.zeros(hb * L, DT)
    colh = np.zeros(hb * L, DT)
    cole = np.zeros(hb * L, DT)
    corner = np.zeros(L, DT)
    floor = np.zeros(L, DT)
    kprm = np.array([go, ge, match + go, mismatch + go], DT)
    cand = np.zeros(2 * L, DT)
    cand_r = np.zeros(L, np.int64)
    cand_c = np.zeros(L, np.int64)
    colext = np.zeros(2 * L, DT)
    # int32 kernel buffers (the fallback of the int16 build; the only ones in the int32 build)
    rowh32 = np.zeros(wb * W, np.int32)
    rowf32 = np.zeros(wb * W, np.int32)
    qc32 = np.zeros(wb * W, np.int32)
    rc32 = np.zeros(hb * W, np.int32)
    colh32 = np.zeros(hb * W, np.int32)
    cole32 = np.zeros(hb * W, np.int32)
    corner32 = np.zeros(W, np.int32)
    floor32 = np.zeros(W, np.int32)
    kprm32 = np.array([go, ge, match + go, mismatch + go], np.int32)
    cand32 = np.zeros(2 * W, np.int32)
    colext32 = np.zeros(2 * W, np.int32)
    # canonical per-lane state
    lcol_h = np.zeros(hb * L, np.int32)
    lcol_e = np.zeros(hb * L, np.int32)
    next_corner = np.zeros(L, np.int64)
    step_corner = np.zeros(L, np.int64)
    lane_cmin = np.zeros(L, np.int64)
    lane_cmax = np.zeros(L, np.int64)
    band = np.full(L, -1, np.int64)
    block = np.zeros(L, np.int64)
    base = np.zeros(L, np.int64)
    clampv = np.zeros(L, np.int64)
    # The base of the lane's column while it stays in the narrow kernel buffer between steps
    # (no conversion while the base holds); NONE: the canonical int32 copy is current.
    NONE = -(2**62)
    col_base = np.full(L, NONE, np.int64)
    fallbacks = 0
    nsteps = starts[nbands - 1] + nblocks
    for s in range(nsteps):
        active = 0
        narrow = True
        for lane in range(L):
            band[lane] = -1
            k = lane
            while k < nbands and starts[k] + nblocks <= s:
                k += L
            if k >= nbands or starts[k] > s:
                continue
            j = s - starts[k]
            band[lane] = k
            block[lane] = j
            active += 1
            r0 = k * hb
            if j == 0:
                cmin = col_h[r0]
                cmax = col_h[r0]
                for r in range(hb):
                    h = col_h[r0 + r]
                    e = col_e[r0 + r]
                    lcol_h[r * L + lane] = h
                    lcol_e[r * L + lane] = e
                    cmin = min(cmin, h)
                    cmax = max(cmax, h, e)
                    rc[r * L + lane] = b[r0 + r]
                lane_cmin[lane] = cmin
                lane_cmax[lane] = cmax
                col_base[lane] = NONE
                step_corner[lane] = bnd_h[0]
                bnd_h[0] = col_h[r0 + hb - 1]
            else:
                step_corner[lane] = next_corner[lane]
            c0 = j * wb
            next_corner[lane] = bnd_h[c0 + wb]
            hmin = min(lane_cmin[lane], step_corner[lane])
            hmax = max(lane_cmax[lane], step_corner[lane])
            for c in range(wb):
                h = bnd_h[c0 + 1 + c]
                hmin = min(hmin, h)
                hmax = max(hmax, h, bnd_f[c0 + c])
            clampv[lane] = hmin - go
            base[lane] = 0
            if NARROW:
                top = hmax + high_margin
                if top <= I16_MAX and -low_margin >= I16_MIN:
                    base[lane] = 0
                    floor[lane] = 0
                else:
                    lb = hmin - go - ge * (mn - 1)
                    bs = hmin - low_margin - I16_MIN - 16
                    if lb >= 0 and top - bs <= I16_MAX:
                        base[lane] = bs
                        floor[lane] = I16_MIN
                    else:
                        narrow = False
        if active == 0:
            continue
        if narrow:
            for lane in range(L):
                k = band[lane]
                if k < 0:
                    continue
                bs = base[lane]
                reload = col_base[lane] != bs
                if reload and col_base[lane] != NONE:
                    spill(lane, lane, L, block[lane], wb, hb, col_base[lane], bnd_h, bnd_f,
                          lcol_h, lcol_e, L, go, rowh, rowf, colh, cole, False, True)
                fill(lane, lane, L, block[lane], wb, hb, bs, clampv[lane], step_corner[lane],
                     a, b, k * hb, bnd_h, bnd_f, lcol_h, lcol_e, L, go, rowh, rowf, qc, rc,
                     colh, cole, corner, False, reload)
                col_base[lane] = bs
                cand[lane] = max(min(best[0] - 1 - bs, DT_MAX), DT_MIN)
                cand_r[lane] = -1
            KERNEL(rowh, rowf, colh, cole, qc, rc, hb, wb, corner, floor, kprm, cand, cand_r,
                   cand_c, colext)
            for lane in range(L):
                k = band[lane]
                if k < 0:
                    continue
                bs = base[lane]
                spill(lane, lane, L, block[lane], wb, hb, bs, bnd_h, bnd_f, lcol_h, lcol_e, L,
                      go, rowh, rowf, colh, cole, True, False)
                lane_cmin[lane] = colext[lane] + bs
                lane_cmax[lane] = colext[L + lane] + bs
                if cand_r[lane] >= 0:
                    take_candidate(cand[lane] + bs, cand_r[lane], cand_c[lane], k, block[lane],
                                   hb, wb, row0, col0, best)
        else:
            fallbacks += 1
            for lane in range(L):
                if band[lane] >= 0 and col_base[lane] != NONE:
                    spill(lane, lane, L, block[lane], wb, hb, col_base[lane], bnd_h, bnd_f,
                          lcol_h, lcol_e, L, go, rowh, rowf, colh, cole, False, True)
                    col_base[lane] = NONE
            for g in range(L // W):
                any_active = False
                for kl in range(W):
                    lane = g * W + kl
                    k = band[lane]
                    if k < 0:
                        continue
                    any_active = True
                    fill(lane, kl, W, block[lane], wb, hb, 0, clampv[lane], step_corner[lane],
                         a, b, k * hb, bnd_h, bnd_f, lcol_h, lcol_e, L, go, rowh32, rowf32,
                         qc32, rc32, colh32, cole32, corner32, True, True)
                    cand32[kl] = max(min(best[0] - 1, I32_MAX), I32_MIN)
                    cand_r[kl] = -1
                if not any_active:
                    continue
                KERNEL32(rowh32, rowf32, colh32, cole32, qc32, rc32, hb, wb, corner32, floor32,
                         kprm32, cand32, cand_r, cand_c, colext32)
                for kl in range(W):
                    lane = g * W + kl
                    k = band[lane]
                    if k < 0:
                        continue
                    spill(lane, kl, W, block[lane], wb, hb, 0, bnd_h, bnd_f, lcol_h, lcol_e,
                          L, go, rowh32, rowf32, colh32, cole32, True, True)
                    lane_cmin[lane] = colext32[kl]
                    lane_cmax[lane] = colext32[W + kl]
                    if cand_r[kl] >= 0:
                        take_candidate(cand32[kl], cand_r[kl], cand_c[kl], k, block[lane], hb,
                                       wb, row0, col0, best)
        for lane in range(L):
            k = band[lane]
            if k >= 0 and block[lane] == nblocks - 1:
                if col_base[lane] != NONE:
                    spill(lane, lane, L, block[lane], wb, hb, col_base[lane], bnd_h, bnd_f,
                          lcol_h, lcol_e, L, go, rowh, rowf, colh, cole, False, True)
                    col_base[lane] = NONE
                r0 = k * hb
                for r in range(hb):
                    col_h[r0 + r] = lcol_h[r * L + lane]
                    col_e[r0 + r] = lcol_e[r * L + lane]
    return fallbacks
