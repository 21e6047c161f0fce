"""Hopper (sm_90) split-KV MLA decode in Gluon: TMA, wgmma and warp specialization.

The same contract as kernels/decode.py's `mla_decode_split_kernel` (its arguments, outputs, grid and
schedule constexprs), for caches in q's dtype (bf16 / fp16), "fp8_blockscale" caches with bf16 queries or
"fp8_pertensor" caches with bf16 / fp16 queries, contiguous or paged (PAGE_SIZE >= 64), stacked or not, any
S_Q, causal or not. Partials of split sequences are merged by `mla_decode_combine_kernel` (LAST_MERGES is not
supported here).

One program takes a 64-row tile (rows r = s * H + h of one sequence; fewer real rows are zero-padded) and a
split of that sequence's keys, in key blocks of 64 tokens, and runs in three partitions:
- producer (the default partition, 4 warps): TMA loads of the 64 x 576 query tile once and of each key block
  into a 2-slot ring;
- two consumer warpgroups, each owning half of the 64 x 512 float32 output (`_left_half`: columns [0, 256),
  `_right_half`: [256, 512)). Key blocks come in pairs: the left warpgroup computes the scores of the even
  block of a pair (S0 = Q K0^T), the right one those of the odd block (S1), so that one group's softmax runs
  while the other's matrix products do ("seesaw" scheduling, as FlashMLA does it). Each group needs both
  blocks' probabilities for its half of O: P0 and the running max after block 0 (m0) go from left to right,
  P1 and m1 from right to left, through shared memory. A block's probabilities [64 rows, 64 keys] are
  written over its rope columns [64 keys, 64] once its scores exist: same shape, same layout, and no one
  reads that rope part again.

The online softmax per pair, m the running max (base 2) before it, P_k = exp2(S_k - m_k):
    m0 = max(m, rowmax S0),  m1 = max(m0, rowmax S1)
    O_left  = (O_left  * exp2(m - m0) + P0 V0_left)  * exp2(m0 - m1) + P1 V1_left
    O_right = (O_right * exp2(m - m0) + P0 V0_right) * exp2(m0 - m1) + P1 V1_right
Each group keeps the row sums of its own blocks' P (rescaled alike); the epilogue adds the two.

Rescale factors are exp2(old - safe(new)) with safe(-inf) = 0: a row with no visible key yet keeps 0, and a
factor is never exp2(+large). Keys past the sequence's length are zero-filled by the TMA (the key
descriptor of a contiguous cache ends at the length; a paged cache's last partial block is read through a
descriptor that ends there), so garbage in unused slots and pages never meets a zero probability.

An "fp8_blockscale" cache (656 bytes a token: 512 e4m3 codes, 4 float32 scales, 64 bf16 rope values) is
dequantized in place by the consumer group that scores each block (`_slot_scores`: the left group the even
blocks, the right the odd ones, so two blocks convert at once): the producer's TMA puts a block's codes into the
upper half of its ring slot's bf16 [64, 512] tile, its rope values into the rope box as they are and its scales
into a small buffer, once both groups have freed the slot; the group turns each 128-column group of codes into
bf16 (code * scale, in float32, rounded once) written over the slot from the bottom up, which overwrites only
codes already read (`_dequantize`), and then reads it as a bf16 block. No load waits for a conversion.
An "fp8_pertensor" cache (576 e4m3 bytes a token, one float32 scale) goes the same way, its rope codes into the
first half of the rope box, into fp16 tiles: the consumers only unpack the codes (exact in fp16), a bf16 query
is rewritten once as fp16 times a power of two (`_scaled_query`, divided out of the score scale), and the cache's
scale multiplies the scores (through the softmax scale) and the output (`_finish_rows`) instead of every value.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)

from flashmla_jax.kernels._common import ALL_NEG_INF_LSE, LN2, LOG2E

BLOCK_M = gl.constexpr(64)        # query rows per program: one wgmma M extent per warpgroup
BLOCK_N = gl.constexpr(64)        # keys per block
HALF_V = gl.constexpr(256)        # output columns per consumer warpgroup
CONSUMER_REGS = gl.constexpr(240)  # registers per thread of each consumer warpgroup (the producer: the rest)
# With an FP8 cache the consumers also dequantize: they give up 16 registers a thread (the producer's warps get
# 56 instead of 24). Compiled: 8-16 bytes of consumer stack, none in the products.
FP8_CONSUMER_REGS = gl.constexpr(224)
# With an FP8 cache the producer asks L2 for block j + FP8_PREFETCH_AHEAD as it issues block j's load, so that
# the later block's TMA load (issued when its slot frees) finds it there. (bf16 caches: no prefetch; it slowed D2.)
FP8_PREFETCH_AHEAD = gl.constexpr(1)
KV_BLOCKSCALE = gl.constexpr(1)    # the KV_FORMAT of an "fp8_blockscale" cache (kernels/decode.py's)
KV_PERTENSOR = gl.constexpr(2)     # and of an "fp8_pertensor" one
CODE_BOX = gl.constexpr(128)       # e4m3 codes per scale, and the TMA box width (bytes) of codes and rope


@gluon.constexpr_function
def _code_layout():
    # [8, 128] codes a pass: a thread 8 of one row (an 8-byte shared-memory load, a 16-byte bf16 store), a row
    # over 16 threads. gl.bank_conflicts counts none for the codes' loads or the bf16 stores; 16 codes a thread,
    # a row over 8 threads, conflicted once per store wavefront. Layouts with 16 codes a thread and no conflict
    # (a thread a row) spill the producer's 56 registers: their column steps move through the swizzle.
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[2, 16], warps_per_cta=[4, 1], order=[1, 0])


@gluon.constexpr_function
def _rope_code_layout():
    # [64, 64] rope codes: one 16-byte vector per thread, a row over 4 threads.
    return gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[8, 4], warps_per_cta=[4, 1], order=[1, 0])


@gluon.constexpr_function
def _score_layout():
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 16])


@gluon.constexpr_function
def _out_layout():
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 256, 16])


@gluon.constexpr_function
def _row_vector_layout():
    return gl.SliceLayout(1, _score_layout())


@gluon.jit
def _sequence_splits(seqlens_ptr, b, CAPACITY: gl.constexpr, NUM_SPLITS: gl.constexpr,
                     UNIFORM_SPLITS: gl.constexpr, BALANCE: gl.constexpr, BATCH: gl.constexpr,
                     BATCH_POW2: gl.constexpr, SLOTS: gl.constexpr, ROW_TILES: gl.constexpr,
                     UNIFORM_NUM: gl.constexpr, UNIFORM_DEN: gl.constexpr):
    """(seqlen, splits) of sequence b: kernels/decode.py's `_sequence_splits`, the same schedule."""
    seqlen = gl.minimum(gl.maximum(gl.load(seqlens_ptr + b), 0), CAPACITY)
    if BALANCE:
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [gl.num_warps()], [0])
        offs_b = gl.arange(0, BATCH_POW2, layout=lay)
        lens = gl.load(seqlens_ptr + offs_b, mask=offs_b < BATCH, other=0)
        lens = gl.minimum(gl.maximum(lens, 0), CAPACITY)
        blocks_b = (lens + BLOCK_N - 1) // BLOCK_N
        total = gl.sum(blocks_b, 0)
        ragged = gl.max(blocks_b, 0) * BATCH * UNIFORM_NUM > total * UNIFORM_DEN
        run = gl.maximum((total * ROW_TILES + SLOTS - 1) // SLOTS, 1)
        blocks = (seqlen + BLOCK_N - 1) // BLOCK_N
        balanced = gl.minimum(gl.maximum((blocks + run - 1) // run, 1), NUM_SPLITS)
        splits = gl.where(ragged, balanced, UNIFORM_SPLITS)
    else:
        splits = seqlen * 0 + NUM_SPLITS
    return seqlen, splits


@gluon.jit
def _split_keys(seqlen, splits_here, split, tile, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr):
    """(lo, hi, first_limit): keys [lo, hi) of this split for row tile `tile`, and the causal limit of the
    tile's first row (the smallest: limits grow with the row). kernels/decode.py's `_split_keys`."""
    split_len = ((seqlen + BLOCK_N - 1) // BLOCK_N + splits_here - 1) // splits_here * BLOCK_N
    lo = split * split_len
    hi = gl.minimum(lo + split_len, seqlen)
    if CAUSAL:
        first_limit = seqlen - S_Q + 1 + (tile * BLOCK_M) // H
        last_row = gl.minimum(tile * BLOCK_M + BLOCK_M, S_Q * H) - 1
        hi = gl.minimum(hi, seqlen - S_Q + 1 + last_row // H)
    else:
        first_limit = seqlen
    return lo, hi, first_limit


@gluon.jit
def _masked_scores(s, start, first_limit, seqlen, tile, H: gl.constexpr, S_Q: gl.constexpr,
                   CAUSAL: gl.constexpr):
    """Scores s [64, 64] of keys [start, start + 64) with -inf where a row may not see the key; rows of the
    tile that see the whole block (start + 64 <= first_limit) skip the mask."""
    if start + BLOCK_N > first_limit:
        keys = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, _score_layout()))
        limit = _row_limits(seqlen, tile, H, S_Q, CAUSAL)
        s = gl.where(gl.expand_dims(keys, 0) < gl.expand_dims(limit, 1), s, float("-inf"))
    return s


@gluon.jit
def _row_limits(seqlen, tile, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr):
    """[64] int32: the keys each row of the tile sees are those < its limit (query s = row // H)."""
    rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=_row_vector_layout())
    if CAUSAL:
        limit = seqlen - S_Q + 1 + rows // H
    else:
        limit = rows * 0 + seqlen
    return limit


@gluon.jit
def _block_scores(q_nope, q_rope, k_nope, k_rope, rest_ready=None, phase=0, WAIT_REST: gl.constexpr = False):
    """Issues S = Q K^T [64, 64] (576 deep) on the tensor cores; returns the async token.

    The 512-deep part runs as a loop over its eight 64-wide column boxes (the NVMMA layout stores a
    [64, 512] tile as eight [64, 64] boxes one after another): with the box index a loop variable, each
    product's shared-memory descriptors are computed where they are used, instead of 64 loop-invariant
    ones being hoisted into (and spilled from) registers.
    WAIT_REST (the sparse kernel's bf16 gathers): only the first four boxes are known to have landed; the products
    over the rest (boxes 4-7 and the rope) wait for rest_ready at `phase` first."""
    box: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    boxes: gl.constexpr = k_nope.shape[1] // 64
    q_boxes = q_nope._reinterpret(q_nope.dtype, [boxes, BLOCK_M, 64], box)
    k_boxes = k_nope._reinterpret(k_nope.dtype, [boxes, BLOCK_N, 64], box)
    s = warpgroup_mma_init(gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=_score_layout()))
    if WAIT_REST:
        for c in range(boxes // 2):
            s = warpgroup_mma(q_boxes.index(c), k_boxes.index(c).permute((1, 0)), s, is_async=True)
        mbarrier.wait(rest_ready, phase)
        fence_async_shared()
        for c in range(boxes // 2, boxes):
            s = warpgroup_mma(q_boxes.index(c), k_boxes.index(c).permute((1, 0)), s, is_async=True)
    else:
        for c in range(boxes):
            s = warpgroup_mma(q_boxes.index(c), k_boxes.index(c).permute((1, 0)), s, is_async=True)
    return warpgroup_mma(q_rope, k_rope.permute((1, 0)), s, is_async=True)


@gluon.jit
def _slot_scores(slot: gl.constexpr, phase, q_nope, q_rope, k_nope, k_rope, k_ready, k_front, SPARSE: gl.constexpr,
                 FRONT_READY: gl.constexpr, CONVERT: gl.constexpr = 0, k_scales=None):
    """Waits for ring slot `slot`'s key block at `phase` and issues its scores (`_block_scores`); returns the
    async token. FRONT_READY: the wait is for the block's first four boxes (k_front), and the products over the
    rest wait for k_ready. A sparse slot, gathered by cp.async (the generic proxy), is fenced for the wgmma's.
    CONVERT (an FP8 cache's KV_FORMAT; 0: none): the slot holds the block's raw codes, rope and (blockscale)
    scales (k_scales), and this group dequantizes it in place (`_dequantize`) before its scores."""
    if CONVERT != 0:
        mbarrier.wait(k_ready.index(slot), phase)
        _dequantize(k_nope.index(slot), k_rope.index(slot), k_scales.index(slot), CONVERT == KV_BLOCKSCALE)
        fence_async_shared()          # the tile (generic stores, and the copies before them) before the wgmma
        gl.thread_barrier()           # ... every thread's part of it
        s = _block_scores(q_nope, q_rope, k_nope.index(slot), k_rope.index(slot))
    elif FRONT_READY:
        mbarrier.wait(k_front.index(slot), phase)
        fence_async_shared()
        s = _block_scores(q_nope, q_rope, k_nope.index(slot), k_rope.index(slot), k_ready.index(slot), phase, True)
    else:
        mbarrier.wait(k_ready.index(slot), phase)
        if SPARSE:
            fence_async_shared()
        s = _block_scores(q_nope, q_rope, k_nope.index(slot), k_rope.index(slot))
    return s


@gluon.jit
def _safe(m):
    return gl.where(m == float("-inf"), 0.0, m)


@gluon.jit
def _rescaled(acc, factor):
    """acc [64, 256] times a per-row factor [64] (the scores' row layout)."""
    f = gl.convert_layout(factor, gl.SliceLayout(1, _out_layout()))
    return acc * gl.expand_dims(f, 1)


@gluon.jit
def _probabilities(s, m_new_safe, dtype: gl.constexpr):
    """P = exp2(s - m_new) as the left operand of P V (registers) and its row sums."""
    p = gl.exp2(s - gl.expand_dims(m_new_safe, 1))
    p_op = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=_out_layout(), k_width=2))
    return p, p_op


@gluon.jit
def _consumer_state(smem, bars, work, outputs, QUERY_SCALED: gl.constexpr):
    """A consumer group's view of the kernel's tuples, once the query tile is ready, and its initial online-
    softmax state: running max m_i [64] (-inf), row sums l_i [64] and its half of O, acc [64, 256] (zeros).
    QUERY_SCALED: the producer rewrote the query times a power of two (`_scaled_query`, stored in q_factor),
    which the score scale divides out again."""
    q_nope, q_rope, k_nope, k_rope, m_x, l_x, valid_x, q_factor, k_scales = smem
    q_ready, k_ready, k_free, p_ready, done, k_front = bars
    qk_scale, seqlen, lo, n_blocks, first_limit, tile, b, split, splits_here, v_scale = work
    o_desc, o_part_desc, lse_ptr, lse_part_ptr = outputs
    mbarrier.wait(q_ready, 0)
    if QUERY_SCALED:
        qk_scale = qk_scale / gl.max(q_factor.load(_row_vector_layout()), axis=0)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=_row_vector_layout())
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=_row_vector_layout())
    acc = gl.zeros([BLOCK_M, HALF_V], gl.float32, layout=_out_layout())
    return (q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done, qk_scale, seqlen, lo,
            n_blocks, first_limit, tile, b, split, splits_here, v_scale, o_desc, o_part_desc, lse_ptr, lse_part_ptr,
            m_i, l_i, acc, valid_x, k_front, k_scales)


@gluon.jit
def _left_half(smem, bars, work, outputs, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr,
               NUM_SPLITS: gl.constexpr, V_SCALED: gl.constexpr, SPARSE: gl.constexpr = False,
               WRITE_MAX: gl.constexpr = False, max_ptr=None, QUERY_SCALED: gl.constexpr = False,
               FRONT_READY: gl.constexpr = False, CONVERT: gl.constexpr = 0):
    """The left consumer warpgroup: scores of the even blocks, O[:, :256]. smem, bars, work and outputs are
    the kernel's tuples (`_consumer_state` unpacks them). SPARSE (kernels/gluon_sparse_decode.py): a block's
    slots are masked by the validity its producer stored (`_valid_scores`), and no row has the "saw keys" rule.
    WRITE_MAX (the sparse prefill, one split): each row's largest scaled score q.k * scale into max_ptr [B, R]
    (-inf for a row with no key). QUERY_SCALED: `_consumer_state`. FRONT_READY (the sparse kernel's bf16 gathers):
    a block's scores start once its first four boxes have landed (bars' k_front) and wait for k_ready before the
    rest (`_block_scores`). CONVERT (an FP8 cache's KV_FORMAT): each group dequantizes the blocks it scores
    (`_slot_scores`)."""
    (q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done, qk_scale, seqlen, lo, n_blocks,
     first_limit, tile, b, split, splits_here, v_scale, o_desc, o_part_desc, lse_ptr, lse_part_ptr, m_i, l_i,
     acc, valid_x, k_front, k_scales) = _consumer_state(smem, bars, work, outputs, QUERY_SCALED)
    for pair in range((n_blocks + 1) // 2):
        phase = pair & 1
        start = lo + 2 * pair * BLOCK_N
        s = _slot_scores(0, phase, q_nope, q_rope, k_nope, k_rope, k_ready, k_front, SPARSE, FRONT_READY, CONVERT,
                         k_scales)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        s = _masked_scores(s * qk_scale, start, first_limit, seqlen, tile, H, S_Q, CAUSAL)
        if SPARSE:
            s = _valid_scores(s, valid_x.index(0))
        m0 = gl.maximum(m_i, gl.max(s, axis=1))
        m0_safe = _safe(m0)
        p0, p0_op = _probabilities(s, m0_safe, q_nope.dtype)
        alpha = gl.exp2(m_i - m0_safe)
        l_i = l_i * alpha + gl.sum(p0, axis=1)
        # P0 and m0 to the right warpgroup: P0 over block 0's rope columns, read by its wgmma (async proxy).
        k_rope.index(0).store(p0.to(q_nope.dtype))
        m_x.slice(0, BLOCK_M).store(m0)
        fence_async_shared()
        mbarrier.arrive(p_ready.index(0), count=1)
        acc = _rescaled(acc, alpha)
        acc = warpgroup_mma(p0_op, k_nope.index(0).slice(0, HALF_V, dim=1), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(k_free.index(0), count=1)
        if 2 * pair + 1 < n_blocks:
            mbarrier.wait(p_ready.index(1), phase)
            m1 = m_x.slice(BLOCK_M, BLOCK_M).load(_row_vector_layout())
            beta = gl.exp2(m0 - _safe(m1))
            acc = _rescaled(acc, beta)
            l_i = l_i * beta
            acc = warpgroup_mma(k_rope.index(1), k_nope.index(1).slice(0, HALF_V, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(k_free.index(1), count=1)
            m_i = m1
        else:
            m_i = m0
    if WRITE_MAX:
        rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=_row_vector_layout())
        gl.store(max_ptr + b.to(gl.int64) * (H * S_Q) + rows, m_i * LN2, mask=rows < H * S_Q)
    saw_keys = _rows_saw_keys(lo, n_blocks, seqlen, tile, H, S_Q, CAUSAL, SPARSE)
    out, lse = _finish_rows(acc, m_i, l_i, l_x, done, 0, saw_keys, v_scale, V_SCALED)
    stage, stage_part = _output_stages(q_nope, k_nope, 0, o_desc)
    _store_half(out, lse, stage, stage_part, o_desc, o_part_desc, lse_ptr, lse_part_ptr, b, tile, split, splits_here,
                n_blocks > 0, 0, True, H * S_Q, NUM_SPLITS)


@gluon.jit
def _right_half(smem, bars, work, outputs, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr,
                NUM_SPLITS: gl.constexpr, V_SCALED: gl.constexpr, SPARSE: gl.constexpr = False,
                QUERY_SCALED: gl.constexpr = False, FRONT_READY: gl.constexpr = False, CONVERT: gl.constexpr = 0):
    """The right consumer warpgroup: scores of the odd blocks, O[:, 256:]. The options: `_left_half`'s."""
    (q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done, qk_scale, seqlen, lo, n_blocks,
     first_limit, tile, b, split, splits_here, v_scale, o_desc, o_part_desc, lse_ptr, lse_part_ptr, m_i, l_i,
     acc, valid_x, k_front, k_scales) = _consumer_state(smem, bars, work, outputs, QUERY_SCALED)
    for pair in range((n_blocks + 1) // 2):
        phase = pair & 1
        start = lo + (2 * pair + 1) * BLOCK_N
        if 2 * pair + 1 < n_blocks:
            s = _slot_scores(1, phase, q_nope, q_rope, k_nope, k_rope, k_ready, k_front, SPARSE, FRONT_READY,
                             CONVERT, k_scales)
            mbarrier.wait(p_ready.index(0), phase)
            m0 = m_x.slice(0, BLOCK_M).load(_row_vector_layout())
            m0_safe = _safe(m0)
            alpha = gl.exp2(m_i - m0_safe)
            acc = _rescaled(acc, alpha)
            l_i = l_i * alpha
            acc = warpgroup_mma(k_rope.index(0), k_nope.index(0).slice(HALF_V, HALF_V, dim=1), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
            s = _masked_scores(s * qk_scale, start, first_limit, seqlen, tile, H, S_Q, CAUSAL)
            if SPARSE:
                s = _valid_scores(s, valid_x.index(1))
            m1 = gl.maximum(m0, gl.max(s, axis=1))
            m1_safe = _safe(m1)
            p1, p1_op = _probabilities(s, m1_safe, q_nope.dtype)
            k_rope.index(1).store(p1.to(q_nope.dtype))
            m_x.slice(BLOCK_M, BLOCK_M).store(m1)
            fence_async_shared()
            mbarrier.arrive(p_ready.index(1), count=1)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(k_free.index(0), count=1)
            beta = gl.exp2(m0 - m1_safe)
            acc = _rescaled(acc, beta)
            l_i = l_i * beta + gl.sum(p1, axis=1)
            acc = warpgroup_mma(p1_op, k_nope.index(1).slice(HALF_V, HALF_V, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(k_free.index(1), count=1)
            m_i = m1
        else:
            mbarrier.wait(p_ready.index(0), phase)
            m0 = m_x.slice(0, BLOCK_M).load(_row_vector_layout())
            alpha = gl.exp2(m_i - _safe(m0))
            acc = _rescaled(acc, alpha)
            l_i = l_i * alpha
            acc = warpgroup_mma(k_rope.index(0), k_nope.index(0).slice(HALF_V, HALF_V, dim=1), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(k_free.index(0), count=1)
            m_i = m0
    saw_keys = _rows_saw_keys(lo, n_blocks, seqlen, tile, H, S_Q, CAUSAL, SPARSE)
    out, lse = _finish_rows(acc, m_i, l_i, l_x, done, 1, saw_keys, v_scale, V_SCALED)
    stage, stage_part = _output_stages(q_nope, k_nope, 1, o_desc)
    _store_half(out, lse, stage, stage_part, o_desc, o_part_desc, lse_ptr, lse_part_ptr, b, tile, split, splits_here,
                n_blocks > 0, HALF_V, False, H * S_Q, NUM_SPLITS)


@gluon.jit
def _rows_saw_keys(lo, n_blocks, seqlen, tile, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr,
                   SPARSE: gl.constexpr = False):
    """[64] bool: the tile's rows that have keys in this split (its keys start at lo; n_blocks of them). SPARSE:
    none (the sparse ops give a row whose scores are all -inf 0 and -inf, as the tl sparse kernel does)."""
    saw = (n_blocks > 0) & (lo < _row_limits(seqlen, tile, H, S_Q, CAUSAL))
    if SPARSE:
        saw = saw & False
    return saw


@gluon.jit
def _valid_scores(s, valid):
    """Scores s [64, 64] with -inf in the columns of slots that hold no valid token (valid: a ring slot's [64]
    int8 flags, stored by the sparse producer with the block)."""
    ok = valid.load(gl.SliceLayout(0, _score_layout())) != 0
    return gl.where(gl.expand_dims(ok, 0), s, float("-inf"))


@gluon.jit
def _finish_rows(acc, m_i, l_i, l_x, done, side: gl.constexpr, saw_keys, v_scale, V_SCALED: gl.constexpr):
    """(out [64, 256], lse [64]): this half normalised by both groups' row sums (exchanged through l_x) and
    with V_SCALED times v_scale (an "fp8_pertensor" cache's scale, left out of its values) where the row has
    weight, so that a row without keys stays 0 whatever the scale.
    With kernels/decode.py's `_write_split` row rules (saw_keys [64]: rows with keys in this split): a NaN in
    either half's accumulator is sent as a NaN row sum, so both halves of the row come out NaN; a row that saw
    keys and gave them no weight gets NaN output and ALL_NEG_INF_LSE."""
    nan_in_row = gl.max(gl.where(acc != acc, 1, 0), axis=1)
    l_i = gl.where(gl.convert_layout(nan_in_row, _row_vector_layout()) > 0, float("nan"), l_i)
    l_x.slice(side * BLOCK_M, BLOCK_M).store(l_i)
    mbarrier.arrive(done, count=1)
    mbarrier.wait(done, 0)
    l_all = l_i + l_x.slice((1 - side) * BLOCK_M, BLOCK_M).load(_row_vector_layout())
    lse, divisor = _row_results(m_i, l_all, saw_keys, v_scale, V_SCALED)
    out = acc / gl.expand_dims(gl.convert_layout(divisor, gl.SliceLayout(1, _out_layout())), 1)
    return out, lse


@gluon.jit
def _row_results(m, l_all, saw_keys, v_scale, V_SCALED: gl.constexpr):
    """(lse, divisor), vectors over rows, from the running max m (base 2) and both consumer groups' row sums
    l_all, by the split kernel's row rules: an empty row gets lse -inf and divisor 1 (output 0); a NaN row sum
    (a NaN score or value) is not empty, so NaN reaches lse and the output; a row that saw keys (saw_keys) and
    gave them no weight gets ALL_NEG_INF_LSE and divisor NaN (output NaN). V_SCALED: the divisor is over v_scale
    (an "fp8_pertensor" cache's scale, left out of its values) where the row has weight, so that a row without
    keys stays 0 whatever the scale."""
    has_keys = l_all != 0
    lse = gl.where(has_keys, (m + gl.log2(gl.where(has_keys, l_all, 1.0))) * LN2, float("-inf"))
    if V_SCALED:
        divisor = gl.where(has_keys, l_all / v_scale, 1.0)
    else:
        divisor = gl.where(has_keys, l_all, 1.0)
    unweighted = saw_keys & (l_all == 0)
    lse = gl.where(unweighted, ALL_NEG_INF_LSE, lse)
    divisor = gl.where(unweighted, float("nan"), divisor)
    return lse, divisor


@gluon.jit
def _store_half(out, lse, stage, stage_part, o_desc, o_part_desc, lse_ptr, lse_part_ptr, b, tile, split,
                splits_here, nonempty, col0: gl.constexpr, WRITE_LSE: gl.constexpr, R: gl.constexpr,
                NUM_SPLITS: gl.constexpr):
    """Stores out [64, 256] at columns [col0, col0 + 256) of the result (a sequence's only split) or of this
    split's float32 partial, through shared memory (stage: q's dtype, stage_part: float32) and a TMA store
    whose descriptor ends at the tile's last real row; with WRITE_LSE also the rows' LSE.
    kernels/decode.py's `_write_split` without the in-kernel merge."""
    final = (splits_here == 1) & (split == 0)
    if final:
        stage.store(out.to(stage.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [0, col0], stage)
    rows = tile * BLOCK_M + gl.arange(0, BLOCK_M, layout=_row_vector_layout())
    row_ok = rows < R
    if WRITE_LSE:
        gl.store(lse_ptr + b.to(gl.int64) * R + rows, lse, mask=row_ok & final)
    if NUM_SPLITS > 1:
        taken = (splits_here > 1) & (split < splits_here)
        # An empty split (lse -inf) is never read by the combine: its 0 partial is not written.
        if taken & nonempty:
            stage_part.store(out)
            fence_async_shared()
            tma.async_copy_shared_to_global(o_part_desc, [0, col0], stage_part)
        if WRITE_LSE:
            gl.store(lse_part_ptr + (b.to(gl.int64) * NUM_SPLITS + split) * R + rows, lse, mask=row_ok & taken)
    tma.store_wait(0)


@gluon.jit
def _output_stages(q_nope, k_nope, side: gl.constexpr, o_desc):
    """Shared memory for one half's output, free once both groups are done: a [64, 256] slice of the query
    tile in the output's dtype (o_desc's), and ring slot `side` as [64, 256] float32 (partials)."""
    float32_tile: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    stage = q_nope._reinterpret(o_desc.dtype, [BLOCK_M, 2 * HALF_V], swizzled).slice(side * HALF_V, HALF_V, dim=1)
    stage_part = k_nope.index(side)._reinterpret(gl.float32, [BLOCK_M, HALF_V], float32_tile)
    return stage, stage_part


@gluon.jit
def _producer(q_descs, k_descs, tail_descs, q_nope, q_rope, k_nope, k_rope, q_ready, k_ready, k_free, table_ptr, b,
              lo, n_blocks, tail_start, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr,
              NUM_PAGES: gl.constexpr, D_V: gl.constexpr):
    """The load partition (the default one, 4 warps): the query tile, then each key block into ring slot
    block % 2 once both consumer groups have released it. Descriptors come in (nope [64, 512] box, rope [64, 64]
    box) pairs; a paged cache's partial last block (tail_start) comes through tail_descs, whose rows end at the
    sequence's length."""
    _load_query_tile(q_descs, q_nope, q_rope, q_ready, D_V)
    BYTES: gl.constexpr = 2 * BLOCK_N * (D_V + 64)
    for j in range(n_blocks):
        slot = j % 2
        # The page is looked up before waiting for the slot: its load latency hides behind the wait.
        start, row = _block_row(j, lo, table_ptr, b, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
        mbarrier.wait(k_free.index(slot), ((j // 2) & 1) ^ 1)     # a fresh barrier passes phase 1
        bar = k_ready.index(slot)
        mbarrier.expect(bar, BYTES)
        if PAGED and start == tail_start:
            tma.async_copy_global_to_shared(tail_descs[0], [0, 0], bar, k_nope.index(slot))
            tma.async_copy_global_to_shared(tail_descs[1], [0, D_V], bar, k_rope.index(slot))
        else:
            tma.async_copy_global_to_shared(k_descs[0], [row, 0], bar, k_nope.index(slot))
            tma.async_copy_global_to_shared(k_descs[1], [row, D_V], bar, k_rope.index(slot))


@gluon.jit
def _load_query_tile(q_descs, q_nope, q_rope, q_ready, D_V: gl.constexpr):
    """The TMA loads of the query tile [rows, 576] (its nope and rope boxes; 64 rows here, 16 or 32 in
    kernels/gluon_narrow_decode.py), completing q_ready."""
    mbarrier.expect(q_ready, 2 * q_nope.shape[0] * (D_V + q_rope.shape[1]))
    tma.async_copy_global_to_shared(q_descs[0], [0, 0], q_ready, q_nope)
    tma.async_copy_global_to_shared(q_descs[1], [0, D_V], q_ready, q_rope)


@gluon.jit
def _block_row(j, lo, table_ptr, b, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr,
               NUM_PAGES: gl.constexpr):
    """(start, row): the first key of this split's block j, and the row of the key descriptors it starts at (its
    token in the sequence, or in the pool through the block table, the entry clamped to the pool)."""
    start = lo + j * BLOCK_N
    row = start
    if PAGED:
        page = gl.load(table_ptr + b * MAX_BLOCKS + start // PAGE_SIZE)
        row = gl.minimum(gl.maximum(page, 0), NUM_PAGES - 1) * PAGE_SIZE + start % PAGE_SIZE
    return start, row


@gluon.jit
def _prefetch_block(j, n_blocks, loads, prefetch):
    """Asks L2 for key block j's bytes (one bulk prefetch by one thread of the 4-warp partition; no shared
    memory, no barrier), so that its TMA load finds them there. loads: `_fp8_load`'s tuple; prefetch: (keys,
    N_MAX, TOKEN): the key rows' base (the sequence's first token, or the page pool) and a token's stride in
    elements. A block past n_blocks is not asked for."""
    (k_descs, tail_descs, k_nope, k_rope, k_scales, raw_ready, table_ptr, b, lo, tail_start, PAGED, PAGE_SIZE,
     MAX_BLOCKS, NUM_PAGES) = loads
    keys, N_MAX, TOKEN = prefetch
    if j < n_blocks:
        start, row = _block_row(j, lo, table_ptr, b, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
        tokens = BLOCK_N
        if not PAGED:
            tokens = gl.minimum(N_MAX - start, BLOCK_N)       # the last block may end past the capacity
        nbytes = tokens * (TOKEN * (keys.dtype.element_ty.primitive_bitwidth // 8))
        lanes = gl.arange(0, 128, layout=gl.BlockedLayout([1], [32], [4], [0]))
        gl.inline_asm_elementwise(
            "{ .reg .pred first; setp.eq.s32 first, $2, 0; "
            "@first cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,r", [keys + row.to(gl.int64) * TOKEN + lanes * 0, lanes, nbytes + lanes * 0],
            dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _descriptor_pair(base, rows, D_V: gl.constexpr, D_R: gl.constexpr, BOX_ROWS: gl.constexpr):
    """TMA descriptors over rows [rows, D_V + D_R] at base: boxes [BOX_ROWS, D_V] (nope) and [BOX_ROWS, D_R]
    (rope); boxes reaching past `rows` are zero-filled."""
    D: gl.constexpr = D_V + D_R
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    nope = tma.make_tensor_descriptor(base, shape=[rows, D], strides=[D, 1], block_shape=[BOX_ROWS, D_V],
                                      layout=swizzled)
    rope = tma.make_tensor_descriptor(base, shape=[rows, D], strides=[D, 1], block_shape=[BOX_ROWS, D_R],
                                      layout=swizzled)
    return nope, rope


@gluon.jit
def _fp8_producer(q_descs, loads, q_nope, q_rope, q_ready, k_free, n_blocks, D_V: gl.constexpr, prefetch,
                  BLOCKSCALE: gl.constexpr, query, QUERY_SCALED: gl.constexpr):
    """The default partition for an FP8 cache (4 warps): the query tile, then each key block's raw bytes
    (`_fp8_load`, completing raw_ready) into ring slot block % 2 once both consumer groups have released it,
    each block asked of L2 FP8_PREFETCH_AHEAD loads ahead (`_prefetch_block`). The consumer group that scores a
    block converts it (`_slot_scores`), so the loads never wait for a conversion and two blocks convert at once.
    query: (q_loaded, q_factor), the barrier the query tile lands at and its power of two. QUERY_SCALED (a bf16
    query and an "fp8_pertensor" cache): the tile is rewritten as fp16 times a power of two (`_scaled_query`, into
    q_factor) before q_ready, after the first two blocks' loads; else q_loaded is q_ready."""
    q_loaded, q_factor = query
    _load_query_tile(q_descs, q_nope, q_rope, q_loaded, D_V)
    for j in gl.static_range(2):
        if j < n_blocks:
            _fp8_load(j, loads, D_V, BLOCKSCALE)
    _prefetch_block(1 + FP8_PREFETCH_AHEAD, n_blocks, loads, prefetch)
    if QUERY_SCALED:
        mbarrier.wait(q_loaded, 0)
        _scaled_query(q_nope, q_rope, q_factor)
        fence_async_shared()           # the rewritten tile (generic stores) before the consumers' wgmma reads it
        gl.thread_barrier()
        mbarrier.arrive(q_ready, count=1)
    for j in range(2, n_blocks):
        _prefetch_block(j + FP8_PREFETCH_AHEAD, n_blocks, loads, prefetch)
        mbarrier.wait(k_free.index(j % 2), ((j // 2) & 1) ^ 1)
        _fp8_load(j, loads, D_V, BLOCKSCALE)


@gluon.jit
def _query_factor(amax):
    """2^k for a bf16 query whose largest magnitude is amax (float32): k puts it in [2^14, 2^15), where fp16 keeps
    every value within 2^24 of it exact; clamped to normal float32 powers (amax 0 or subnormal: 2^127)."""
    exponent = (amax.to(gl.int32, bitcast=True) >> 23) & 0xFF
    return (gl.minimum(gl.maximum(268 - exponent, 1), 254) << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _scaled_query(q_nope, q_rope, q_factor):
    """The bf16 query tile (q_nope [64, 512], q_rope [64, 64]) rewritten in place as fp16 times 2^k
    (`_query_factor` of its largest magnitude; q_factor [64] float32 gets 2^k), for the fp16 products an
    "fp8_pertensor" cache's codes take (exact in fp16). The products read the same tile in the same swizzled
    layout; only the element type changes. In [16, 64] chunks (8 values a thread: the producer has 56
    registers), each written by the thread that read it, so no barrier."""
    chunk: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    box: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    D_V: gl.constexpr = q_nope.shape[1]
    ROWS: gl.constexpr = 16
    boxes = q_nope._reinterpret(gl.bfloat16, [D_V // 64, BLOCK_M, 64], box)
    boxes16 = q_nope._reinterpret(gl.float16, [D_V // 64, BLOCK_M, 64], box)
    rope16 = q_rope._reinterpret(gl.float16, [BLOCK_M, 64], box)
    amax = gl.zeros([ROWS, 64], gl.float32, layout=chunk)
    for c in range(D_V // 64):
        for r in gl.static_range(BLOCK_M // ROWS):
            amax = gl.maximum(amax, gl.abs(boxes.index(c).slice(r * ROWS, ROWS).load(chunk).to(gl.float32)))
    for r in gl.static_range(BLOCK_M // ROWS):
        amax = gl.maximum(amax, gl.abs(q_rope.slice(r * ROWS, ROWS).load(chunk).to(gl.float32)))
    factor = _query_factor(gl.max(gl.max(amax, axis=1), axis=0))
    for c in range(D_V // 64):
        for r in gl.static_range(BLOCK_M // ROWS):
            x = boxes.index(c).slice(r * ROWS, ROWS).load(chunk).to(gl.float32) * factor
            boxes16.index(c).slice(r * ROWS, ROWS).store(x.to(gl.float16))
    for r in gl.static_range(BLOCK_M // ROWS):
        x = q_rope.slice(r * ROWS, ROWS).load(chunk).to(gl.float32) * factor
        rope16.slice(r * ROWS, ROWS).store(x.to(gl.float16))
    q_factor.store(gl.full([BLOCK_M], factor, gl.float32, layout=gl.BlockedLayout([1], [32], [4], [0])))


@gluon.jit
def _fp8_load(j, loads, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """TMA loads of key block j's tokens into ring slot j % 2, completing raw_ready[j % 2]: the four 128-byte
    code boxes into the upper half of the slot's tile (boxes 4-7 of its eight 8 KB boxes), the rope bytes into
    its rope box (blockscale: 128 bf16 bytes a token; pertensor: 64 codes, in the box's first 4 KB), a
    blockscale cache's scales into k_scales. loads: the kernel's tuple (k_descs, tail_descs:
    `_fp8_descriptors`; the ring's buffers and raw_ready; where the keys are)."""
    (k_descs, tail_descs, k_nope, k_rope, k_scales, raw_ready, table_ptr, b, lo, tail_start, PAGED, PAGE_SIZE,
     MAX_BLOCKS, NUM_PAGES) = loads
    slot = j % 2
    start, row = _block_row(j, lo, table_ptr, b, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
    _fp8_block_load(raw_ready.index(slot), start, row, k_descs, tail_descs, tail_start, _code_boxes(k_nope.index(slot)),
                    k_rope.index(slot), k_scales.index(slot), PAGED, D_V, BLOCKSCALE)


@gluon.jit
def _fp8_block_load(bar, start, row, k_descs, tail_descs, tail_start, codes, k_rope, k_scales, PAGED: gl.constexpr,
                    D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """One FP8 key block's TMA loads (its first key `start`, at descriptor row `row`: `_block_row`) into one
    slot's buffers (`_fp8_copies`), completing bar; a paged cache's partial last block (tail_start) through
    tail_descs, whose rows end at the sequence's length."""
    if BLOCKSCALE:
        mbarrier.expect(bar, BLOCK_N * (D_V + D_V // 32 + 2 * k_rope.shape[1]))
    else:
        mbarrier.expect(bar, BLOCK_N * (D_V + k_rope.shape[1]))
    if PAGED and start == tail_start:
        _fp8_copies(tail_descs, 0, bar, codes, k_rope, k_scales, D_V, BLOCKSCALE)
    else:
        _fp8_copies(k_descs, row, bar, codes, k_rope, k_scales, D_V, BLOCKSCALE)


@gluon.jit
def _fp8_copies(descs, row, bar, codes, k_rope, k_scales, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """The TMA copies of `_fp8_load` for the 64 tokens from `row` of descs into one slot's buffers: codes
    [4, 64, 128] uint8 (`_code_boxes`, group-major), k_rope [64, 64] and k_scales [64, 16] uint8."""
    tma.async_copy_global_to_shared(descs[-1], [0, row, 0], bar, codes)
    if BLOCKSCALE:
        boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        rope = k_rope._reinterpret(gl.uint8, [BLOCK_N, CODE_BOX], boxes)
        tma.async_copy_global_to_shared(descs[0], [row, D_V + D_V // 32], bar, rope)
        tma.async_copy_global_to_shared(descs[1], [row, D_V], bar, k_scales)
    else:
        tma.async_copy_global_to_shared(descs[0], [row, D_V], bar, _rope_codes(k_rope))


@gluon.jit
def _code_boxes(k_nope):
    """A ring slot's upper half, where its block's codes land: boxes 4-7 of its [64, 512] tile as uint8
    [4, 64, 128] (group, token, byte) in the codes' TMA box layout (rank 3, 128-byte swizzle)."""
    boxes3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=3)
    return k_nope._reinterpret(gl.uint8, [8, BLOCK_N, CODE_BOX], boxes3).slice(4, 4, dim=0)


@gluon.jit
def _rope_codes(k_rope):
    """An "fp8_pertensor" slot's rope codes: the first 4 KB of its rope box as uint8 [64, 64]."""
    boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
    return k_rope._reinterpret(gl.uint8, [BLOCK_N, k_rope.shape[1]], boxes)


@gluon.jit
def _dequantize(k_nope, k_rope, k_scales, BLOCKSCALE: gl.constexpr):
    """One ring slot's codes (boxes 4-7 of its [64, 512] tile, as `_fp8_load` put them) -> the tile, in q's
    dtype. BLOCKSCALE: column group c = e4m3 code * scale[token, c] in float32, rounded to bf16 once
    (kernels/fp8.py's rule); else ("fp8_pertensor") the e4m3 values themselves, exact in bf16 and fp16 (the
    kernel applies the cache's scale to the scores and the output), and the rope codes likewise, in place.

    Group c's values take bytes [16 KB c, 16 KB (c + 1)) of the tile: groups 0 and 1 land below the codes, group 2
    over the codes of groups 0 and 1, group 3 over those of groups 2 and 3. So groups 2 and 3 are read whole into
    registers and the producer's warps meet at a barrier before writing them: no thread overwrites codes another
    has not read yet."""
    boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    codes = k_nope._reinterpret(gl.uint8, [8, BLOCK_N, CODE_BOX], boxes)
    scales = k_scales._reinterpret(gl.float32, [BLOCK_N, 4], plain)
    for c in gl.static_range(4):
        group = codes.index(4 + c).load(_code_layout())      # [64, 128]: four 16-byte vectors a thread
        if c >= 2:
            gl.thread_barrier()
        out = k_nope.slice(c * CODE_BOX, CODE_BOX, dim=1)
        if BLOCKSCALE:
            _dequantized_group(group, scales, out, c)
        else:
            out.store(_e4m3_values(group, out.dtype))
    if not BLOCKSCALE:
        rope = _rope_codes(k_rope).load(_rope_code_layout())    # all the box's codes read before any write
        gl.thread_barrier()
        k_rope.store(_e4m3_values(rope, k_rope.dtype))


@gluon.jit
def _e4m3_values(codes, dtype: gl.constexpr):
    """uint8 e4m3 codes -> their values in dtype (bf16 or fp16; exact in both). The hardware converts e4m3 pairs
    to fp16 pairs; to bf16 the way through float32 (two HADD2.F32 and one pack a pair) is kept, because the
    direct fp16 -> bf16 conversion compiles to one F2F a value, on the slow conversion pipe."""
    fp8 = codes.to(gl.float8e4nv, bitcast=True)
    if dtype == gl.float16:
        return fp8.to(gl.float16)
    return fp8.to(gl.float32).to(dtype)


@gluon.jit
def _dequantized_group(codes, scales, out, c: gl.constexpr):
    """Stores codes [64, 128] (uint8 e4m3 of column group c) times their tokens' scales into out (the group's
    bf16 [64, 128] view): one store a group, so the partition meets at one barrier a group, not one a chunk."""
    # The [64, 4] scales in the codes' layout (each thread holds its rows' four), so that the group's column
    # comes out in the codes' row layout with no exchange between threads.
    s = scales.load(_code_layout())
    group = gl.arange(0, 4, layout=gl.SliceLayout(0, _code_layout()))
    s = gl.sum(gl.where(gl.expand_dims(group, 0) == c, s, 0.0), axis=1)
    values = codes.to(gl.float8e4nv, bitcast=True).to(gl.float32) * gl.expand_dims(s, 1)
    out.store(values.to(gl.bfloat16))


@gluon.jit
def _fp8_descriptors(base, rows, TOKEN: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                     BLOCKSCALE: gl.constexpr):
    """TMA descriptors over rows [rows, TOKEN] bytes of an FP8 cache at base (uint8), the codes' last. An
    "fp8_blockscale" cache: boxes of [64, 128] (rope; 128-byte swizzle, as the bf16 tiles) and of [64, 16]
    (scales, plain); an "fp8_pertensor" one: [64, 64] (rope codes, 64-byte swizzle). Boxes reaching past `rows`
    are zero-filled (codes 0, scales 0: a zero key)."""
    if BLOCKSCALE:
        boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
        rope = tma.make_tensor_descriptor(base, shape=[rows, TOKEN], strides=[TOKEN, 1],
                                          block_shape=[BLOCK_N, CODE_BOX], layout=boxes)
        scales = tma.make_tensor_descriptor(base, shape=[rows, TOKEN], strides=[TOKEN, 1],
                                            block_shape=[BLOCK_N, D_V // 32], layout=plain)
        return rope, scales, _code_descriptor(base, rows, TOKEN, D_V)
    else:
        rope_codes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
        rope = tma.make_tensor_descriptor(base, shape=[rows, TOKEN], strides=[TOKEN, 1], block_shape=[BLOCK_N, D_R],
                                          layout=rope_codes)
        return rope, _code_descriptor(base, rows, TOKEN, D_V)


@gluon.jit
def _code_descriptor(base, rows, TOKEN: gl.constexpr, D_V: gl.constexpr):
    """The codes as [group, token, byte]: one box brings a block's four 128-byte groups, group-major, as the
    slot's upper half holds them."""
    boxes3: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=3)
    return tma.make_tensor_descriptor(base, shape=[D_V // CODE_BOX, rows, CODE_BOX], strides=[CODE_BOX, TOKEN, 1],
                                      block_shape=[D_V // CODE_BOX, BLOCK_N, CODE_BOX], layout=boxes3)


@gluon.jit
def mla_decode_gluon_kernel(
    q_ptr, kv_ptr, seqlens_ptr, table_ptr, layer_ptr, kv_scale_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr,
    H: gl.constexpr, S_Q: gl.constexpr, N_MAX: gl.constexpr, NUM_LAYERS: gl.constexpr, LAYER_STRIDE: gl.constexpr,
    PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr, NUM_PAGES: gl.constexpr,
    D_V: gl.constexpr, D_R: gl.constexpr, CAUSAL: gl.constexpr,
    CAPACITY: gl.constexpr, NUM_SPLITS: gl.constexpr, UNIFORM_SPLITS: gl.constexpr, BALANCE: gl.constexpr,
    BATCH: gl.constexpr, BATCH_POW2: gl.constexpr, SLOTS: gl.constexpr, ROW_TILES: gl.constexpr,
    UNIFORM_NUM: gl.constexpr, UNIFORM_DEN: gl.constexpr, KV_FORMAT: gl.constexpr,
):
    """Grid (ROW_TILES = cdiv(S_Q * H, 64), B, NUM_SPLITS), launched with num_warps=4 (the producer, the
    default partition; the two consumer warpgroups are added: 12 warps in all).

    q_ptr [B, S_Q * H, D_V + D_R] bf16 / fp16; kv_ptr [B, N_MAX, D] or pages [NUM_PAGES, PAGE_SIZE, D] of
    q's dtype (D = D_V + D_R = 512 + 64), or with KV_FORMAT 1 ("fp8_blockscale", bf16 q) uint8 of 656 bytes a
    token in place of D, with NUM_LAYERS > 0 a stack read at layer_ptr (0-d int32, clamped);
    seqlens_ptr [B] int32 (clamped to [0, CAPACITY]); table_ptr [B, MAX_BLOCKS] int32 when PAGED (entries
    clamped to the pool); kv_scale_ptr: with KV_FORMAT 2 ("fp8_pertensor": uint8 of 576 e4m3 bytes a token,
    bf16 or fp16 q) the float32 scale, 0-d or [NUM_LAYERS], else unused; scale the softmax scale (float32).
    Outputs as `mla_decode_split_kernel`'s: o_ptr [B, R, D_V], lse_ptr [B, R] float32; with NUM_SPLITS > 1
    o_part_ptr [B, NUM_SPLITS, R, D_V], lse_part_ptr [B, NUM_SPLITS, R] float32 and splits_ptr [B] int32 for
    `mla_decode_combine_kernel`; count_ptr is unused. The split kernel's row rules always apply (`_finish_rows`).
    """
    gl.static_assert(D_V == 2 * HALF_V, "the two consumer groups own 256 output columns each")
    gl.static_assert(D_R == 64, "the rope part is one 64-wide TMA box, reused for the probabilities")
    gl.static_assert(not PAGED or PAGE_SIZE % BLOCK_N == 0, "a 64-key block lies in one page")
    gl.static_assert(KV_FORMAT == 0 or KV_FORMAT == KV_BLOCKSCALE or KV_FORMAT == KV_PERTENSOR,
                     "caches in q's dtype, fp8_blockscale or fp8_pertensor")
    FP8: gl.constexpr = KV_FORMAT != 0
    BLOCKSCALE: gl.constexpr = KV_FORMAT == KV_BLOCKSCALE
    R: gl.constexpr = S_Q * H
    D: gl.constexpr = D_V + D_R
    TOKEN: gl.constexpr = D_V + D_V // 32 + 2 * D_R if BLOCKSCALE else D      # a token's stride in kv_ptr's elements
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    gl.static_assert(not FP8 or D_V == 4 * CODE_BOX, "FP8: 512 codes in 4 groups")
    gl.static_assert(not BLOCKSCALE or dtype == gl.bfloat16, "fp8_blockscale: bf16 queries (the rope values are bf16)")
    tile = gl.program_id(0)
    b = gl.program_id(1)
    split = gl.program_id(2)
    # An "fp8_pertensor" cache's scale multiplies the scores and the output, not each value (`_dequantize`).
    V_SCALED: gl.constexpr = KV_FORMAT == KV_PERTENSOR
    kv_ptr, v_scale = _layer_keys(kv_ptr, kv_scale_ptr, layer_ptr, NUM_LAYERS, LAYER_STRIDE, V_SCALED)
    seqlen, splits_here = _sequence_splits(seqlens_ptr, b, CAPACITY, NUM_SPLITS, UNIFORM_SPLITS, BALANCE, BATCH,
                                           BATCH_POW2, SLOTS, ROW_TILES, UNIFORM_NUM, UNIFORM_DEN)
    lo, hi, first_limit = _split_keys(seqlen, splits_here, split, tile, H, S_Q, CAUSAL)
    n_blocks = gl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
    if NUM_SPLITS > 1:
        gl.store(splits_ptr + b, splits_here, mask=(tile == 0) & (split == 0))
        if split >= splits_here:
            # Past this sequence's splits (a cap the lengths did not need): nothing to read or write. Leaving
            # before the descriptors and the warp groups start matters: such programs can outnumber the real ones.
            return

    q_base = q_ptr + (b.to(gl.int64) * R + tile * BLOCK_M) * D
    q_rows = gl.minimum(R - tile * BLOCK_M, BLOCK_M)                      # real rows of this tile
    q_descs = _descriptor_pair(q_base, q_rows, D_V, D_R, BLOCK_M)          # rows past them read as 0
    k_descs, tail_descs, tail_start = _key_descriptors(kv_ptr, b, seqlen, table_ptr, N_MAX, TOKEN, D_V, D_R, PAGED,
                                                       PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, FP8, BLOCKSCALE)
    prefetch = (kv_ptr if PAGED else kv_ptr + b.to(gl.int64) * N_MAX * TOKEN, N_MAX, TOKEN)
    # An "fp8_pertensor" cache's ring holds fp16 tiles (its codes are exact in fp16: one conversion a code pair),
    # and a bf16 query is rewritten as fp16 times a power of two by the producer (`_scaled_query`).
    QUERY_SCALED: gl.constexpr = V_SCALED and dtype == gl.bfloat16
    key_dtype: gl.constexpr = gl.float16 if V_SCALED else dtype
    q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done = _seesaw_buffers(
        dtype, key_dtype, D_V, D_R)
    bars = (q_ready, k_ready, k_free, p_ready, done, k_ready)     # the last: no front-half barrier here

    # Output descriptors end at the tile's last real row; partials only when a sequence may split.
    o_desc = _output_descriptor(o_ptr + (b.to(gl.int64) * R + tile * BLOCK_M) * D_V, q_rows, D_V)
    o_part_desc = o_desc
    if NUM_SPLITS > 1:
        o_part_desc = _output_descriptor(o_part_ptr + ((b.to(gl.int64) * NUM_SPLITS + split) * R + tile * BLOCK_M) * D_V,
                                         q_rows, D_V)
    # The last three unused here: slot flags, q_factor, the sparse kernel's scales.
    smem = (q_nope, q_rope, k_nope, k_rope, m_x, l_x, m_x, m_x, m_x)
    qk_scale = scale * LOG2E * v_scale if V_SCALED else scale * LOG2E
    work = (qk_scale, seqlen, lo, n_blocks, first_limit, tile, b, split, splits_here, v_scale)
    outputs = (o_desc, o_part_desc, lse_ptr, lse_part_ptr)
    if FP8:
        # k_ready completes when a block's raw bytes land: the consumers convert it themselves.
        loads = _fp8_loads(k_descs, tail_descs, k_nope, k_rope, k_ready, table_ptr, b, lo, tail_start, PAGED,
                           PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
        k_scales = loads[4]
        smem = (q_nope, q_rope, k_nope, k_rope, m_x, l_x, m_x, m_x, k_scales)
        query = (q_ready, m_x)
        if QUERY_SCALED:
            vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
            swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
            q_factor = gl.allocate_shared_memory(gl.float32, [BLOCK_M], vec)           # the query's power of two
            q_loaded = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(q_loaded, count=1)
            # The consumers read the query as `_scaled_query` leaves it.
            smem = (q_nope._reinterpret(gl.float16, [BLOCK_M, D_V], swizzled),
                    q_rope._reinterpret(gl.float16, [BLOCK_M, D_R], swizzled), k_nope, k_rope, m_x, l_x, m_x, q_factor,
                    k_scales)
            query = (q_loaded, q_factor)
        gl.warp_specialize([
            (_fp8_producer, (q_descs, loads, q_nope, q_rope, q_ready, k_free, n_blocks, D_V, prefetch, BLOCKSCALE,
                             query, QUERY_SCALED)),
            (_left_half, (smem, bars, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, V_SCALED, False, False, None,
                          QUERY_SCALED, False, KV_FORMAT)),
            (_right_half, (smem, bars, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, V_SCALED, False, QUERY_SCALED, False,
                           KV_FORMAT)),
        ], [4, 4], [FP8_CONSUMER_REGS, FP8_CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (q_descs, k_descs, tail_descs, q_nope, q_rope, k_nope, k_rope, q_ready, k_ready, k_free,
                         table_ptr, b, lo, n_blocks, tail_start, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V)),
            (_left_half, (smem, bars, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, V_SCALED)),
            (_right_half, (smem, bars, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, V_SCALED)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])


@gluon.jit
def _seesaw_buffers(dtype: gl.constexpr, key_dtype: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                    K_READY_ARRIVALS: gl.constexpr = 1):
    """The 64-row kernels' shared memory and initialised barriers (this kernel's and the sparse one's):
    q_nope [64, D_V], q_rope [64, D_R] (the query tile, in q's dtype), k_nope [2, 64, D_V] and k_rope [2, 64, D_R]
    (the two-slot key ring, in key_dtype), m_x, l_x [128] float32 (the groups' maxima m0 | m1 and row sums
    left | right), then the barriers q_ready, k_ready [2] (completed by K_READY_ARRIVALS arrivals), k_free [2],
    p_ready [2], done."""
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_nope = gl.allocate_shared_memory(dtype, [BLOCK_M, D_V], swizzled)
    q_rope = gl.allocate_shared_memory(dtype, [BLOCK_M, D_R], swizzled)
    k_nope = gl.allocate_shared_memory(key_dtype, [2, BLOCK_N, D_V], swizzled)
    k_rope = gl.allocate_shared_memory(key_dtype, [2, BLOCK_N, D_R], swizzled)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    m_x = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_M], rows_layout)
    l_x = gl.allocate_shared_memory(gl.float32, [2 * BLOCK_M], rows_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(done, count=2)
    for i in gl.static_range(2):
        mbarrier.init(k_ready.index(i), count=K_READY_ARRIVALS)
        mbarrier.init(k_free.index(i), count=2)          # both consumer groups release a slot
        mbarrier.init(p_ready.index(i), count=1)
    return q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done


@gluon.jit
def _layer_keys(kv_ptr, kv_scale_ptr, layer_ptr, NUM_LAYERS: gl.constexpr, LAYER_STRIDE: gl.constexpr,
                V_SCALED: gl.constexpr):
    """(kv_ptr, v_scale): with NUM_LAYERS > 0 the cache pointer moved to the layer at layer_ptr (0-d int32, clamped
    to [0, NUM_LAYERS)); V_SCALED: the "fp8_pertensor" scale at kv_scale_ptr (0-d, or [NUM_LAYERS] with a
    stack), else 1."""
    if NUM_LAYERS > 0:
        layer = gl.minimum(gl.maximum(gl.load(layer_ptr), 0), NUM_LAYERS - 1)
        kv_ptr += layer.to(gl.int64) * LAYER_STRIDE
        if V_SCALED:
            kv_scale_ptr += layer
    v_scale = 1.0
    if V_SCALED:
        v_scale = gl.load(kv_scale_ptr)
    return kv_ptr, v_scale


@gluon.jit
def _key_descriptors(kv_ptr, b, seqlen, table_ptr, N_MAX: gl.constexpr, TOKEN: gl.constexpr, D_V: gl.constexpr,
                     D_R: gl.constexpr, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr,
                     NUM_PAGES: gl.constexpr, FP8: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """(k_descs, tail_descs, tail_start): the TMA descriptors of sequence b's keys (`_descriptor_pair` in q's
    dtype, `_fp8_descriptors` for an FP8 cache; TOKEN: a token's stride in kv_ptr's elements) and of a paged
    cache's partial last block, which starts at tail_start (contiguous: tail_descs are k_descs). Key rows end at
    the sequence's length: a box reaching past it is zero-filled."""
    tail_start = (gl.maximum(seqlen, 1) - 1) // BLOCK_N * BLOCK_N
    if PAGED:
        tail_page = gl.load(table_ptr + b * MAX_BLOCKS + tail_start // PAGE_SIZE)
        tail_page = gl.minimum(gl.maximum(tail_page, 0), NUM_PAGES - 1)
        tail_base = kv_ptr + (tail_page.to(gl.int64) * PAGE_SIZE + tail_start % PAGE_SIZE) * TOKEN
        if FP8:
            k_descs = _fp8_descriptors(kv_ptr, NUM_PAGES * PAGE_SIZE, TOKEN, D_V, D_R, BLOCKSCALE)
            tail_descs = _fp8_descriptors(tail_base, gl.maximum(seqlen - tail_start, 1), TOKEN, D_V, D_R, BLOCKSCALE)
        else:
            k_descs = _descriptor_pair(kv_ptr, NUM_PAGES * PAGE_SIZE, D_V, D_R, BLOCK_N)
            tail_descs = _descriptor_pair(tail_base, gl.maximum(seqlen - tail_start, 1), D_V, D_R, BLOCK_N)
    else:
        if FP8:
            k_descs = _fp8_descriptors(kv_ptr + b.to(gl.int64) * N_MAX * TOKEN, gl.maximum(seqlen, 1), TOKEN, D_V, D_R,
                                       BLOCKSCALE)
        else:
            k_descs = _descriptor_pair(kv_ptr + b.to(gl.int64) * N_MAX * TOKEN, gl.maximum(seqlen, 1), D_V, D_R,
                                       BLOCK_N)
        tail_descs = k_descs
    return k_descs, tail_descs, tail_start


@gluon.jit
def _fp8_loads(k_descs, tail_descs, k_nope, k_rope, raw_ready, table_ptr, b, lo, tail_start, PAGED: gl.constexpr,
               PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr, NUM_PAGES: gl.constexpr):
    """`_fp8_load`'s tuple for an FP8 cache, with the raw-byte buffer it adds: k_scales [2, 64, 16] uint8 (a
    blockscale token's 4 float32 scales; element 4); raw_ready [2] (element 5): the barriers a block's loads
    complete, initialised for one arrival."""
    D_V: gl.constexpr = k_nope.shape[2]
    plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    k_scales = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, D_V // 32], plain)
    return (k_descs, tail_descs, k_nope, k_rope, k_scales, raw_ready, table_ptr, b, lo, tail_start, PAGED, PAGE_SIZE,
            MAX_BLOCKS, NUM_PAGES)


@gluon.jit
def _output_descriptor(base, rows, D_V: gl.constexpr):
    """A TMA store descriptor over rows [rows, D_V] at base, in [64, 256] boxes (rows past `rows` dropped)."""
    element_bits: gl.constexpr = base.dtype.element_ty.primitive_bitwidth
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=element_bits, rank=2)
    return tma.make_tensor_descriptor(base, shape=[rows, D_V], strides=[D_V, 1], block_shape=[BLOCK_M, HALF_V],
                                      layout=layout)
