"""The lightning indexer of DeepSeek Sparse Attention: index scores over a paged key cache, and an exact top-k
that returns pool indices.

    index_score[r, t] = Σ_h w[r, h] · relu(q[r, h, :] · k[t, :])      (r = b * S_Q + s, a query row; D = 128)

over the causal prefix of each query (t < limit = seqlen - S_Q + s + 1), -inf past it. The keys are bf16 / fp16 /
fp32 [num_blocks, PAGE_SIZE, 128], or FP8 in DeepGEMM's paged layout (uint8 [num_blocks, PAGE_SIZE * 132]: a
page's PAGE_SIZE × 128 e4m3 values, then its PAGE_SIZE float32 scales; flashmla_jax/fp8.py). A contiguous
cache is the same with one page of CAPACITY tokens per sequence.

Scores (`indexer_scores_kernel`): one program takes QG query rows of one sequence (QG · H dot columns) and SPLIT
keys, in tiles of BLOCK_N: S = K_tile · Qᵀ ([BLOCK_N, QG · H], keys as the dot's M so that the head sum runs
along its N axis, mostly inside each thread), relu, times w, summed over the H heads of each query. With FP8
keys the queries are FP8 too (DeepSeek's design: one scale per (token, head), folded into w by the caller; one
scale per key, applied after the head sum): e4m3 × e4m3 products are exact in float32, so the FP8 path differs
from the dequantized reference only by the order of float32 additions. FP8_NATIVE: Hopper's FP8 tl.dot; else
(the interpreter) both operands are decoded to bfloat16 exactly (every e4m3 value is a bfloat16) and multiplied
there, which gives the same products.

Top-k: an exact radix select over the float32 scores, written to HBM by the score kernel. Why materialise them:
at S_Q = 1 they are 4 bytes a key against the 256 (bf16) or 132 (FP8) bytes of the key itself (I1: 34 MB next
to 2.1 / 1.1 GB of keys), small enough to stay mostly in L2 for the passes that follow; a per-program partial
top-k does not shrink them (a program's 4096 keys keep their best 2048: as many candidates as the scores), and a
streaming top-k in registers needs a bitonic sort per tile, O(n log² n) work the score kernel has no time for.
The ops cut long query runs (prefill) into chunks, so the scores never take more than a bounded buffer.

Scores are ranked as uint32 order keys (`order_keys`: the unsigned order of the keys is the order of the scores;
-0.0 counts as +0.0 and every NaN as one NaN above +inf) and the k-th largest key T is found one digit at a time,
11 + 11 + 10 bits, from histograms in HBM filled with relaxed atomics:

1. digit 1 (key >> 21) of every visible score, counted by the score kernel itself (HIST), as it writes them;
2. `indexer_topk_refine_kernel` LEVEL 2: scores whose digit 1 is T's (found from histogram 1 by a suffix sum,
   in every program) have their digit 2 counted; LEVEL 3: digit 3 of those matching T's first 22 bits;
3. `indexer_topk_count_kernel`: per CHUNK of each row, how many keys are > T and how many == T;
4. `indexer_topk_write_kernel`: each chunk's output offset from the counts of the chunks before it; keys > T are
   taken, and of those == T the k_eq of lowest position (ties: lower position first). Indices come out in
   ascending position order, -1 in the slots no key fills (fewer than TOPK visible).

After each histogram, `indexer_topk_threshold_kernel` (one program a row) turns the row's histograms into the
threshold so far (the first LEVEL digits of T and the rank within that bucket) and the passes after it read two
integers a row: a per-(row, chunk) program deriving it again cost three 2048-bin scans each, which dominated the
passes' time on the H200. A row with at most TOPK visible keys takes all of them and skips the histograms.
"""
import triton
import triton.language as tl

from flashmla_jax.kernels.fp8 import e4m3_to_float32

KEY_DIM = tl.constexpr(128)
# Radix digits of the order keys: bits 31..21, 20..10, 9..0.
BINS1 = tl.constexpr(2048)
BINS2 = tl.constexpr(2048)
BINS3 = tl.constexpr(1024)
SHIFT1 = tl.constexpr(21)
SHIFT2 = tl.constexpr(10)


@triton.jit
def order_keys(s):
    """float32 scores -> uint32 keys, unsigned order = score order; -0.0 as +0.0, NaN (any) above +inf."""
    bits = s.to(tl.uint32, bitcast=True)
    magnitude = bits & 0x7FFFFFFF            # tested as bits: a subnormal is not flushed to zero
    bits = tl.where(magnitude == 0, 0, bits)
    bits = tl.where(magnitude > 0x7F800000, 0x7FC00000, bits)
    return tl.where((bits >> 31) == 1, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def _row_limit(seqlens_ptr, r, q_offset, S_Q: tl.constexpr, S_TOTAL: tl.constexpr, CAPACITY: tl.constexpr):
    """Keys visible to query row r (= b * S_Q + s of this launch; the query is s + q_offset of S_TOTAL)."""
    b = r // S_Q
    s = r % S_Q + q_offset
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), CAPACITY)
    return tl.maximum(seqlen - S_TOTAL + s + 1, 0)


@triton.jit
def _tile_rows(start, offs_n, b, pages, offs_t, first_page, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
               BLOCK_N: tl.constexpr):
    """(block [BLOCK_N] int64, slot [BLOCK_N]) of keys start + offs_n: their page in the pool and place in it.
    pages [TABLE_TILE]: the split's block-table entries from page first_page on (PAGED); else one page per
    sequence, block b."""
    tokens = start + offs_n
    if PAGED:
        if PAGE_SIZE >= BLOCK_N:
            page = tl.sum(tl.where(offs_t == (start // PAGE_SIZE - first_page), pages, 0), 0)
            blk = tl.zeros((BLOCK_N,), tl.int64) + page.to(tl.int64)
        else:
            blk = tl.zeros((BLOCK_N,), tl.int64)
            for j in tl.static_range(BLOCK_N // PAGE_SIZE):
                page_j = tl.sum(tl.where(offs_t == (start // PAGE_SIZE + j - first_page), pages, 0), 0)
                blk = tl.where(offs_n // PAGE_SIZE == j, page_j.to(tl.int64), blk)
        slot = tokens % PAGE_SIZE
    else:
        blk = tl.zeros((BLOCK_N,), tl.int64) + b.to(tl.int64)
        slot = tokens
    return blk, slot


@triton.jit
def _load_scales(k_ptr, blk, slot, valid, PAGE_SIZE: tl.constexpr, D: tl.constexpr):
    """The float32 scales of keys (blk, slot) of an "fp8_paged" cache (after a page's PAGE_SIZE * D codes); 0
    where not valid."""
    ptr = (k_ptr + blk * (PAGE_SIZE * (D + 4)) + PAGE_SIZE * D + slot * 4).to(tl.pointer_type(tl.float32))
    return tl.load(ptr, mask=valid, other=0.0)


@triton.jit
def indexer_scores_kernel(q_ptr, w_ptr, k_ptr, seqlens_ptr, table_ptr, layer_ptr, q_offset, scores_ptr, hist_ptr,
                          S_Q: tl.constexpr, S_TOTAL: tl.constexpr, H: tl.constexpr, QG: tl.constexpr,
                          NUM_GROUPS: tl.constexpr, CAPACITY: tl.constexpr, SPLIT: tl.constexpr,
                          BLOCK_N: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                          MAX_BLOCKS: tl.constexpr, NUM_BLOCKS: tl.constexpr, NUM_LAYERS: tl.constexpr,
                          LAYER_STRIDE: tl.constexpr, FP8: tl.constexpr, FP8_NATIVE: tl.constexpr,
                          FP8_ACC_DEPTH: tl.constexpr, HIST: tl.constexpr, TOPK: tl.constexpr):
    """Scores of QG queries of one sequence against SPLIT keys; grid (B * NUM_GROUPS, cdiv(CAPACITY, SPLIT)).

    q_ptr [B, S_Q, H, 128] (float, or e4m3 bytes with FP8); w_ptr [B, S_Q, H] float32 (with FP8: w times the
    query's scale); k_ptr: the key cache (module docstring; PAGE_SIZE = CAPACITY when not PAGED), uint8 with FP8;
    seqlens_ptr [B] int32 (clamped to [0, CAPACITY]); table_ptr [B, MAX_BLOCKS] int32 (PAGED; entries clamped
    into [0, NUM_BLOCKS)); layer_ptr: 0-d int32 layer of a stack of NUM_LAYERS caches LAYER_STRIDE elements
    apart (NUM_LAYERS 0: not stacked); q_offset: index of this launch's query 0 among S_TOTAL; FP8_ACC_DEPTH:
    e4m3 products summed in the FP8 wgmma's reduced-precision adder before each float32 promotion.
    scores_ptr [B * S_Q, CAPACITY] float32: every slot written, -inf past each query's limit.
    hist_ptr [B * S_Q, BINS1] int32, zeroed (HIST): digit-1 counts of the visible scores of rows with more
    than TOPK visible keys.
    """
    D: tl.constexpr = KEY_DIM
    R: tl.constexpr = QG * H
    pid = tl.program_id(0)
    b = pid // NUM_GROUPS
    s0 = (pid % NUM_GROUPS) * QG
    lo = tl.program_id(1) * SPLIT
    split_end = tl.minimum(lo + SPLIT, CAPACITY)

    if NUM_LAYERS > 0:
        layer = tl.minimum(tl.maximum(tl.load(layer_ptr), 0), NUM_LAYERS - 1)
        k_ptr += layer.to(tl.int64) * LAYER_STRIDE
    seqlen = tl.minimum(tl.maximum(tl.load(seqlens_ptr + b), 0), CAPACITY)
    offs_g = tl.arange(0, QG)
    s_idx = s0 + offs_g                                                   # [QG] this launch's query index
    in_launch = s_idx < S_Q
    limits = tl.where(in_launch, tl.maximum(seqlen - S_TOTAL + s_idx + q_offset + 1, 0), 0)
    hi = tl.max(limits, 0)
    rows = b * S_Q + s_idx                                                # [QG] score rows

    # The query tile [R, D]: row i is head i % H of query s0 + i // H.
    offs_r = tl.arange(0, R)
    q_rows = (b * S_Q + s0 + offs_r // H) * H + offs_r % H
    q_valid = (s0 + offs_r // H) < S_Q
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + q_rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=q_valid[:, None], other=0)
    w = tl.load(w_ptr + q_rows, mask=q_valid, other=0.0)
    if FP8:
        if FP8_NATIVE:
            q = q.to(tl.float8e4nv, bitcast=True)
        else:
            q = e4m3_to_float32(q, False).to(tl.bfloat16)
    q_t = tl.trans(q)

    offs_n = tl.arange(0, BLOCK_N)
    end = tl.minimum(split_end, hi)
    if PAGED:
        # The split's block-table entries, loaded once: each tile picks its pages from registers (a per-tile
        # table load in front of the key load would keep the pipeliner from staging the key tiles).
        TABLE_TILE: tl.constexpr = SPLIT // PAGE_SIZE if SPLIT > PAGE_SIZE else 1
        first_page = lo // PAGE_SIZE
        offs_t = tl.arange(0, TABLE_TILE)
        pages = tl.load(table_ptr + b * MAX_BLOCKS + first_page + offs_t, mask=first_page + offs_t < MAX_BLOCKS,
                        other=0)
        pages = tl.minimum(tl.maximum(pages, 0), NUM_BLOCKS - 1)
    else:
        first_page = 0
        offs_t = tl.arange(0, 1)
        pages = offs_t
    if FP8:
        # A key's scale is applied after the head sum: loaded one tile ahead, it does not wait in the loop.
        blk, slot = _tile_rows(lo, offs_n, b, pages, offs_t, first_page, PAGED, PAGE_SIZE, BLOCK_N)
        k_scale = _load_scales(k_ptr, blk, slot, lo + offs_n < end, PAGE_SIZE, D)
    for start in range(lo, end, BLOCK_N):
        tokens = start + offs_n
        valid = tokens < end
        blk, slot = _tile_rows(start, offs_n, b, pages, offs_t, first_page, PAGED, PAGE_SIZE, BLOCK_N)
        if FP8:
            codes = tl.load(k_ptr + (blk * (PAGE_SIZE * (D + 4)) + slot * D)[:, None] + offs_d[None, :],
                            mask=valid[:, None], other=0)
            this_scale = k_scale
            next_blk, next_slot = _tile_rows(start + BLOCK_N, offs_n, b, pages, offs_t, first_page, PAGED, PAGE_SIZE,
                                             BLOCK_N)
            k_scale = _load_scales(k_ptr, next_blk, next_slot, tokens + BLOCK_N < end, PAGE_SIZE, D)
            if FP8_NATIVE:
                keys = codes.to(tl.float8e4nv, bitcast=True)
            else:
                keys = e4m3_to_float32(codes, False).to(tl.bfloat16)
            logits = tl.dot(keys, q_t, max_num_imprecise_acc=FP8_ACC_DEPTH)
        else:
            keys = tl.load(k_ptr + (blk * PAGE_SIZE + slot)[:, None] * D + offs_d[None, :], mask=valid[:, None],
                           other=0.0)
            if keys.dtype == tl.float32:
                logits = tl.dot(keys, q_t, input_precision="tf32x3")
            else:
                logits = tl.dot(keys, q_t)
        x = tl.maximum(logits, 0.0) * w[None, :]                          # [BLOCK_N, R]
        if QG == 1:
            sc = tl.sum(x, axis=1)[:, None]                               # [BLOCK_N, 1]
        else:
            sc = tl.sum(tl.reshape(x, (BLOCK_N, QG, H)), axis=2)          # [BLOCK_N, QG]
        if FP8:
            sc = sc * this_scale[:, None]
        seen = tokens[:, None] < limits[None, :]
        sc = tl.where(seen, sc, float("-inf"))
        dst = scores_ptr + rows[None, :].to(tl.int64) * CAPACITY + tokens[:, None]
        tl.store(dst, sc, mask=(tokens[:, None] < split_end) & in_launch[None, :])
        if HIST:
            counted = seen & (limits > TOPK)[None, :]
            digit = (order_keys(sc) >> SHIFT1).to(tl.int32)
            tl.atomic_add(hist_ptr + rows[None, :] * BINS1 + digit, tl.full(digit.shape, 1, tl.int32),
                          mask=counted, sem="relaxed")
    # Keys no query of the group sees: -inf, without reading them.
    first_unseen = tl.maximum(lo + tl.cdiv(end - lo, BLOCK_N) * BLOCK_N, lo)
    for start in range(first_unseen, split_end, BLOCK_N):
        tokens = start + offs_n
        dst = scores_ptr + rows[None, :].to(tl.int64) * CAPACITY + tokens[:, None]
        tl.store(dst, tl.full((BLOCK_N, QG), float("-inf"), tl.float32),
                 mask=(tokens[:, None] < split_end) & in_launch[None, :])


@triton.jit
def _pick_bin(hist_ptr, BINS: tl.constexpr, k):
    """(bin, rank): the bin of a histogram (bins ordered like the keys) that holds the k-th largest counted
    element, and that element's rank from the top within the bin (1-based). k >= 1 and at most the total."""
    offs = tl.arange(0, BINS)
    h = tl.load(hist_ptr + offs)
    above = tl.cumsum(h, 0, reverse=True) - h                          # counted in the bins above each bin
    hit = (above < k) & (above + h >= k)
    bin = tl.max(tl.where(hit, offs, -1), 0)
    return bin, k - tl.sum(tl.where(offs == bin, above, 0), 0)


@triton.jit
def _digits_threshold(hist1_ptr, hist2_ptr, hist3_ptr, r, k, LEVEL: tl.constexpr):
    """The first LEVEL digits of row r's k-th largest key, as (prefix, rank within the prefix's bucket).
    LEVEL 1: digit 1; 2: digits 1-2 (22 bits); 3: the whole key T and how many keys == T to take."""
    b1, k1 = _pick_bin(hist1_ptr + r.to(tl.int64) * BINS1, BINS1, k)
    prefix = b1.to(tl.uint32)
    rank = k1
    if LEVEL >= 2:
        b2, k2 = _pick_bin(hist2_ptr + r.to(tl.int64) * BINS2, BINS2, k1)
        prefix = (prefix << 11) | b2.to(tl.uint32)
        rank = k2
        if LEVEL >= 3:
            b3, k3 = _pick_bin(hist3_ptr + r.to(tl.int64) * BINS3, BINS3, k2)
            prefix = (prefix << 10) | b3.to(tl.uint32)
            rank = k3
    return prefix, rank


@triton.jit
def indexer_topk_threshold_kernel(seqlens_ptr, hist1_ptr, hist2_ptr, hist3_ptr, q_offset, thr_ptr,
                                  S_Q: tl.constexpr, S_TOTAL: tl.constexpr, CAPACITY: tl.constexpr,
                                  TOPK: tl.constexpr, LEVEL: tl.constexpr):
    """Grid (rows,): thr_ptr [rows, 2] int32 = `_digits_threshold`(LEVEL) of each row that sees more than TOPK
    keys (the prefix's bits as int32, the rank); other rows' entries are not written (nor read)."""
    r = tl.program_id(0)
    limit = _row_limit(seqlens_ptr, r, q_offset, S_Q, S_TOTAL, CAPACITY)
    if limit > TOPK:
        prefix, rank = _digits_threshold(hist1_ptr, hist2_ptr, hist3_ptr, r, TOPK, LEVEL)
        tl.store(thr_ptr + r.to(tl.int64) * 2, prefix.to(tl.int32, bitcast=True))
        tl.store(thr_ptr + r.to(tl.int64) * 2 + 1, rank)


@triton.jit
def _row_threshold(thr_ptr, r):
    """(prefix uint32, rank int32): row r's entry of `indexer_topk_threshold_kernel`'s output."""
    prefix = tl.load(thr_ptr + r.to(tl.int64) * 2).to(tl.uint32, bitcast=True)
    return prefix, tl.load(thr_ptr + r.to(tl.int64) * 2 + 1)


@triton.jit
def indexer_topk_refine_kernel(scores_ptr, seqlens_ptr, thr_ptr, q_offset, out_hist_ptr,
                               S_Q: tl.constexpr, S_TOTAL: tl.constexpr, CAPACITY: tl.constexpr,
                               TOPK: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr, LEVEL: tl.constexpr):
    """Digit LEVEL (2 or 3) of the scores that match the threshold's first LEVEL - 1 digits (thr_ptr: the
    threshold kernel's output at LEVEL - 1); grid (rows, chunks). out_hist_ptr [rows, BINS2 | BINS3] int32,
    zeroed."""
    r = tl.program_id(0)
    lo = tl.program_id(1) * CHUNK
    limit = _row_limit(seqlens_ptr, r, q_offset, S_Q, S_TOTAL, CAPACITY)
    if (limit > TOPK) & (lo < limit):
        prefix, _ = _row_threshold(thr_ptr, r)
        hi = tl.minimum(lo + CHUNK, limit)
        row = scores_ptr + r.to(tl.int64) * CAPACITY
        for t0 in range(lo, hi, TILE):
            t = t0 + tl.arange(0, TILE)
            valid = t < hi
            key = order_keys(tl.load(row + t, mask=valid, other=0.0))
            if LEVEL == 2:      # keys whose digit 1 is T's: count their digit 2
                match = valid & ((key >> SHIFT1) == prefix)
                dst = out_hist_ptr + r * BINS2 + ((key >> SHIFT2) & (BINS2 - 1)).to(tl.int32)
            else:               # keys whose digits 1-2 are T's: count their digit 3
                match = valid & ((key >> SHIFT2) == prefix)
                dst = out_hist_ptr + r * BINS3 + (key & (BINS3 - 1)).to(tl.int32)
            tl.atomic_add(dst, tl.full((TILE,), 1, tl.int32), mask=match, sem="relaxed")


@triton.jit
def indexer_topk_count_kernel(scores_ptr, seqlens_ptr, thr_ptr, q_offset, counts_ptr,
                              S_Q: tl.constexpr, S_TOTAL: tl.constexpr, CAPACITY: tl.constexpr,
                              TOPK: tl.constexpr, CHUNK: tl.constexpr, TILE: tl.constexpr,
                              NUM_CHUNKS: tl.constexpr):
    """Per (row, chunk) of a row with more than TOPK visible keys: how many keys are > T and how many == T
    (thr_ptr: the threshold kernel's output at LEVEL 3). counts_ptr [rows, NUM_CHUNKS, 2] int32 (chunks past the
    row's limit are not written, nor read)."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    lo = c * CHUNK
    limit = _row_limit(seqlens_ptr, r, q_offset, S_Q, S_TOTAL, CAPACITY)
    if (limit > TOPK) & (lo < limit):
        thr, _ = _row_threshold(thr_ptr, r)
        hi = tl.minimum(lo + CHUNK, limit)
        row = scores_ptr + r.to(tl.int64) * CAPACITY
        n_gt = tl.zeros((TILE,), tl.int32)
        n_eq = tl.zeros((TILE,), tl.int32)
        for t0 in range(lo, hi, TILE):
            t = t0 + tl.arange(0, TILE)
            valid = t < hi
            key = order_keys(tl.load(row + t, mask=valid, other=0.0))
            n_gt += (valid & (key > thr)).to(tl.int32)
            n_eq += (valid & (key == thr)).to(tl.int32)
        dst = counts_ptr + (r.to(tl.int64) * NUM_CHUNKS + c) * 2
        tl.store(dst, tl.sum(n_gt, 0))
        tl.store(dst + 1, tl.sum(n_eq, 0))


@triton.jit
def indexer_topk_write_kernel(scores_ptr, seqlens_ptr, table_ptr, thr_ptr, counts_ptr, q_offset, idx_ptr, val_ptr,
                              S_Q: tl.constexpr, S_TOTAL: tl.constexpr, CAPACITY: tl.constexpr, TOPK: tl.constexpr,
                              TOPK_TILE: tl.constexpr,
                              CHUNK: tl.constexpr, TILE: tl.constexpr, NUM_CHUNKS: tl.constexpr,
                              CHUNKS_POW2: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                              MAX_BLOCKS: tl.constexpr, NUM_BLOCKS: tl.constexpr, WRITE_SCORES: tl.constexpr):
    """The selected keys of one (row, chunk) as pool indices, in position order; grid (rows, chunks). thr_ptr: the
    threshold kernel's output at LEVEL 3 (T and how many keys == T to take).

    idx_ptr [rows, TOPK] int32: block * PAGE_SIZE + offset (PAGED; the block clamped into [0, NUM_BLOCKS)),
    else b * CAPACITY + t; -1 in the unfilled slots (written by chunk 0). val_ptr [rows, TOPK] float32: their
    scores, -inf unfilled (WRITE_SCORES; else a 1-element dummy)."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    b = r // S_Q
    lo = c * CHUNK
    limit = _row_limit(seqlens_ptr, r, q_offset, S_Q, S_TOTAL, CAPACITY)
    taken = tl.minimum(limit, TOPK)
    out_row = r.to(tl.int64) * TOPK
    if c == 0:
        for p0 in range(0, TOPK, TOPK_TILE):
            p = p0 + tl.arange(0, TOPK_TILE)
            fill = (p >= taken) & (p < TOPK)
            tl.store(idx_ptr + out_row + p, tl.full((TOPK_TILE,), -1, tl.int32), mask=fill)
            if WRITE_SCORES:
                tl.store(val_ptr + out_row + p, tl.full((TOPK_TILE,), float("-inf"), tl.float32), mask=fill)
    if lo < limit:
        # A row with at most TOPK visible keys takes them all: threshold key 0 (below every order key).
        thr = tl.full((), 0, tl.uint32)
        k_eq = tl.full((), 0, tl.int32)
        base = lo
        eq_run = tl.full((), 0, tl.int32)
        if limit > TOPK:
            thr, k_eq = _row_threshold(thr_ptr, r)
            offs_c = tl.arange(0, CHUNKS_POW2)
            before = offs_c < c
            counts = counts_ptr + (r.to(tl.int64) * NUM_CHUNKS + offs_c) * 2
            gt_before = tl.sum(tl.load(counts, mask=before, other=0), 0)
            eq_run = tl.sum(tl.load(counts + 1, mask=before, other=0), 0)
            base = gt_before + tl.minimum(eq_run, k_eq)
        hi = tl.minimum(lo + CHUNK, limit)
        row = scores_ptr + r.to(tl.int64) * CAPACITY
        for t0 in range(lo, hi, TILE):
            t = t0 + tl.arange(0, TILE)
            valid = t < hi
            sc = tl.load(row + t, mask=valid, other=0.0)
            key = order_keys(sc)
            is_gt = valid & (key > thr)
            is_eq = valid & (key == thr)
            # One scan for both running counts (> T in the low half, == T in the high: a tile holds < 2^16).
            both = tl.cumsum(is_gt.to(tl.int32) | (is_eq.to(tl.int32) << 16), 0)
            gt_upto = both & 0xFFFF
            eq_upto = eq_run + (both >> 16)                 # keys == T in the row up to here
            take = is_gt | (is_eq & (eq_upto <= k_eq))
            # Taken up to here: every key > T, and the keys == T while fewer than k_eq came before.
            slot = base + gt_upto + tl.minimum(eq_upto, k_eq) - tl.minimum(eq_run, k_eq) - 1
            if PAGED:
                blk = tl.load(table_ptr + b * MAX_BLOCKS + t // PAGE_SIZE, mask=take, other=0)
                blk = tl.minimum(tl.maximum(blk, 0), NUM_BLOCKS - 1)
                pool = blk * PAGE_SIZE + t % PAGE_SIZE
            else:
                pool = b * CAPACITY + t
            tl.store(idx_ptr + out_row + slot, pool, mask=take)
            if WRITE_SCORES:
                tl.store(val_ptr + out_row + slot, sc, mask=take)
            eq_run += tl.sum(is_eq.to(tl.int32), 0)
            base += tl.sum(take.to(tl.int32), 0)
