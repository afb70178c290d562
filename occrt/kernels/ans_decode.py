"""The numba rANS decoder of `occrt.codecs.ans` (format_spec/ans.md section 4), compiled once and cached on disk.

It lives in its own module so that `occrt.codecs.ans` imports numba only when it first decodes, and so that numba can
cache the compiled machine code (`cache=True` needs a module-level function): a second process start pays no compile.

`decode_chunks` decodes a range of a block's chunks four at a time: the four rANS states are independent, so their
dependency chains (table lookup -> multiply -> renormalize, ~20 cycles each) overlap in the core instead of running
one after the other (measured on SmolLM2's embedding: 62 -> 107 M symbols/s on one core). Leftover chunks, a shorter
last chunk, and any group where a stream misbehaves go through `decode_chunk`, one stream at a time, which also
produces the exact per-chunk result the caller validates.

`out` may be int8, int16 or int32 (one compiled specialization each): the runtime decodes straight into its compact
code arrays. The caller guarantees that every symbol the block can produce fits `out`'s dtype (`ans.block_info`'s
`min_symbol`/`max_symbol`); the assignment below would otherwise wrap.
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(inline="always")
def _start(words, base, n_words):
    """The initial state: the last one or two words of the chunk's stream. Returns (x, words left)."""
    pos = n_words
    x = np.uint64(0)
    if pos > 0:
        pos -= 1
        x = np.uint64(words[base + pos])
        if pos > 0:
            pos -= 1
            x = (x << np.uint64(32)) | np.uint64(words[base + pos])
    return x, pos


@njit(inline="always")
def _step(x, pos, words, base, cdf, lut, mask, shift, p):
    """Decode one symbol: returns (x, words left, table entry a). a == n_range is the escape entry."""
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
    if x < (np.uint64(1) << np.uint64(32)) and pos > 0:
        pos -= 1
        x = (x << np.uint64(32)) | np.uint64(words[base + pos])
    return x, pos, a


@njit(nogil=True, cache=True)
def decode_chunk(words, cdf, lut, lut_shift, precision, lo, n_range, escapes, out):  # pragma: no cover (jit)
    """One chunk: words (W,) u4 its stream; cdf (M + 1,) u8; lut (2^LUT_BITS + 1,) i4; escapes (E,) i4 its escaped
    values; out (n,) i1/i2/i4. Returns (final state, words left, escapes used); used > E means the stream asked for
    one escape too many (decoding stopped there)."""
    p = np.uint64(precision)
    mask = (np.uint64(1) << p) - np.uint64(1)
    shift = np.uint64(lut_shift)
    x, pos = _start(words, 0, words.shape[0])
    n_esc = escapes.shape[0]
    e = 0
    for i in range(out.shape[0]):
        x, pos, a = _step(x, pos, words, 0, cdf, lut, mask, shift, p)
        if a == n_range:
            if e == n_esc:
                return x, pos, e + 1
            out[i] = escapes[e]
            e += 1
        else:
            out[i] = lo + a
    return x, pos, e


@njit(inline="always")
def _escape(a, e, e0, n_esc, escapes, n_range, out, i):
    """If entry a is the escape, store the lane's next escaped value as symbol i. Returns the lane's escape count,
    -1 when it has none left."""
    if a != n_range:
        return e
    if e == n_esc:
        return -1
    out[i] = escapes[e0 + e]
    return e + 1


@njit(nogil=True, cache=True)
def decode_chunks(words, first_word, n_words, n_symbols, escapes, first_escape, n_escapes, chunk_size, cdf, lut,
                  lut_shift, precision, lo, n_range, out, c0, c1, result):  # pragma: no cover (jit)
    """Chunks [c0, c1) of a block into out (all symbols, chunk j at j * chunk_size). Per chunk j: its words are
    words[first_word[j] : + n_words[j]], its escapes escapes[first_escape[j] : + n_escapes[j]], its symbol count
    n_symbols[j]. result (n_chunks, 3) u8 receives (final state, words left, escapes used) as `decode_chunk` returns."""
    p = np.uint64(precision)
    mask = (np.uint64(1) << p) - np.uint64(1)
    shift = np.uint64(lut_shift)
    j = c0
    while j < c1:
        n = n_symbols[j]
        if j + 4 <= c1 and n_symbols[j + 1] == n and n_symbols[j + 2] == n and n_symbols[j + 3] == n:
            b0, b1, b2, b3 = first_word[j], first_word[j + 1], first_word[j + 2], first_word[j + 3]
            x0, q0 = _start(words, b0, n_words[j])
            x1, q1 = _start(words, b1, n_words[j + 1])
            x2, q2 = _start(words, b2, n_words[j + 2])
            x3, q3 = _start(words, b3, n_words[j + 3])
            e0 = e1 = e2 = e3 = 0
            o0, o1 = out[j * chunk_size:], out[(j + 1) * chunk_size:]
            o2, o3 = out[(j + 2) * chunk_size:], out[(j + 3) * chunk_size:]
            ok = True
            for i in range(n):
                x0, q0, a0 = _step(x0, q0, words, b0, cdf, lut, mask, shift, p)
                x1, q1, a1 = _step(x1, q1, words, b1, cdf, lut, mask, shift, p)
                x2, q2, a2 = _step(x2, q2, words, b2, cdf, lut, mask, shift, p)
                x3, q3, a3 = _step(x3, q3, words, b3, cdf, lut, mask, shift, p)
                # branch-free stores; the rare escape entry (lo + n_range, possibly wrapped) is overwritten below
                o0[i], o1[i], o2[i], o3[i] = lo + a0, lo + a1, lo + a2, lo + a3
                if a0 == n_range or a1 == n_range or a2 == n_range or a3 == n_range:
                    e0 = _escape(a0, e0, first_escape[j], n_escapes[j], escapes, n_range, o0, i)
                    e1 = _escape(a1, e1, first_escape[j + 1], n_escapes[j + 1], escapes, n_range, o1, i)
                    e2 = _escape(a2, e2, first_escape[j + 2], n_escapes[j + 2], escapes, n_range, o2, i)
                    e3 = _escape(a3, e3, first_escape[j + 3], n_escapes[j + 3], escapes, n_range, o3, i)
                    if e0 < 0 or e1 < 0 or e2 < 0 or e3 < 0:
                        ok = False
                        break
            if ok:
                result[j, 0], result[j, 1], result[j, 2] = x0, q0, e0
                result[j + 1, 0], result[j + 1, 1], result[j + 1, 2] = x1, q1, e1
                result[j + 2, 0], result[j + 2, 1], result[j + 2, 2] = x2, q2, e2
                result[j + 3, 0], result[j + 3, 1], result[j + 3, 2] = x3, q3, e3
                j += 4
                continue
        # one stream: a chunk left over, of another length, or a group with a faulty stream (decoded again alone,
        # so the caller sees that chunk's own result)
        x, left, used = decode_chunk(words[first_word[j]:first_word[j] + n_words[j]], cdf, lut, lut_shift, precision,
                                     lo, n_range, escapes[first_escape[j]:first_escape[j] + n_escapes[j]],
                                     out[j * chunk_size:j * chunk_size + n])
        result[j, 0], result[j, 1], result[j, 2] = x, left, used
        j += 1
