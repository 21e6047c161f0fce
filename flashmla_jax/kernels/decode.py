"""Split-KV (flash-decoding) MLA decode over the latent cache.

Absorbed MLA is multi-query attention with one KV head of width D_V + D_R (512 + 64) whose V is its first
D_V columns: each latent tile is loaded once, as a D_V part and a D_R part (nothing padded to 1024), and
the D_V part serves both as K and as V.

Stage 1 (`mla_decode_split_kernel`): one program takes BLOCK_M query rows (rows are (s, h) pairs of one
sequence, r = s * H + h) and one split of that sequence's keys, and runs the online softmax over it. With
one split it writes the final output; otherwise float32 partials and their LSE, merged by
`mla_decode_combine_kernel`.
"""
import triton
import triton.language as tl

@triton.jit
def _load_latent_tile(kv_ptr, table_ptr, b, start, offs_n, offs_v, offs_r, hi, capacity,
                      N_MAX: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                      MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
                      D_V: tl.constexpr, D_R: tl.constexpr):
    """Tokens start + offs_n of sequence b -> ([BLOCK_N, D_V], [BLOCK_N, D_R]); tokens >= hi read as 0."""
    D: tl.constexpr = D_V + D_R
    tokens = start + offs_n
    valid = tokens < hi
    if PAGED:
        # BLOCK_N divides PAGE_SIZE and start is a multiple of BLOCK_N: the tile lies in one page.
        page = tl.load(table_ptr + b * MAX_BLOCKS + start // PAGE_SIZE)
        page = tl.minimum(tl.maximum(page, 0), NUM_PAGES - 1).to(tl.int64)
        rows = page * PAGE_SIZE + (start % PAGE_SIZE) + offs_n
    else:
        rows = b.to(tl.int64) * N_MAX + tokens
    base = kv_ptr + rows[:, None] * D
    k_v = tl.load(base + offs_v[None, :], mask=valid[:, None], other=0.0)
    k_r = tl.load(base + D_V + offs_r[None, :], mask=valid[:, None], other=0.0)
    return k_v, k_r


@triton.jit
def mla_decode_split_kernel(
    q_ptr, kv_ptr, seqlens_ptr, table_ptr, scale,
    o_ptr, lse_ptr,
    H: tl.constexpr, S_Q: tl.constexpr, N_MAX: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
    D_V: tl.constexpr, D_R: tl.constexpr, CAUSAL: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(S_Q * H, BLOCK_M), NUM_SPLITS, B); the row tile is the fastest axis, so the row tiles
    of one split run side by side and share each latent tile through L2.

    q_ptr:  [B, S_Q * H, D_V + D_R]        kv_ptr: [B, N_MAX, D] or pages [NUM_PAGES, PAGE_SIZE, D]
    seqlens_ptr: [B] int32 (clamped to [0, capacity]; negative counts as 0)
    table_ptr: [B, MAX_BLOCKS] int32 when PAGED (indices clamped to [0, NUM_PAGES))
    NUM_SPLITS == 1: o_ptr [B, S_Q * H, D_V] in q's dtype, lse_ptr [B, S_Q * H] float32.
    NUM_SPLITS > 1:  o_ptr [B, NUM_SPLITS, S_Q * H, D_V] float32, lse_ptr [B, NUM_SPLITS, S_Q * H].
    LSE is natural-log; a row that sees no key in its range gets lse -inf and output 0.
    """
    R: tl.constexpr = S_Q * H
    D: tl.constexpr = D_V + D_R
    tile = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)

    capacity = MAX_BLOCKS * PAGE_SIZE if PAGED else N_MAX
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), capacity)
    # Each split covers a run of whole BLOCK_N tiles of this sequence's real length.
    # (tl.cdiv is a @triton.jit helper that Triton's interpreter cannot call: written out.)
    split_len = ((seqlen + NUM_SPLITS - 1) // NUM_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    if CAUSAL:
        limit = seqlen - S_Q + 1 + offs_m // H          # query s = r // H sees keys < limit
    else:
        limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, D_V)
    offs_r = tl.arange(0, D_R)

    q_base = q_ptr + (b.to(tl.int64) * R + offs_m[:, None]) * D
    q_v = tl.load(q_base + offs_v[None, :], mask=row_ok[:, None], other=0.0)
    q_r = tl.load(q_base + D_V + offs_r[None, :], mask=row_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634               # softmax in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N):
        k_v, k_r = _load_latent_tile(kv_ptr, table_ptr, b, start, offs_n, offs_v, offs_r, hi, capacity,
                                     N_MAX, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V, D_R)
        s = tl.dot(q_v, tl.trans(k_v)) + tl.dot(q_r, tl.trans(k_r))
        s = s * qk_scale
        visible = (start + offs_n)[None, :] < limit[:, None]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_v.dtype), k_v)
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    offs_m64 = offs_m.to(tl.int64)
    if NUM_SPLITS == 1:
        row = b.to(tl.int64) * R + offs_m64
        tl.store(o_ptr + row[:, None] * D_V + offs_v[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
    else:
        row = (b.to(tl.int64) * NUM_SPLITS + split) * R + offs_m64
        tl.store(o_ptr + row[:, None] * D_V + offs_v[None, :], out, mask=row_ok[:, None])
    tl.store(lse_ptr + row, lse, mask=row_ok)


@triton.jit
def mla_decode_combine_kernel(
    o_part_ptr, lse_part_ptr,
    o_ptr, lse_ptr,
    R: tl.constexpr, D_V: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Merges split partials by their LSE. Grid (cdiv(R, BLOCK_R), B).

    o_part_ptr [B, NUM_SPLITS, R, D_V] float32, lse_part_ptr [B, NUM_SPLITS, R] float32 (-inf: empty split)
    -> o_ptr [B, R, D_V] in the output dtype, lse_ptr [B, R] float32; a row with no key gives 0 and -inf.
    """
    b = tl.program_id(1)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, D_V)
    row_ok = offs_r < R
    part_rows = (b.to(tl.int64) * NUM_SPLITS + offs_s[:, None]) * R + offs_r[None, :]    # [S, BLOCK_R]
    lse_s = tl.load(lse_part_ptr + part_rows, mask=(offs_s[:, None] < NUM_SPLITS) & row_ok[None, :],
                    other=float("-inf"))
    lse_max = tl.max(lse_s, 0)
    has_keys = lse_max > float("-inf")
    lse_max_safe = tl.where(has_keys, lse_max, 0.0)
    w = tl.exp(lse_s - lse_max_safe[None, :])                     # [S, BLOCK_R]; empty splits weigh 0
    w_sum = tl.sum(w, 0)
    w = w / tl.where(has_keys, w_sum, 1.0)[None, :]
    acc = tl.zeros([BLOCK_R, D_V], dtype=tl.float32)
    for s in range(NUM_SPLITS):
        rows = (b.to(tl.int64) * NUM_SPLITS + s) * R + offs_r
        part = tl.load(o_part_ptr + rows[:, None] * D_V + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        w_s = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
        # An empty split's partial is 0 with weight 0; guard anyway so garbage never meets a zero weight.
        acc += tl.where(w_s[:, None] > 0, part * w_s[:, None], 0.0)
    out_rows = b.to(tl.int64) * R + offs_r
    tl.store(o_ptr + out_rows[:, None] * D_V + offs_d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(has_keys, lse_max_safe + tl.log(tl.where(has_keys, w_sum, 1.0)), float("-inf"))
    tl.store(lse_ptr + out_rows, lse, mask=row_ok)
