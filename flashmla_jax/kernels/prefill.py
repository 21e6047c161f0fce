"""Flash attention for MLA prefill (the non-absorbed form): causal, variable-length through segment ids, GQA.

Layouts (element strides, all contiguous):
  q [B, S, H, D_QK], k [B, S, H_KV, D_QK], v [B, S, H_KV, D_V], o / do [B, S, H, D_V],
  lse / delta [B, H, S] float32 (lse natural-log), segment ids [B, S] int32.
Query head h reads key/value head h // (H // H_KV) (GQA by index mapping).

Head dims are never padded in memory. Each head dim D is handled as two column chunks of power-of-two
widths DA + DB, each its own tl.dot (QK^T: two dots chained through the accumulator; P·V: two outputs):
  - D a power of two >= 32: two halves (192/128 -> QK 128 + 64, V 64 + 64);
  - otherwise DA = the largest power of two below D and DB = the next power of two >= D - DA, with
    the columns >= D masked in the load (so the padding exists only in registers; 192 needs no mask);
  - D = 16: DA = 16 and an all-masked DB = 16.
`*_MASK_B` says whether the B chunk needs its column mask.

Causal key blocks above the diagonal are skipped (the loops stop at the diagonal); only the blocks that
straddle it (and a partial last block) apply a mask. Segment ids mask (q_seg == k_seg) everywhere.
Softmax runs in base 2 with scale * log2(e) folded into the scores.

Kernels: `mla_prefill_fwd_kernel` (out, lse), then for the backward `mla_prefill_bwd_preprocess_kernel`
(delta = rowsum(dO * O) - dLSE), `mla_prefill_bwd_dkdv_kernel` (one program per key block and KV head, looping
over the query heads of its group: no atomics) and `mla_prefill_bwd_dq_kernel`.
"""
import triton
import triton.language as tl

from flashmla_jax.kernels._common import LOG2E, row_divisor, row_lse


@triton.jit
def _check_layout(H: tl.constexpr, H_KV: tl.constexpr, D_QK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr,
                  D_V: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """The layout rules every attention kernel here relies on, checked when it compiles (no code): GQA
    H % H_KV == 0; the column chunks powers of two >= 16 covering their head dims; BLOCK_M and BLOCK_N
    powers of two >= 16."""
    tl.static_assert(H % H_KV == 0, "H must be a multiple of H_KV")
    tl.static_assert(QA >= 16 and (QA & (QA - 1)) == 0 and QB >= 16 and (QB & (QB - 1)) == 0 and QA + QB >= D_QK,
                     "QA and QB must be powers of two >= 16 with QA + QB >= D_QK")
    tl.static_assert(VA >= 16 and (VA & (VA - 1)) == 0 and VB >= 16 and (VB & (VB - 1)) == 0 and VA + VB >= D_V,
                     "VA and VB must be powers of two >= 16 with VA + VB >= D_V")
    tl.static_assert(BLOCK_M >= 16 and (BLOCK_M & (BLOCK_M - 1)) == 0 and BLOCK_N >= 16
                     and (BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_M and BLOCK_N must be powers of two >= 16")


@triton.jit
def _load_tile(ptr, row_off, row_ok, offs_d, D: tl.constexpr, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    """[R, len(offs_d)] tile: element row_off[r] + offs_d[c] of ptr. Masked elements read 0."""
    ptrs = ptr + row_off[:, None] + offs_d[None, :]
    if MASK_ROWS:
        if MASK_COLS:
            x = tl.load(ptrs, mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_COLS:
            x = tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _mm(a, b, acc, PRECISE: tl.constexpr):
    """a @ b (+ acc) with float32 accumulation. PRECISE (float32 inputs): 3xTF32, about float32 accuracy;
    otherwise plain tensor-core dots (TF32 for float32)."""
    if PRECISE:
        c = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        c = tl.dot(a, b, acc)
    return c


@triton.jit
def _offsets(BLOCK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr):
    """arange(BLOCK) for the streamed rows, and the column offsets of the A / B chunks of q·k and v."""
    return (tl.arange(0, BLOCK), tl.arange(0, QA), QA + tl.arange(0, QB), tl.arange(0, VA),
            VA + tl.arange(0, VB))


@triton.jit
def _store_tile(ptr, row_off, row_ok, offs_d, x, D: tl.constexpr, MASK_COLS: tl.constexpr):
    ptrs = ptr + row_off[:, None] + offs_d[None, :]
    if MASK_COLS:
        tl.store(ptrs, x, mask=row_ok[:, None] & (offs_d[None, :] < D))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def _key_scores(q_a, q_b, k_ptr, start_n, offs_n, offs_qa, offs_qb, S: tl.constexpr, STRIDE_K: tl.constexpr,
                D_QK: tl.constexpr, QK_MASK_B: tl.constexpr, BOUNDARY: tl.constexpr, PRECISE: tl.constexpr):
    """The key block at start_n: (cols [BLOCK_N], col_ok = cols < S, the unscaled scores q · kᵀ
    [BLOCK_M, BLOCK_N], the key chunks k_a, k_b). BOUNDARY: keys >= S read 0."""
    cols = start_n + offs_n
    col_ok = cols < S
    k_rows = cols.to(tl.int64) * STRIDE_K
    k_a = _load_tile(k_ptr, k_rows, col_ok, offs_qa, D_QK, BOUNDARY, False)
    k_b = _load_tile(k_ptr, k_rows, col_ok, offs_qb, D_QK, BOUNDARY, QK_MASK_B)
    s = _mm(q_a, tl.trans(k_a), None, PRECISE)
    return cols, col_ok, _mm(q_b, tl.trans(k_b), s, PRECISE), k_a, k_b


@triton.jit
def _value_tiles(v_ptr, cols64, col_ok, offs_va, offs_vb, STRIDE_V: tl.constexpr, D_V: tl.constexpr,
                 V_MASK_B: tl.constexpr, BOUNDARY: tl.constexpr):
    """The values cols64 [BLOCK_N] in their two column chunks v_a, v_b. BOUNDARY: col_ok False reads 0."""
    v_a = _load_tile(v_ptr, cols64 * STRIDE_V, col_ok, offs_va, D_V, BOUNDARY, False)
    v_b = _load_tile(v_ptr, cols64 * STRIDE_V, col_ok, offs_vb, D_V, BOUNDARY, V_MASK_B)
    return v_a, v_b


@triton.jit
def _key_ranges(start_m, S: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(mid, hi) for query block start_m: keys [0, mid) need no mask; [mid, hi) are the diagonal blocks
    (causal) or the partial last block (mid == hi when there is none). Above the diagonal: skipped."""
    if CAUSAL:
        mid = start_m * BLOCK_M
        hi = tl.minimum(mid + BLOCK_M, S)
    else:
        mid = S // BLOCK_N * BLOCK_N
        hi = S
    return mid, hi


# ------------------------------------------------------------------------------------------------ forward


@triton.jit
def _fwd_inner(acc_a, acc_b, l_i, m_i, q_a, q_b, k_ptr, v_ptr, seg_ptr, seg_q, offs_m, offs_n,
               offs_qa, offs_qb, offs_va, offs_vb, qk_scale, lo, hi,
               KEYS: tl.constexpr, DIAG: tl.constexpr, BOUNDARY: tl.constexpr, HAS_SEG: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISE: tl.constexpr):
    """Online softmax over key blocks [lo, hi). KEYS: the constexpr key/value layout (S, STRIDE_K, STRIDE_V,
    D_QK, D_V, QK_MASK_B, V_MASK_B). DIAG: apply the causal mask; BOUNDARY: keys may be >= S."""
    S, STRIDE_K, STRIDE_V, D_QK, D_V, QK_MASK_B, V_MASK_B = KEYS
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols, col_ok, s, _, _ = _key_scores(q_a, q_b, k_ptr, start_n, offs_n, offs_qa, offs_qb, S, STRIDE_K, D_QK,
                                            QK_MASK_B, BOUNDARY, PRECISE)
        if DIAG or BOUNDARY or HAS_SEG:
            s = s * qk_scale
            if DIAG:
                s = tl.where(offs_m[:, None] >= cols[None, :], s, float("-inf"))
            if BOUNDARY:
                s = tl.where(col_ok[None, :], s, float("-inf"))
            if HAS_SEG:
                seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
                s = tl.where(seg_q[:, None] == seg_k[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row that has seen no key yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
        else:
            # Nothing masked: every score is finite, so m_new is too; the scale folds into one FMA.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_a, v_b = _value_tiles(v_ptr, cols.to(tl.int64), col_ok, offs_va, offs_vb, STRIDE_V, D_V, V_MASK_B, BOUNDARY)
        p = p.to(v_a.dtype)
        acc_a = _mm(p, v_a, acc_a * alpha[:, None], PRECISE)
        acc_b = _mm(p, v_b, acc_b * alpha[:, None], PRECISE)
        m_i = m_new
    return acc_a, acc_b, l_i, m_i


@triton.jit
def _query_block(q_ptr, k_ptr, v_ptr, seg_ptr, S: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr,
                 D_QK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QK_MASK_B: tl.constexpr,
                 D_V: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr):
    """The query-block prologue the forward and dQ kernels share. Grid (cdiv(S, BLOCK_M), B * H); query
    blocks run from the last (the most causal work) to the first, for a shorter tail.

    Returns start_m, bh, b, h, offs_m [BLOCK_M], row_ok, q_rows (element offsets of the rows),
    q_a [BLOCK_M, QA], q_b [BLOCK_M, QB], the k / v bases of KV head h // (H // H_KV) in sequence b,
    the segment base and this block's segment ids.
    """
    start_m = tl.cdiv(S, BLOCK_M) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // (H // H_KV)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S
    q_rows = (b.to(tl.int64) * S + offs_m) * (H * D_QK) + h * D_QK
    q_a = _load_tile(q_ptr, q_rows, row_ok, tl.arange(0, QA), D_QK, True, False)
    q_b = _load_tile(q_ptr, q_rows, row_ok, QA + tl.arange(0, QB), D_QK, True, QK_MASK_B)
    k_base = k_ptr + b.to(tl.int64) * S * H_KV * D_QK + hk * D_QK
    v_base = v_ptr + b.to(tl.int64) * S * H_KV * D_V + hk * D_V
    seg_base = seg_ptr + b.to(tl.int64) * S
    if HAS_SEG:
        seg_q = tl.load(seg_base + offs_m, mask=row_ok, other=-1)
    else:
        seg_q = offs_m  # unused
    return start_m, bh, b, h, offs_m, row_ok, q_rows, q_a, q_b, k_base, v_base, seg_base, seg_q


@triton.jit
def mla_prefill_fwd_kernel(
    q_ptr, k_ptr, v_ptr, seg_ptr, scale,
    o_ptr, lse_ptr,
    S: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr,
    D_QK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QK_MASK_B: tl.constexpr,
    D_V: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, V_MASK_B: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_M), B * H); BLOCK_M % BLOCK_N == 0.

    q_ptr [B, S, H, D_QK], k_ptr [B, S, H_KV, D_QK], v_ptr [B, S, H_KV, D_V], seg_ptr [B, S] int32 (read
    only when HAS_SEG), scale float32 -> o_ptr [B, S, H, D_V] (q's dtype), lse_ptr [B, H, S] float32.
    Query blocks run from the last (the most causal work) to the first, for a shorter tail.
    """
    _check_layout(H, H_KV, D_QK, QA, QB, D_V, VA, VB, BLOCK_M, BLOCK_N)
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "the forward needs BLOCK_M % BLOCK_N == 0")
    start_m, bh, b, h, offs_m, row_ok, q_rows, q_a, q_b, k_base, v_base, seg_base, seg_q = _query_block(
        q_ptr, k_ptr, v_ptr, seg_ptr, S, H, H_KV, D_QK, QA, QB, QK_MASK_B, D_V, HAS_SEG, BLOCK_M)
    offs_n, offs_qa, offs_qb, offs_va, offs_vb = _offsets(BLOCK_N, QA, QB, VA, VB)
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc_a = tl.zeros([BLOCK_M, VA], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M, VB], dtype=tl.float32)
    KEYS: tl.constexpr = (S, H_KV * D_QK, H_KV * D_V, D_QK, D_V, QK_MASK_B, V_MASK_B)
    mid, hi = _key_ranges(start_m, S, CAUSAL, BLOCK_M, BLOCK_N)
    acc_a, acc_b, l_i, m_i = _fwd_inner(
        acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, seg_base, seg_q, offs_m, offs_n,
        offs_qa, offs_qb, offs_va, offs_vb, qk_scale, 0, mid,
        KEYS, False, False, HAS_SEG, BLOCK_N, PRECISE)
    if CAUSAL or S % BLOCK_N != 0:
        acc_a, acc_b, l_i, m_i = _fwd_inner(
            acc_a, acc_b, l_i, m_i, q_a, q_b, k_base, v_base, seg_base, seg_q, offs_m, offs_n,
            offs_qa, offs_qb, offs_va, offs_vb, qk_scale, mid, hi,
            KEYS, CAUSAL, True, HAS_SEG, BLOCK_N, PRECISE)

    # Every row sees its own token: a row sum of 0 means that all its scores were -inf (an inf in q, k or the
    # scale), which must reach the result as NaN, not as a row that saw nothing.
    l_i = tl.where(l_i == 0, float("nan"), l_i)
    l_safe = row_divisor(l_i)
    o_rows = (b.to(tl.int64) * S + offs_m) * (H * D_V) + h * D_V
    _store_tile(o_ptr, o_rows, row_ok, offs_va, (acc_a / l_safe[:, None]).to(o_ptr.dtype.element_ty), D_V, False)
    _store_tile(o_ptr, o_rows, row_ok, offs_vb, (acc_b / l_safe[:, None]).to(o_ptr.dtype.element_ty), D_V,
                V_MASK_B)
    lse = row_lse(m_i, l_i)
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, lse, mask=row_ok)


# ------------------------------------------------------------------------------------------------ backward


@triton.jit
def mla_prefill_bwd_preprocess_kernel(
    o_ptr, do_ptr, dlse_ptr,
    delta_ptr,
    S: tl.constexpr, H: tl.constexpr, D_V: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr,
    V_MASK_B: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) - dLSE. Grid (cdiv(S, BLOCK_M), B * H).

    o_ptr, do_ptr [B, S, H, D_V]; dlse_ptr [B, H, S] float32 (the cotangent of the returned lse)
    -> delta_ptr [B, H, S] float32.
    """
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < S
    offs_va = tl.arange(0, VA)
    offs_vb = VA + tl.arange(0, VB)
    rows = (b.to(tl.int64) * S + offs_m) * (H * D_V) + h * D_V
    o_a = _load_tile(o_ptr, rows, row_ok, offs_va, D_V, True, False).to(tl.float32)
    o_b = _load_tile(o_ptr, rows, row_ok, offs_vb, D_V, True, V_MASK_B).to(tl.float32)
    do_a = _load_tile(do_ptr, rows, row_ok, offs_va, D_V, True, False).to(tl.float32)
    do_b = _load_tile(do_ptr, rows, row_ok, offs_vb, D_V, True, V_MASK_B).to(tl.float32)
    delta = tl.sum(o_a * do_a, 1) + tl.sum(o_b * do_b, 1)
    dlse = tl.load(dlse_ptr + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    tl.store(delta_ptr + bh.to(tl.int64) * S + offs_m, delta - dlse, mask=row_ok)


@triton.jit
def _dkdv_inner(dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_ptr, do_ptr, lse_ptr, delta_ptr, seg_ptr,
                seg_k, offs_n, offs_mb, offs_qa, offs_qb, offs_va, offs_vb, qk_scale, lo, hi,
                S: tl.constexpr, STRIDE_Q: tl.constexpr, STRIDE_O: tl.constexpr,
                D_QK: tl.constexpr, D_V: tl.constexpr, QK_MASK_B: tl.constexpr, V_MASK_B: tl.constexpr,
                DIAG: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, PRECISE: tl.constexpr):
    """Accumulates dK, dV of one key block over query blocks [lo, hi), in the transposed frame
    (scores^T [BLOCK_N, BLOCK_M]). Query rows >= S read q = dO = lse = delta = 0 and so add exactly 0."""
    for start_m in tl.range(lo, hi, BLOCK_M):
        rows = start_m + offs_mb
        row_ok = rows < S
        rows64 = rows.to(tl.int64)
        q_a = _load_tile(q_ptr, rows64 * STRIDE_Q, row_ok, offs_qa, D_QK, True, False)
        q_b = _load_tile(q_ptr, rows64 * STRIDE_Q, row_ok, offs_qb, D_QK, True, QK_MASK_B)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0) * LOG2E
        s_t = _mm(k_a, tl.trans(q_a), None, PRECISE)
        s_t = _mm(k_b, tl.trans(q_b), s_t, PRECISE)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if DIAG:
            p_t = tl.where(offs_n[:, None] <= rows[None, :], p_t, 0.0)
        if HAS_SEG:
            seg_q = tl.load(seg_ptr + rows, mask=row_ok, other=-1)
            p_t = tl.where(seg_k[:, None] == seg_q[None, :], p_t, 0.0)
        do_a = _load_tile(do_ptr, rows64 * STRIDE_O, row_ok, offs_va, D_V, True, False)
        do_b = _load_tile(do_ptr, rows64 * STRIDE_O, row_ok, offs_vb, D_V, True, V_MASK_B)
        p_lo = p_t.to(do_a.dtype)
        dv_a = _mm(p_lo, do_a, dv_a, PRECISE)
        dv_b = _mm(p_lo, do_b, dv_b, PRECISE)
        dp_t = _mm(v_a, tl.trans(do_a), None, PRECISE)
        dp_t = _mm(v_b, tl.trans(do_b), dp_t, PRECISE)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q_a.dtype)
        dk_a = _mm(ds_t, q_a, dk_a, PRECISE)
        dk_b = _mm(ds_t, q_b, dk_b, PRECISE)
    return dk_a, dk_b, dv_a, dv_b


@triton.jit
def mla_prefill_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, seg_ptr, scale,
    dk_ptr, dv_ptr,
    S: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr,
    D_QK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QK_MASK_B: tl.constexpr,
    D_V: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, V_MASK_B: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """dK, dV. Grid (cdiv(S, BLOCK_N), B * H_KV); BLOCK_N % BLOCK_M == 0.

    Inputs as the forward's, plus do_ptr [B, S, H, D_V], lse_ptr and delta_ptr [B, H, S] float32
    -> dk_ptr [B, S, H_KV, D_QK], dv_ptr [B, S, H_KV, D_V] (input dtype), summed over the H // H_KV query
    heads that share each KV head.
    """
    _check_layout(H, H_KV, D_QK, QA, QB, D_V, VA, VB, BLOCK_M, BLOCK_N)
    tl.static_assert(BLOCK_N % BLOCK_M == 0, "dK, dV need BLOCK_N % BLOCK_M == 0")
    G: tl.constexpr = H // H_KV
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b = bhk // H_KV
    hk = bhk % H_KV

    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_ok = offs_n < S
    offs_mb, offs_qa, offs_qb, offs_va, offs_vb = _offsets(BLOCK_M, QA, QB, VA, VB)

    k_rows = (b.to(tl.int64) * S + offs_n) * (H_KV * D_QK) + hk * D_QK
    v_rows = (b.to(tl.int64) * S + offs_n) * (H_KV * D_V) + hk * D_V
    k_a = _load_tile(k_ptr, k_rows, n_ok, offs_qa, D_QK, True, False)
    k_b = _load_tile(k_ptr, k_rows, n_ok, offs_qb, D_QK, True, QK_MASK_B)
    v_a = _load_tile(v_ptr, v_rows, n_ok, offs_va, D_V, True, False)
    v_b = _load_tile(v_ptr, v_rows, n_ok, offs_vb, D_V, True, V_MASK_B)
    seg_base = seg_ptr + b.to(tl.int64) * S
    if HAS_SEG:
        seg_k = tl.load(seg_base + offs_n, mask=n_ok, other=-2)
    else:
        seg_k = offs_n  # unused
    qk_scale = scale * LOG2E

    dk_a = tl.zeros([BLOCK_N, QA], dtype=tl.float32)
    dk_b = tl.zeros([BLOCK_N, QB], dtype=tl.float32)
    dv_a = tl.zeros([BLOCK_N, VA], dtype=tl.float32)
    dv_b = tl.zeros([BLOCK_N, VB], dtype=tl.float32)
    STRIDE_Q: tl.constexpr = H * D_QK
    STRIDE_O: tl.constexpr = H * D_V
    for g in range(G):
        h = hk * G + g
        q_base = q_ptr + b.to(tl.int64) * S * STRIDE_Q + h * D_QK
        do_base = do_ptr + b.to(tl.int64) * S * STRIDE_O + h * D_V
        lse_base = lse_ptr + (b.to(tl.int64) * H + h) * S
        delta_base = delta_ptr + (b.to(tl.int64) * H + h) * S
        lo = 0
        if CAUSAL:
            # Query blocks on the diagonal (masked), then those below it; those above are skipped.
            dk_a, dk_b, dv_a, dv_b = _dkdv_inner(
                dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base, lse_base, delta_base, seg_base,
                seg_k, offs_n, offs_mb, offs_qa, offs_qb, offs_va, offs_vb, qk_scale,
                start_n, tl.minimum(start_n + BLOCK_N, S),
                S, STRIDE_Q, STRIDE_O, D_QK, D_V, QK_MASK_B, V_MASK_B, True, HAS_SEG, BLOCK_M, PRECISE)
            lo = start_n + BLOCK_N
        dk_a, dk_b, dv_a, dv_b = _dkdv_inner(
            dk_a, dk_b, dv_a, dv_b, k_a, k_b, v_a, v_b, q_base, do_base, lse_base, delta_base, seg_base,
            seg_k, offs_n, offs_mb, offs_qa, offs_qb, offs_va, offs_vb, qk_scale, lo, S,
            S, STRIDE_Q, STRIDE_O, D_QK, D_V, QK_MASK_B, V_MASK_B, False, HAS_SEG, BLOCK_M, PRECISE)

    dk_a = dk_a * scale
    dk_b = dk_b * scale
    _store_tile(dk_ptr, k_rows, n_ok, offs_qa, dk_a.to(dk_ptr.dtype.element_ty), D_QK, False)
    _store_tile(dk_ptr, k_rows, n_ok, offs_qb, dk_b.to(dk_ptr.dtype.element_ty), D_QK, QK_MASK_B)
    _store_tile(dv_ptr, v_rows, n_ok, offs_va, dv_a.to(dv_ptr.dtype.element_ty), D_V, False)
    _store_tile(dv_ptr, v_rows, n_ok, offs_vb, dv_b.to(dv_ptr.dtype.element_ty), D_V, V_MASK_B)


@triton.jit
def _dq_inner(dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_ptr, v_ptr, seg_ptr, seg_q, offs_m, offs_n,
              offs_qa, offs_qb, offs_va, offs_vb, qk_scale, lo, hi,
              KEYS: tl.constexpr, DIAG: tl.constexpr, BOUNDARY: tl.constexpr, HAS_SEG: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISE: tl.constexpr):
    """Accumulates dQ of one query block over key blocks [lo, hi) (KEYS, DIAG, BOUNDARY as `_fwd_inner`'s).
    Keys >= S read k = v = 0 and add 0."""
    S, STRIDE_K, STRIDE_V, D_QK, D_V, QK_MASK_B, V_MASK_B = KEYS
    for start_n in tl.range(lo, hi, BLOCK_N):
        cols, col_ok, s, k_a, k_b = _key_scores(q_a, q_b, k_ptr, start_n, offs_n, offs_qa, offs_qb, S, STRIDE_K,
                                                D_QK, QK_MASK_B, BOUNDARY, PRECISE)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if DIAG:
            p = tl.where(offs_m[:, None] >= cols[None, :], p, 0.0)
        if HAS_SEG:
            seg_k = tl.load(seg_ptr + cols, mask=col_ok, other=-2)
            p = tl.where(seg_q[:, None] == seg_k[None, :], p, 0.0)
        v_a, v_b = _value_tiles(v_ptr, cols.to(tl.int64), col_ok, offs_va, offs_vb, STRIDE_V, D_V, V_MASK_B, BOUNDARY)
        dp = _mm(do_a, tl.trans(v_a), None, PRECISE)
        dp = _mm(do_b, tl.trans(v_b), dp, PRECISE)
        ds = (p * (dp - delta[:, None])).to(k_a.dtype)
        dq_a = _mm(ds, k_a, dq_a, PRECISE)
        dq_b = _mm(ds, k_b, dq_b, PRECISE)
    return dq_a, dq_b


@triton.jit
def mla_prefill_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, seg_ptr, scale,
    dq_ptr,
    S: tl.constexpr, H: tl.constexpr, H_KV: tl.constexpr,
    D_QK: tl.constexpr, QA: tl.constexpr, QB: tl.constexpr, QK_MASK_B: tl.constexpr,
    D_V: tl.constexpr, VA: tl.constexpr, VB: tl.constexpr, V_MASK_B: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_SEG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISE: tl.constexpr,
):
    """dQ. Grid (cdiv(S, BLOCK_M), B * H); BLOCK_M % BLOCK_N == 0. Inputs as mla_prefill_bwd_dkdv_kernel's
    -> dq_ptr [B, S, H, D_QK] (q's dtype)."""
    _check_layout(H, H_KV, D_QK, QA, QB, D_V, VA, VB, BLOCK_M, BLOCK_N)
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "dQ needs BLOCK_M % BLOCK_N == 0")
    start_m, bh, b, h, offs_m, row_ok, q_rows, q_a, q_b, k_base, v_base, seg_base, seg_q = _query_block(
        q_ptr, k_ptr, v_ptr, seg_ptr, S, H, H_KV, D_QK, QA, QB, QK_MASK_B, D_V, HAS_SEG, BLOCK_M)
    offs_n, offs_qa, offs_qb, offs_va, offs_vb = _offsets(BLOCK_N, QA, QB, VA, VB)
    o_rows = (b.to(tl.int64) * S + offs_m) * (H * D_V) + h * D_V
    do_a = _load_tile(do_ptr, o_rows, row_ok, offs_va, D_V, True, False)
    do_b = _load_tile(do_ptr, o_rows, row_ok, offs_vb, D_V, True, V_MASK_B)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(delta_ptr + bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    qk_scale = scale * LOG2E

    dq_a = tl.zeros([BLOCK_M, QA], dtype=tl.float32)
    dq_b = tl.zeros([BLOCK_M, QB], dtype=tl.float32)
    KEYS: tl.constexpr = (S, H_KV * D_QK, H_KV * D_V, D_QK, D_V, QK_MASK_B, V_MASK_B)
    mid, hi = _key_ranges(start_m, S, CAUSAL, BLOCK_M, BLOCK_N)
    dq_a, dq_b = _dq_inner(
        dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, seg_base, seg_q, offs_m, offs_n,
        offs_qa, offs_qb, offs_va, offs_vb, qk_scale, 0, mid,
        KEYS, False, False, HAS_SEG, BLOCK_N, PRECISE)
    if CAUSAL or S % BLOCK_N != 0:
        dq_a, dq_b = _dq_inner(
            dq_a, dq_b, q_a, q_b, do_a, do_b, lse, delta, k_base, v_base, seg_base, seg_q, offs_m, offs_n,
            offs_qa, offs_qb, offs_va, offs_vb, qk_scale, mid, hi,
            KEYS, CAUSAL, True, HAS_SEG, BLOCK_N, PRECISE)

    _store_tile(dq_ptr, q_rows, row_ok, offs_qa, (dq_a * scale).to(dq_ptr.dtype.element_ty), D_QK, False)
    _store_tile(dq_ptr, q_rows, row_ok, offs_qb, (dq_b * scale).to(dq_ptr.dtype.element_ty), D_QK, QK_MASK_B)
