"""Split-KV (flash-decoding) MLA decode over the latent cache.

Absorbed MLA is multi-query attention with one KV head of width D_V + D_R (512 + 64) whose V is its first
D_V columns: each latent tile is loaded once, as a D_V part and a D_R part (nothing padded to 1024), and
the D_V part serves both as K and as V.

Stage 1 (`mla_decode_split_kernel`): one program takes BLOCK_M query rows (rows are (s, h) pairs of one
sequence, r = s * H + h) and one split of that sequence's keys, and runs the online softmax over it. A
sequence that takes one split gets its final output there; a split one gets float32 partials and their
LSE, merged by the last of its splits to finish (a few splits), or in place by
`mla_decode_combine_kernel` (many splits: one long sequence spread over the GPU). How many splits each
sequence takes (`_sequence_splits`) may depend on the lengths, which are data under jit.

Wide row tiles (BLOCK_M 64, 8 warps: many heads, several new tokens, chunked prefill) are bound by the
matrix units, and three options of the split kernel serve them (benchmarks/NOTES.md has the measurements):
UNCHAIN_SCORES (each warp group computes half of QK^T instead of both computing all of it),
SPLIT_MASKED (tiles every row sees whole run without masks; the diagonal and the ragged end with them)
and LATE_ROW_SUM (row sums kept per column and reduced once, after the loop).
"""
import triton
import triton.language as tl

from flashmla_jax.kernels._common import ALL_NEG_INF_LSE, LOG2E, row_divisor, row_lse
from flashmla_jax.kernels.fp8 import load_blockscale_tile, load_pertensor_tile

# KV_FORMAT: how the cache stores a latent token (flashmla_jax/fp8.py has the byte layouts)
KV_NATIVE = tl.constexpr(0)        # q's float dtype, D_V + D_R values
KV_BLOCKSCALE = tl.constexpr(1)    # "fp8_blockscale": uint8, 656 bytes (e4m3 c_kv, 4 float32 scales, bf16 k_pe)
KV_PERTENSOR = tl.constexpr(2)     # "fp8_pertensor": uint8, 576 e4m3 bytes, one float32 scale per cache (layer)


@triton.jit
def _sequence_splits(seqlens_ptr, b, CAPACITY: tl.constexpr, NUM_SPLITS: tl.constexpr,
                     UNIFORM_SPLITS: tl.constexpr, BALANCE: tl.constexpr, BATCH: tl.constexpr,
                     BATCH_POW2: tl.constexpr, SLOTS: tl.constexpr, ROW_TILES: tl.constexpr,
                     BLOCK_N: tl.constexpr, UNIFORM_NUM: tl.constexpr, UNIFORM_DEN: tl.constexpr):
    """(seqlen, splits) of sequence b: the schedule, computed alike by every split program.

    Lengths are clamped to [0, CAPACITY]. Without BALANCE every sequence takes NUM_SPLITS equal runs.
    With BALANCE, NUM_SPLITS is a cap and the lengths decide: a batch of (nearly) equal lengths keeps
    UNIFORM_SPLITS (the static choice, exact for it); a ragged batch has its key blocks, times the row
    tiles, cut into runs of about work / SLOTS blocks, so that a long sequence gets more splits than a
    short one and the GPU fills evenly. A batch counts as uniform when its mean key blocks reach
    UNIFORM_NUM / UNIFORM_DEN of its longest.
    """
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), CAPACITY)
    if BALANCE:
        offs_b = tl.arange(0, BATCH_POW2)
        lens = tl.minimum(tl.maximum(tl.load(seqlens_ptr + offs_b, mask=offs_b < BATCH, other=0), 0), CAPACITY)
        blocks_b = tl.cdiv(lens, BLOCK_N)
        total = tl.sum(blocks_b, 0)
        ragged = tl.max(blocks_b, 0) * BATCH * UNIFORM_NUM > total * UNIFORM_DEN
        run = tl.maximum(tl.cdiv(total * ROW_TILES, SLOTS), 1)       # key blocks per program
        blocks = tl.cdiv(seqlen, BLOCK_N)
        balanced = tl.minimum(tl.maximum(tl.cdiv(blocks, run), 1), NUM_SPLITS)
        splits = tl.where(ragged, balanced, UNIFORM_SPLITS)
    else:
        splits = tl.zeros_like(seqlen) + NUM_SPLITS
    return seqlen, splits


@triton.jit
def _unchained_sum(a, b, always):
    """a + b behind a branch on `always` (true at run time, unknown to the compiler).

    Triton lays out a dot whose result reaches another dot (QK^T reaching PV) with all warps along M:
    at BLOCK_M 64 and 8 warps both warp groups then compute the same 64-row scores, twice the QK^T
    work. The branch ends that data flow (a value yielded out of a region starts a new one), so QK^T
    gets the default layout: each warp group computes half of the key columns, and the softmax
    reduces rows across the two groups through shared memory.
    """
    if always:
        s = a + b
    else:
        s = a - b
    return s


@triton.jit
def _attend_tile(q_v, q_r, kv_ptr, kv_scale, b, start, hi, limit, m_i, l_i, acc, qk_scale, nonempty,
                 pages, offs_t, N_MAX: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 D_V: tl.constexpr, D_R: tl.constexpr, BLOCK_N: tl.constexpr, UNCHAIN_SCORES: tl.constexpr,
                 LATE_ROW_SUM: tl.constexpr, MASKED: tl.constexpr, KV_FORMAT: tl.constexpr,
                 FP8_NATIVE: tl.constexpr):
    """One online-softmax step over keys [start, start + BLOCK_N) of sequence b: (m_i, l_i, acc) updated.

    q_v [BLOCK_M, D_V], q_r [BLOCK_M, D_R]; m_i [BLOCK_M]; l_i [BLOCK_M], or [BLOCK_M, BLOCK_N] column
    partial sums with LATE_ROW_SUM (one cross-warp reduction per tile fewer; the caller sums them after
    the loop); acc [BLOCK_M, D_V] float32. `nonempty` is lo < hi, true whenever this runs.
    MASKED: keys >= hi are not loaded and keys >= a row's causal `limit` are dropped; without it the
    caller guarantees that every row sees the whole tile (no masks, no -inf rows).
    KV_FORMAT: an FP8 cache's tile is dequantized to q's dtype on load (kernels/fp8.py; FP8_NATIVE picks
    the hardware e4m3 conversion or the exact bit arithmetic), kv_scale is the per-tensor scale
    (KV_PERTENSOR; unused otherwise); the products are then the same as for a cache in q's dtype."""
    D: tl.constexpr = D_V + D_R
    offs_n = tl.arange(0, BLOCK_N)
    tokens = start + offs_n
    if PAGED:
        page = tl.sum(tl.where(offs_t == start // PAGE_SIZE, pages, 0), 0).to(tl.int64)
        kv_rows = page * PAGE_SIZE + (start % PAGE_SIZE) + offs_n
    else:
        kv_rows = b.to(tl.int64) * N_MAX + tokens
    if KV_FORMAT == KV_BLOCKSCALE:
        k_v, k_r = load_blockscale_tile(kv_ptr, kv_rows, tokens < hi, D_V, D_R, q_v.dtype, FP8_NATIVE, MASKED)
    elif KV_FORMAT == KV_PERTENSOR:
        k_v, k_r = load_pertensor_tile(kv_ptr, kv_rows, tokens < hi, kv_scale, D_V, D_R, q_v.dtype, FP8_NATIVE,
                                       MASKED)
    else:
        base = kv_ptr + kv_rows[:, None] * D
        offs_v = tl.arange(0, D_V)
        offs_r = tl.arange(0, D_R)
        if MASKED:
            valid = (tokens < hi)[:, None]
            k_v = tl.load(base + offs_v[None, :], mask=valid, other=0.0)
            k_r = tl.load(base + D_V + offs_r[None, :], mask=valid, other=0.0)
        else:
            k_v = tl.load(base + offs_v[None, :])
            k_r = tl.load(base + D_V + offs_r[None, :])
    s = latent_scores(q_v, q_r, k_v, k_r, qk_scale, nonempty, UNCHAIN_SCORES)
    if MASKED:
        s = tl.where(tokens[None, :] < limit[:, None], s, float("-inf"))
    return softmax_update(s, k_v, m_i, l_i, acc, LATE_ROW_SUM, MASKED)


@triton.jit
def latent_scores(q_v, q_r, k_v, k_r, qk_scale, nonempty, UNCHAIN_SCORES: tl.constexpr):
    """Base-2 scores [BLOCK_M, BLOCK_N] of queries (q_v, q_r) against a latent tile (k_v, k_r): (q_v k_vᵀ +
    q_r k_rᵀ) * qk_scale. UNCHAIN_SCORES: summed behind `_unchained_sum` (nonempty true at run time)."""
    if UNCHAIN_SCORES:
        # Both products issued before either is read, so the second does not wait for the first.
        s_v = tl.dot(q_v, tl.trans(k_v))
        s_r = tl.dot(q_r, tl.trans(k_r))
        s = _unchained_sum(s_v * qk_scale, s_r * qk_scale, nonempty)
    else:
        s = (tl.dot(q_v, tl.trans(k_v)) + tl.dot(q_r, tl.trans(k_r))) * qk_scale
    return s


@triton.jit
def softmax_update(s, k_v, m_i, l_i, acc, LATE_ROW_SUM: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step: scores s [BLOCK_M, BLOCK_N] (base 2; -inf where masked) meet the values
    k_v [BLOCK_N, D_V]; returns (m_i, l_i, acc) updated (l_i per column with LATE_ROW_SUM). MASKED: rows may
    have seen nothing yet (m_i -inf), which must not turn into NaN."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # rows with nothing visible yet
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if LATE_ROW_SUM:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(k_v.dtype), k_v)
    return m_new, l_i, acc


@triton.jit
def mla_decode_split_kernel(
    q_ptr, kv_ptr, seqlens_ptr, table_ptr, layer_ptr, kv_scale_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr,
    H: tl.constexpr, S_Q: tl.constexpr, N_MAX: tl.constexpr, NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
    TABLE_POW2: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr, CAUSAL: tl.constexpr,
    CAPACITY: tl.constexpr, NUM_SPLITS: tl.constexpr, UNIFORM_SPLITS: tl.constexpr, BALANCE: tl.constexpr,
    BATCH: tl.constexpr, BATCH_POW2: tl.constexpr, SLOTS: tl.constexpr, ROW_TILES: tl.constexpr,
    UNIFORM_NUM: tl.constexpr, UNIFORM_DEN: tl.constexpr,
    LAST_MERGES: tl.constexpr, SPLITS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UNCHAIN_SCORES: tl.constexpr, SPLIT_MASKED: tl.constexpr, LATE_ROW_SUM: tl.constexpr,
    KV_FORMAT: tl.constexpr, FP8_NATIVE: tl.constexpr, ROW_RULES: tl.constexpr,
):
    """Grid (ROW_TILES = cdiv(S_Q * H, BLOCK_M), B, NUM_SPLITS). The row tile is the fastest axis, so the
    row tiles of one split run side by side and share each latent tile through L2; the split is the
    slowest, so every sequence's first run starts in the first wave and the programs of splits a
    sequence does not take (empty: lo >= hi) come last and exit at once.

    q_ptr:  [B, S_Q * H, D_V + D_R]        kv_ptr: [B, N_MAX, D] or pages [NUM_PAGES, PAGE_SIZE, D]; with
      NUM_LAYERS > 0 a layer-stacked cache [NUM_LAYERS, ...] of LAYER_STRIDE elements per layer, read at
      layer_ptr (a 0-d int32, clamped to [0, NUM_LAYERS)) in place: no slice of it exists.
      KV_FORMAT KV_NATIVE: D = D_V + D_R values of q's dtype; KV_BLOCKSCALE / KV_PERTENSOR: D is the
      format's bytes per token (656 / 576) and kv_ptr is uint8 (LAYER_STRIDE then counts bytes)
    kv_scale_ptr: KV_PERTENSOR: the float32 scale, 0-d, or [NUM_LAYERS] (one per layer) with NUM_LAYERS > 0,
      loaded once; otherwise never read
    FP8_NATIVE: e4m3 through the hardware conversion (GPU) or exact bit arithmetic (the interpreter)
    seqlens_ptr: [B] int32 (clamped to [0, CAPACITY]; negative counts as 0)
    table_ptr: [B, MAX_BLOCKS] int32 when PAGED (indices clamped to [0, NUM_PAGES)); TABLE_POW2 >= MAX_BLOCKS
    o_ptr [B, S_Q * H, D_V] in q's dtype and lse_ptr [B, S_Q * H] float32: the result;
    o_part_ptr [B, NUM_SPLITS, S_Q * H, D_V] and lse_part_ptr [B, NUM_SPLITS, S_Q * H] float32: the
      partials of a sequence that takes more than one split (`_sequence_splits`).
    Partials are merged by the last split of a (sequence, row tile) to finish (LAST_MERGES: count_ptr
      [B * ROW_TILES] int32, zeroed, counts arrivals), or else by `mla_decode_combine_kernel`, which
      reads splits_ptr [B] int32, the splits each sequence took. Neither is used when NUM_SPLITS == 1.
    LSE is natural-log; a row that sees no key in its range gets lse -inf and output 0. ROW_RULES: the row
      rules of `_write_split` (a NaN reaching a row's output makes the row NaN; keys seen but all scores -inf give
      NaN output and ALL_NEG_INF_LSE), which the merges keep.
    Tile rules (ops/decode.py's plans keep them): BLOCK_M, BLOCK_N, D_V and D_R powers of two >= 16; paged,
    BLOCK_N <= PAGE_SIZE (a power of two), so that a key tile lies in one page; the *_POW2 sizes powers of two
    at least what they cover.
    """
    tl.static_assert(BLOCK_M >= 16 and (BLOCK_M & (BLOCK_M - 1)) == 0, "BLOCK_M must be a power of two >= 16")
    tl.static_assert(BLOCK_N >= 16 and (BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_N must be a power of two >= 16")
    tl.static_assert(D_V >= 16 and (D_V & (D_V - 1)) == 0 and D_R >= 16 and (D_R & (D_R - 1)) == 0,
                     "D_V and D_R must be powers of two >= 16")
    tl.static_assert(not PAGED or (BLOCK_N <= PAGE_SIZE and (PAGE_SIZE & (PAGE_SIZE - 1)) == 0),
                     "paged: BLOCK_N <= PAGE_SIZE, a power of two (a key tile lies in one page)")
    tl.static_assert(TABLE_POW2 >= MAX_BLOCKS and (TABLE_POW2 & (TABLE_POW2 - 1)) == 0,
                     "TABLE_POW2 must be a power of two >= MAX_BLOCKS")
    tl.static_assert(SPLITS_POW2 >= NUM_SPLITS and (SPLITS_POW2 & (SPLITS_POW2 - 1)) == 0,
                     "SPLITS_POW2 must be a power of two >= NUM_SPLITS")
    tl.static_assert(BATCH_POW2 >= BATCH and (BATCH_POW2 & (BATCH_POW2 - 1)) == 0,
                     "BATCH_POW2 must be a power of two >= BATCH")
    R: tl.constexpr = S_Q * H
    if NUM_LAYERS > 0:
        layer = tl.minimum(tl.maximum(tl.load(layer_ptr), 0), NUM_LAYERS - 1)
        kv_ptr += layer.to(tl.int64) * LAYER_STRIDE
        if KV_FORMAT == KV_PERTENSOR:
            kv_scale_ptr += layer
    kv_scale = 1.0
    if KV_FORMAT == KV_PERTENSOR:
        kv_scale = tl.load(kv_scale_ptr)
    tile = tl.program_id(0)
    b = tl.program_id(1)
    split = tl.program_id(2)

    seqlen, splits_here = _sequence_splits(seqlens_ptr, b, CAPACITY, NUM_SPLITS, UNIFORM_SPLITS, BALANCE, BATCH,
                                           BATCH_POW2, SLOTS, ROW_TILES, BLOCK_N, UNIFORM_NUM, UNIFORM_DEN)
    if NUM_SPLITS > 1:
        if split >= splits_here:
            return      # past this sequence's splits (a cap the lengths did not need): nothing to read or write
    lo, hi, offs_m, limit = _split_keys(seqlen, splits_here, split, tile, H, S_Q, CAUSAL, BLOCK_M, BLOCK_N)
    row_ok = offs_m < R
    offs_v = tl.arange(0, D_V)
    offs_r = tl.arange(0, D_R)
    q_v, q_r = _load_queries(q_ptr, b, offs_m, row_ok, lo < hi, offs_v, offs_r, R, D_V, D_R)
    qk_scale = scale * LOG2E                             # softmax in base 2

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    if LATE_ROW_SUM:
        l_i = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    pages, offs_t, first_bad = _table_row(table_ptr, b, PAGED, MAX_BLOCKS, NUM_PAGES, TABLE_POW2)
    mid = lo
    if SPLIT_MASKED:
        # Tiles below every row's causal limit and wholly inside [lo, hi) run without masks; the rest
        # (the diagonal, the last partial tile) in the masked loop below.
        clear = tl.minimum(hi, tl.min(limit, 0))
        mid = lo + tl.maximum(clear - lo, 0) // BLOCK_N * BLOCK_N
        for start in tl.range(lo, mid, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q_v, q_r, kv_ptr, kv_scale, b, start, hi, limit, m_i, l_i, acc, qk_scale,
                                         lo < hi, pages, offs_t, N_MAX, PAGED, PAGE_SIZE, D_V, D_R, BLOCK_N,
                                         UNCHAIN_SCORES, LATE_ROW_SUM, False, KV_FORMAT, FP8_NATIVE)
    for start in tl.range(mid, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q_v, q_r, kv_ptr, kv_scale, b, start, hi, limit, m_i, l_i, acc, qk_scale,
                                     lo < hi, pages, offs_t, N_MAX, PAGED, PAGE_SIZE, D_V, D_R, BLOCK_N,
                                     UNCHAIN_SCORES, LATE_ROW_SUM, True, KV_FORMAT, FP8_NATIVE)

    if LATE_ROW_SUM:
        l_i = tl.sum(l_i, 1)
    reads_bad_entry = offs_m < 0                         # never, without a block table
    if PAGED:
        reads_bad_entry = first_bad * PAGE_SIZE < limit
    _write_split(o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr, acc, m_i, l_i, b, tile, split,
                 splits_here, lo < hi, offs_m, offs_v, row_ok, R, D_V, NUM_SPLITS, SPLITS_POW2, ROW_TILES, LAST_MERGES,
                 ROW_RULES, (lo < hi) & (lo < limit), reads_bad_entry)


@triton.jit
def _split_keys(seqlen, splits_here, split, tile, H: tl.constexpr, S_Q: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, hi, offs_m, limit): keys [lo, hi) of this split for the rows offs_m [BLOCK_M] of row tile
    `tile`, and each row's causal limit [BLOCK_M] (query s = r // H sees keys < limit)."""
    # Each split covers a run of whole BLOCK_N tiles; a split past the last run is empty (lo >= hi).
    split_len = tl.cdiv(tl.cdiv(seqlen, BLOCK_N), splits_here) * BLOCK_N
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if CAUSAL:
        limit = seqlen - S_Q + 1 + offs_m // H
        # Keys past the tile's last query are masked for every row: not visited.
        hi = tl.minimum(hi, seqlen - S_Q + 1 + (tl.minimum(tile * BLOCK_M + BLOCK_M, S_Q * H) - 1) // H)
    else:
        limit = tl.zeros([BLOCK_M], dtype=tl.int32) + seqlen
    return lo, hi, offs_m, limit


@triton.jit
def _load_queries(q_ptr, b, offs_m, row_ok, nonempty, offs_v, offs_r, R: tl.constexpr, D_V: tl.constexpr,
                  D_R: tl.constexpr):
    """Rows offs_m of sequence b's queries, columns offs_v and D_V + offs_r: q_v [BLOCK_M, D_V] and
    q_r [BLOCK_M, D_R]; zeros where row_ok is false or the split is empty (not `nonempty`)."""
    D: tl.constexpr = D_V + D_R
    q_base = q_ptr + (b.to(tl.int64) * R + offs_m[:, None]) * D
    q_ok = row_ok[:, None] & nonempty
    q_v = tl.load(q_base + offs_v[None, :], mask=q_ok, other=0.0)
    q_r = tl.load(q_base + D_V + offs_r[None, :], mask=q_ok, other=0.0)
    return q_v, q_r


@triton.jit
def _table_row(table_ptr, b, PAGED: tl.constexpr, MAX_BLOCKS: tl.constexpr, NUM_PAGES: tl.constexpr,
               TABLE_POW2: tl.constexpr):
    """(pages, offs_t, first_bad): sequence b's row of the block table [TABLE_POW2], indices clamped to the pool,
    and the first of its blocks whose entry lies outside the pool (TABLE_POW2 where none does; a row that sees
    keys at or past first_bad * PAGE_SIZE would read it: the row rules make it NaN)."""
    if PAGED:
        # In registers: each tile's address is then a function of the loop index alone, which Triton's
        # pipeliner stages ahead like a contiguous load (a table load inside the loop it does not
        # pipeline). A tile lies in one page (BLOCK_N <= PAGE_SIZE).
        offs_t = tl.arange(0, TABLE_POW2)
        pages = tl.load(table_ptr + b * MAX_BLOCKS + offs_t, mask=offs_t < MAX_BLOCKS, other=0)
        outside = (offs_t < MAX_BLOCKS) & ((pages < 0) | (pages >= NUM_PAGES))
        first_bad = tl.min(tl.where(outside, offs_t, TABLE_POW2), 0)
        pages = tl.minimum(tl.maximum(pages, 0), NUM_PAGES - 1)
    else:
        offs_t = tl.arange(0, 2)                        # unused without a block table
        pages = offs_t
        first_bad = TABLE_POW2                          # unused without a block table
    return pages, offs_t, first_bad


@triton.jit
def _write_split(o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr, acc, m_i, l_i, b, tile, split,
                 splits_here, nonempty, offs_m, offs_v, row_ok, R: tl.constexpr, D_V: tl.constexpr,
                 NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, ROW_TILES: tl.constexpr,
                 LAST_MERGES: tl.constexpr, ROW_RULES: tl.constexpr, saw_keys, reads_bad_entry):
    """The split kernel's epilogue: a sequence's only split writes the result; a split one writes its
    partial (skipped when empty) and LSE, and with LAST_MERGES the last of them to arrive merges all.

    ROW_RULES (saw_keys [BLOCK_M]: the row has keys in this split; reads_bad_entry [BLOCK_M]: its visible keys
    reach a block-table entry outside the pool): a NaN anywhere in a row's accumulator (0 · inf from an infinite
    value under a zero probability), or a bad entry, makes its row sum NaN, so its output and LSE are NaN; a row
    that saw keys but gave them no weight (every score -inf) gets NaN output and LSE ALL_NEG_INF_LSE."""
    if ROW_RULES:
        nan_in_row = tl.max(tl.where(acc != acc, 1, 0), 1) > 0
        l_i = tl.where(nan_in_row | reads_bad_entry, float("nan"), l_i)
    out = acc / row_divisor(l_i)[:, None]
    lse = row_lse(m_i, l_i)
    if ROW_RULES:
        unweighted = saw_keys & (l_i == 0)
        out = tl.where(unweighted[:, None], float("nan"), out)
        lse = tl.where(unweighted, ALL_NEG_INF_LSE, lse)
    offs_m64 = offs_m.to(tl.int64)
    final = row_ok & (splits_here == 1) & (split == 0)
    row = b.to(tl.int64) * R + offs_m64
    tl.store(o_ptr + row[:, None] * D_V + offs_v[None, :], out.to(o_ptr.dtype.element_ty), mask=final[:, None])
    tl.store(lse_ptr + row, lse, mask=final)
    if NUM_SPLITS > 1:
        taken = (splits_here > 1) & (split < splits_here)
        partial = row_ok & taken
        row = (b.to(tl.int64) * NUM_SPLITS + split) * R + offs_m64
        # An empty split (lse -inf) is never read by a merge: skip its 0 partial.
        tl.store(o_part_ptr + row[:, None] * D_V + offs_v[None, :], out, mask=(partial & nonempty)[:, None])
        tl.store(lse_part_ptr + row, lse, mask=partial)
        if LAST_MERGES:
            # The last split of a (sequence, row tile) to finish merges all of them: no combine launch.
            # The barrier puts every thread's partial stores before the release of the count.
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + b * ROW_TILES + tile, 1, mask=taken, sem="acq_rel", scope="gpu")
            if taken & (arrived == splits_here - 1):
                _merge_partials(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, b, offs_m64, row_ok, offs_v, splits_here,
                                R, D_V, NUM_SPLITS, SPLITS_POW2)
        else:
            tl.store(splits_ptr + b, splits_here, mask=(tile == 0) & (split == 0))


@triton.jit
def _split_weights(lse_s):
    """Merge weights of split partials from their LSE, reduced over axis 0 (the splits): (w, lse) with
    w normalized (an empty split, lse -inf, weighs 0) and lse the merged natural-log LSE (-inf when no
    split saw a key). A NaN LSE makes every weight and the LSE NaN: the max (a maxnum) skips it, the sum does
    not, so the sum decides."""
    lse_max = tl.max(lse_s, 0)
    lse_max_safe = tl.where(lse_max != float("-inf"), lse_max, 0.0)
    w = tl.exp(lse_s - lse_max_safe)                 # broadcasts over axis 0
    total = tl.sum(w, 0)                             # 0 only when no split saw a key
    has_keys = total != 0
    w_sum = tl.where(has_keys, total, 1.0)
    lse = tl.where(has_keys, lse_max_safe + tl.log(w_sum), float("-inf"))
    return w / w_sum, lse


@triton.jit
def _merge_partials(o_part_ptr, lse_part_ptr, o_ptr, lse_ptr, b, offs_m64, row_ok, offs_v, splits_here,
                    R: tl.constexpr, D_V: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr):
    """Writes the LSE-weighted merge of splits [0, splits_here) of rows offs_m64 of sequence b to o_ptr /
    lse_ptr: every split's LSE in one [SPLITS_POW2, rows] load, then one full-width partial per split.
    Loads go to L2 (.cg): other programs wrote these partials."""
    offs_s = tl.arange(0, SPLITS_POW2)
    split_rows = (b.to(tl.int64) * NUM_SPLITS + offs_s[:, None]) * R + offs_m64[None, :]      # [S, M]
    lse_s = tl.load(lse_part_ptr + split_rows, mask=(offs_s < splits_here)[:, None] & row_ok[None, :],
                    other=float("-inf"), cache_modifier=".cg")
    w, lse = _split_weights(lse_s)                              # an empty split weighs 0 and is not read
    acc = tl.zeros([offs_m64.shape[0], D_V], dtype=tl.float32)
    for s in range(0, splits_here):
        w_s = tl.sum(tl.where(offs_s[:, None] == s, w, 0.0), 0)
        rows = (b.to(tl.int64) * NUM_SPLITS + s) * R + offs_m64
        part = tl.load(o_part_ptr + rows[:, None] * D_V + offs_v[None, :], mask=(row_ok & (w_s > 0))[:, None],
                       other=0.0, cache_modifier=".cg")
        acc += part * w_s[:, None]
    final_rows = b.to(tl.int64) * R + offs_m64
    tl.store(o_ptr + final_rows[:, None] * D_V + offs_v[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(lse_ptr + final_rows, lse, mask=row_ok)


@triton.jit
def mla_decode_combine_kernel(
    o_part_ptr, lse_part_ptr, splits_ptr, o_in_ptr, lse_in_ptr,
    o_ptr, lse_ptr,
    R: tl.constexpr, D_V: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merges the partials of split sequences by their LSE. Grid (R, D_V // BLOCK_D, B): one row and
    BLOCK_D columns per program, all splits loaded as one [SPLITS_POW2, BLOCK_D] tile (no loop over
    splits, so a single long sequence with hundreds of splits still spreads over the whole GPU).

    o_part_ptr [B, NUM_SPLITS, R, D_V] float32, lse_part_ptr [B, NUM_SPLITS, R] float32 (-inf: empty split),
    splits_ptr [B] int32 (the split kernel's count per sequence).
    o_in_ptr / lse_in_ptr are the split kernel's outputs, aliased to o_ptr [B, R, D_V] / lse_ptr [B, R]:
    rows of a sequence that took one split already hold their result and are left alone.
    A row with no key gives 0 and -inf.
    """
    tl.static_assert(D_V % BLOCK_D == 0 and (BLOCK_D & (BLOCK_D - 1)) == 0,
                     "BLOCK_D must be a power of two dividing D_V")
    tl.static_assert(SPLITS_POW2 >= NUM_SPLITS and (SPLITS_POW2 & (SPLITS_POW2 - 1)) == 0,
                     "SPLITS_POW2 must be a power of two >= NUM_SPLITS")
    r = tl.program_id(0)
    d_tile = tl.program_id(1)
    b = tl.program_id(2)
    splits_here = tl.load(splits_ptr + b)
    if splits_here <= 1:
        return      # the split kernel wrote this sequence's result
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    split_ok = offs_s < splits_here
    part_rows = (b.to(tl.int64) * NUM_SPLITS + offs_s) * R + r                         # [S]
    lse_s = tl.load(lse_part_ptr + part_rows, mask=split_ok, other=float("-inf"))
    w, lse = _split_weights(lse_s)                                  # empty splits weigh 0
    # An empty split's partial is 0 with weight 0; it is not loaded, so garbage never meets a zero weight.
    use = split_ok & (w > 0)
    part = tl.load(o_part_ptr + part_rows[:, None] * D_V + offs_d[None, :], mask=use[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    out_row = b.to(tl.int64) * R + r
    tl.store(o_ptr + out_row * D_V + offs_d, out.to(o_ptr.dtype.element_ty))
    tl.store(lse_ptr + out_row, lse, mask=d_tile == 0)
