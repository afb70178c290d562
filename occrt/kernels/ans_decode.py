"""The numba rANS chunk decoder of `occrt.codecs.ans` (format_spec/ans.md section 4), compiled once and cached on disk.

It lives in its own module so that `occrt.codecs.ans` imports numba only when it first decodes, and so that numba can
cache the compiled machine code (`cache=True` needs a module-level function): a second process start pays no compile.
`out` may be int8, int16 or int32 (one compiled specialization each): the runtime decodes straight into its compact
code arrays. The caller guarantees that every symbol the block can produce fits `out`'s dtype (`ans.block_info`'s
`min_symbol`/`max_symbol`); the assignment below would otherwise wrap.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def decode_chunk(words, cdf, lut, lut_shift, precision, lo, n_range, escapes, out):  # pragma: no cover (jit)
    # words (W,) u4; cdf (M + 1,) u8; lut (2^LUT_BITS + 1,) i4; escapes (E,) i4; out (n,) i1/i2/i4.
    # Returns (final state, words left, escapes used); used > E means the stream asked for one too many.
    pos = words.shape[0]
    x = np.uint64(0)
    if pos > 0:
        pos -= 1
        x = np.uint64(words[pos])
        if pos > 0:
            pos -= 1
            x = (x << np.uint64(32)) | np.uint64(words[pos])
    p = np.uint64(precision)
    mask = (np.uint64(1) << p) - np.uint64(1)
    shift = np.uint64(lut_shift)
    low = np.uint64(1) << np.uint64(32)
    n_esc = escapes.shape[0]
    e = 0
    for i in range(out.shape[0]):
        q = x & mask
        j = q >> shift
        a = np.int64(lut[j])
        b = np.int64(lut[j + np.uint64(1)])
        while a < b:  # largest a with cdf[a] <= q; the bucket bounds it, at most log2(M) steps
            mid = (a + b + 1) >> 1
            if cdf[mid] <= q:
                a = mid
            else:
                b = mid - 1
        c = cdf[a]
        x = (x >> p) * (cdf[a + 1] - c) + (q - c)
        if x < low and pos > 0:
            pos -= 1
            x = (x << np.uint64(32)) | np.uint64(words[pos])
        if a == n_range:
            if e == n_esc:
                return x, pos, e + 1
            out[i] = escapes[e]
            e += 1
        else:
            out[i] = lo + a
    return x, pos, e
