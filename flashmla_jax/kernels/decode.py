"""Split-KV (flash-decoding) MLA decode over the latent cache, balanced by the real sequence lengths.

Absorbed MLA is multi-query attention with one KV head of width D_V + D_R (512 + 64) whose V is its first
D_V columns: each latent tile is loaded once, as a D_V part and a D_R part (nothing padded to 1024), and
the D_V part serves both as K and as V.

Work is scheduled as in FlashMLA: the key blocks of all sequences, laid end to end (`cu_blocks`, the
cumulative count of BLOCK_N blocks per sequence), are cut into `num_parts` equal runs of `part_blocks`
blocks, one per program. A program walks its run sequence by sequence. A sequence it covers whole is
finished on the spot (output in q's dtype); a sequence cut between programs leaves float32 partials
(at most two per program: slot 0 for the program's first piece, slot 1 for its last), which
`mla_decode_combine_kernel` merges by their LSE. So a ragged batch costs its real length, and partials
exist only where a sequence is split.

Schedule layout (int32, built by the JAX side): sched = [part_blocks, total_blocks, first_seq[num_parts]],
where first_seq[p] is the sequence holding block p * part_blocks; cu_blocks [B + 1].
"""
import triton
import triton.language as tl


@triton.jit
def _load_latent_tile(kv_ptr, table_ptr, b, start, offs_n, offs_v, offs_r, seqlen,
                      N_MAX: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                      MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
                      D_V: tl.constexpr, D_R: tl.constexpr):
    """Tokens start + offs_n of sequence b -> ([BLOCK_N, D_V], [BLOCK_N, D_R]); tokens >= seqlen read 0."""
    D: tl.constexpr = D_V + D_R
    tokens = start + offs_n
    valid = tokens < seqlen
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
    q_ptr, kv_ptr, seqlens_ptr, table_ptr, cu_blocks_ptr, sched_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr,
    B: tl.constexpr, H: tl.constexpr, S_Q: tl.constexpr, N_MAX: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
    D_V: tl.constexpr, D_R: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(S_Q * H, BLOCK_M), num_parts); the row tile is the fastest axis, so the row tiles of
    one run go side by side and share each latent tile through L2.

    q_ptr:  [B, S_Q * H, D_V + D_R] (row r = s * H + h)
    kv_ptr: [B, N_MAX, D], or pages [NUM_PAGES, PAGE_SIZE, D] with table_ptr [B, MAX_BLOCKS] int32
            (indices clamped into [0, NUM_PAGES))
    seqlens_ptr: [B] int32, already clamped to [0, capacity]; cu_blocks_ptr, sched_ptr: see module doc.
    o_ptr [B, S_Q * H, D_V] (q's dtype), lse_ptr [B, S_Q * H]: sequences finished by this program.
    o_part_ptr [num_parts, 2, S_Q * H, D_V] float32, lse_part_ptr [num_parts, 2, S_Q * H]: pieces.
    LSE is natural-log; a row that sees no key gets lse -inf and output 0.
    """
    R: tl.constexpr = S_Q * H
    tile = tl.program_id(0)
    part = tl.program_id(1)
    part_blocks = tl.load(sched_ptr)
    total_blocks = tl.load(sched_ptr + 1)
    g_begin = part * part_blocks
    g_end = tl.minimum(g_begin + part_blocks, total_blocks)
    b = tl.load(sched_ptr + 2 + part)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < R
    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, D_V)
    offs_r = tl.arange(0, D_R)
    qk_scale = scale * 1.4426950408889634               # softmax in base 2

    g = g_begin
    while (g < g_end) & (b < B):
        seq_first = tl.load(cu_blocks_ptr + b)
        seq_end = tl.load(cu_blocks_ptr + b + 1)
        lo = g - seq_first                                  # this piece: blocks [lo, hi) of sequence b
        hi = tl.minimum(g_end, seq_end) - seq_first
        seqlen = tl.load(seqlens_ptr + b)
        if CAUSAL:
            limit = seqlen - S_Q + 1 + offs_m // H          # query s = r // H sees keys < limit
        else:
            limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
        q_base = q_ptr + (b.to(tl.int64) * R + offs_m[:, None]) * (D_V + D_R)
        q_v = tl.load(q_base + offs_v[None, :], mask=row_ok[:, None], other=0.0)
        q_r = tl.load(q_base + D_V + offs_r[None, :], mask=row_ok[:, None], other=0.0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
        for blk in tl.range(lo, hi):
            start = blk * BLOCK_N
            k_v, k_r = _load_latent_tile(kv_ptr, table_ptr, b, start, offs_n, offs_v, offs_r, seqlen,
                                         N_MAX, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V, D_R)
            s = tl.dot(q_v, tl.trans(k_v)) + tl.dot(q_r, tl.trans(k_r))
            s = s * qk_scale
            s = tl.where((start + offs_n)[None, :] < limit[:, None], s, float("-inf"))
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
        if (lo == 0) & (hi == seq_end - seq_first):          # the whole sequence: final output
            row = b.to(tl.int64) * R + offs_m
            tl.store(o_ptr + row[:, None] * D_V + offs_v[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
            tl.store(lse_ptr + row, lse, mask=row_ok)
        else:
            slot = tl.where(g == g_begin, 0, 1)
            row = (part.to(tl.int64) * 2 + slot) * R + offs_m
            tl.store(o_part_ptr + row[:, None] * D_V + offs_v[None, :], out, mask=row_ok[:, None])
            tl.store(lse_part_ptr + row, lse, mask=row_ok)
        g = seq_first + hi
        b += 1


@triton.jit
def mla_decode_combine_kernel(
    o_part_ptr, lse_part_ptr, cu_blocks_ptr, sched_ptr, o_in_ptr, lse_in_ptr,
    o_ptr, lse_ptr,
    R: tl.constexpr, D_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Finishes the sequences the split kernel did not: merges pieces by LSE, and writes 0 / -inf for
    empty sequences. Grid (cdiv(R, BLOCK_R), D_V // BLOCK_D, B).

    o_ptr / lse_ptr alias o_in_ptr / lse_in_ptr ([B, R, D_V], [B, R]): rows of sequences that one
    program finished are left as they are. Pieces: o_part_ptr [num_parts, 2, R, D_V] float32,
    lse_part_ptr [num_parts, 2, R]; the pieces of sequence b come from programs
    cu_blocks[b] // part_blocks .. (cu_blocks[b + 1] - 1) // part_blocks, in slot 0 when the program
    starts inside b, else slot 1.
    """
    b = tl.program_id(2)
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = offs_r < R
    seq_first = tl.load(cu_blocks_ptr + b)
    seq_end = tl.load(cu_blocks_ptr + b + 1)
    part_blocks = tl.load(sched_ptr)
    first_part = seq_first // part_blocks
    last_part = (seq_end - 1) // part_blocks
    out_rows = b.to(tl.int64) * R + offs_r
    if seq_end == seq_first:                                  # empty sequence: nothing visible
        tl.store(o_ptr + out_rows[:, None] * D_V + offs_d[None, :],
                 tl.zeros([BLOCK_R, BLOCK_D], dtype=o_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptr + out_rows, tl.full([BLOCK_R], float("-inf"), dtype=tl.float32),
                 mask=row_ok & (tl.program_id(1) == 0))
    elif first_part != last_part:                             # split: merge the pieces
        m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        w_sum = tl.zeros([BLOCK_R], dtype=tl.float32)
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for p in range(first_part, last_part + 1):
            slot = tl.where(p * part_blocks >= seq_first, 0, 1)
            rows = (p * 2 + slot).to(tl.int64) * R + offs_r
            lse_p = tl.load(lse_part_ptr + rows, mask=row_ok, other=float("-inf"))
            m_new = tl.maximum(m, lse_p)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            w = tl.exp(lse_p - m_safe)                        # a piece that saw no key weighs 0
            part_o = tl.load(o_part_ptr + rows[:, None] * D_V + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, part_o * w[:, None], 0.0)
            w_sum = w_sum * alpha + w
            m = m_new
        has_keys = w_sum > 0
        out = acc / tl.where(has_keys, w_sum, 1.0)[:, None]
        tl.store(o_ptr + out_rows[:, None] * D_V + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=row_ok[:, None])
        lse = tl.where(has_keys, m + tl.log(tl.where(has_keys, w_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + out_rows, lse, mask=row_ok & (tl.program_id(1) == 0))
