"""MLA decode for Hopper in Gluon, operand-swapped for narrow query tiles (S_q * H <= 32 rows: D1-D4).

kernels/gluon_decode.py pads such a tile to the 64 rows of a wgmma M extent, so at D1 (16 rows) three quarters
of its tensor work is padding, and that work (~1.6 µs a 64-key block) is close to the time the block takes to
read (~2.1 µs at the read ceiling). Here the keys are the M side instead:

    S^T [64 keys, R] = K [64, 576] . Q^T [576, R]          (m64nRk16, R = 16 or 32 query rows)
    O^T [512, R]    += V^T [512, 64] . P^T [64, R]         (V^T: the key tile read transposed from shared memory)

so a block costs a quarter (16 rows) or half (32 rows) of the padded products. The softmax runs over the keys,
axis 0 of S^T, across the four warps of a warpgroup (the compiler reduces through shared memory).

Partitions (12 warps): the default one (4 warps) is kernels/gluon_decode.py's `_producer`: the query tile, then
key block j into ring slot j % 2. Consumer warpgroup g takes the blocks j with j % 2 == g, each with its own
running max, row sums and O^T (no exchange inside the loop), and releases its slot when its products are done.
At the end group 1 hands its state to group 0 through its own, now idle, ring slot; group 0 merges the two and
writes the result (a sequence's only split) or the split's float32 partial and LSE for the combine kernel, with
the split kernel's row rules.

Caches: in q's dtype (bf16, fp16), "fp8_blockscale" (bf16 q) or "fp8_pertensor"; contiguous, paged (pages of 64
tokens or more) or stacked. FP8 takes gluon_decode's producer that dequantizes in the ring slot (`_fp8_producer`),
each consumer group reloading its own slot; at 32 rows its consumers' 224 registers spill 24-32 bytes, so ops
runs FP8 through this kernel only up to 16 rows (`ops.decode.uses_narrow_kernel`).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)

from flashmla_jax.kernels._common import LOG2E
from flashmla_jax.kernels.gluon_decode import (BLOCK_N, CODE_BOX, KV_BLOCKSCALE, KV_PERTENSOR, _descriptor_pair,
                                               _fp8_loads, _fp8_producer, _fp8_reload, _key_descriptors, _layer_keys,
                                               _producer, _row_results, _safe, _sequence_splits, _split_keys)

# Registers per consumer thread (the producer's warps get the rest): O^T [512, rows] takes rows * 4 of them.
# Compiled without spills at these: 232 for 16 rows (at 240 the paged producer's 24 spill), 240 for 32.
CONSUMER_REGS_16 = gl.constexpr(232)
CONSUMER_REGS_32 = gl.constexpr(240)
# With an FP8 cache the producer dequantizes and needs 56 registers a thread (kernels/gluon_decode.py).
FP8_CONSUMER_REGS = gl.constexpr(224)


@gluon.constexpr_function
def _keys_layout(rows):
    """The layout of S^T [64, rows] and O^T [512, rows]: wgmma accumulators of N = rows, the warpgroup's four
    warps along M (keys, or output columns)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, rows, 16])


@gluon.constexpr_function
def _rows_layout(rows):
    """[rows] vectors over the query rows: axis 1 of `_keys_layout`."""
    return gl.SliceLayout(0, _keys_layout(rows))


@gluon.jit
def _row_limits(seqlen, ROWS: gl.constexpr, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr):
    """[ROWS] int32: row r (query s = r // H) sees the keys below its limit."""
    rows = gl.arange(0, ROWS, layout=_rows_layout(ROWS))
    if CAUSAL:
        limit = seqlen - S_Q + 1 + rows // H
    else:
        limit = rows * 0 + seqlen
    return limit


@gluon.jit
def _block_scores_t(q_nope, q_rope, k_nope, k_rope):
    """Issues S^T = K Q^T [64, ROWS] (576 deep); returns the async token. As gluon_decode's `_block_scores`,
    the 512-deep part runs over the tiles' eight 64-wide boxes as a loop."""
    box: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    ROWS: gl.constexpr = q_nope.shape[0]
    boxes: gl.constexpr = k_nope.shape[1] // 64
    q_boxes = q_nope._reinterpret(q_nope.dtype, [boxes, ROWS, 64], box)
    k_boxes = k_nope._reinterpret(k_nope.dtype, [boxes, BLOCK_N, 64], box)
    s = warpgroup_mma_init(gl.zeros([BLOCK_N, ROWS], gl.float32, layout=_keys_layout(ROWS)))
    for c in range(boxes):
        s = warpgroup_mma(k_boxes.index(c), q_boxes.index(c).permute((1, 0)), s, is_async=True)
    return warpgroup_mma(k_rope, q_rope.permute((1, 0)), s, is_async=True)


@gluon.jit
def _consumer(group: gl.constexpr, q_nope, q_rope, k_nope, k_rope, p_t, x_m, x_l, q_ready, k_ready, k_free,
              handed, work, outputs, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr,
              NUM_SPLITS: gl.constexpr, loads, FP8: gl.constexpr, BLOCKSCALE: gl.constexpr,
              V_SCALED: gl.constexpr):
    """Consumer warpgroup `group`: blocks group, group + 2, ... of this split, then (group 1) its state to
    shared memory, or (group 0) the merge of both and the output. p_t [ROWS, 64]: this group's P for the P V
    product (the wgmma's B operand comes from shared memory). FP8: the group loads block j + 2's raw bytes into
    its slot as it frees it after block j (gluon_decode's `_fp8_reload`; loads: `_fp8_load`'s tuple), so the
    producer only converts and never waits for a slot."""
    qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale = work
    ROWS: gl.constexpr = q_nope.shape[0]
    D_V: gl.constexpr = k_nope.shape[2]
    dtype: gl.constexpr = q_nope.dtype
    keys_l: gl.constexpr = _keys_layout(ROWS)
    rows_l: gl.constexpr = _rows_layout(ROWS)
    slot_nope = k_nope.index(group)
    slot_rope = k_rope.index(group)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=rows_l)
    l_i = gl.zeros([ROWS], gl.float32, layout=rows_l)
    acc = gl.zeros([D_V, ROWS], gl.float32, layout=keys_l)
    mbarrier.wait(q_ready, 0)
    for i in range((n_blocks - group + 1) // 2):
        j = 2 * i + group
        start = lo + j * BLOCK_N
        mbarrier.wait(k_ready.index(group), i & 1)
        s = _block_scores_t(q_nope, q_rope, slot_nope, slot_rope)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        s = s * qk_scale
        if start + BLOCK_N > first_limit:
            keys = start + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, keys_l))
            limit = _row_limits(seqlen, ROWS, H, S_Q, CAUSAL)
            s = gl.where(gl.expand_dims(keys, 1) < gl.expand_dims(limit, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=0))
        m_safe = _safe(m_new)
        p = gl.exp2(s - gl.expand_dims(m_safe, 0))
        alpha = gl.exp2(m_i - m_safe)
        l_i = l_i * alpha + gl.sum(p, axis=0)
        acc = acc * gl.expand_dims(alpha, 0)
        p_t.store(gl.permute(p.to(dtype), (1, 0)))
        fence_async_shared()
        gl.thread_barrier()        # every warp's part of P stored before the warpgroup's wgmma reads it
        acc = warpgroup_mma(slot_nope.permute((1, 0)), p_t.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(k_free.index(group), count=1)
        if FP8:
            _fp8_reload(j + 2, k_free, loads, n_blocks, D_V, BLOCKSCALE)
        m_i = m_new
    # A NaN in a row's accumulator makes its row sum NaN (gluon_decode's `_finish_rows` rule), so that the
    # merge below carries it whatever the weights.
    nan_in_row = gl.max(gl.where(acc != acc, 1, 0), axis=0)
    l_i = gl.where(nan_in_row > 0, float("nan"), l_i)
    # Both ring slots are idle once each group's last product is done (group g only uses slot g): each group's
    # O, [ROWS, 512] float32, goes into its own slot, where group 0 merges them a column chunk at a time.
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    slot_nope._reinterpret(gl.float32, [ROWS, D_V], plain).store(gl.permute(acc, (1, 0)))
    if group == 1:
        x_m.store(m_i)
        x_l.store(l_i)
        gl.thread_barrier()        # all of group 1's stores before its one arrival
        mbarrier.arrive(handed, count=1)
    else:
        gl.thread_barrier()        # group 0's own O stored by all its warps before they read it back
        mbarrier.wait(handed, 0)
        m_1 = x_m.load(rows_l)
        m = gl.maximum(m_i, m_1)
        m_safe = _safe(m)
        w_0 = gl.exp2(m_i - m_safe)
        w_1 = gl.exp2(m_1 - m_safe)
        l_all = l_i * w_0 + x_l.load(rows_l) * w_1
        saw_keys = (n_blocks > 0) & (lo < _row_limits(seqlen, ROWS, H, S_Q, CAUSAL))
        o_0 = k_nope.index(0)._reinterpret(gl.float32, [ROWS, D_V], plain)
        o_1 = k_nope.index(1)._reinterpret(gl.float32, [ROWS, D_V], plain)
        _write_rows(o_0, o_1, w_0, w_1, m, l_all, saw_keys, v_scale, outputs, b, split, splits_here, n_blocks > 0,
                    H * S_Q, NUM_SPLITS, V_SCALED)


@gluon.jit
def _write_rows(o_0, o_1, w_0, w_1, m, l_all, saw_keys, v_scale, outputs, b, split, splits_here, nonempty,
                R: gl.constexpr, NUM_SPLITS: gl.constexpr, V_SCALED: gl.constexpr):
    """The split's result from the two groups' O (o_0, o_1: [ROWS, 512] float32 in shared memory) merged with
    weights w_0, w_1 [ROWS], the merged running max m and row sums l_all (NaN for a row with a NaN in either
    accumulator), with gluon_decode's `_finish_rows` row rules: a NaN row sum gives NaN output and LSE; a row
    that saw keys (saw_keys) and gave them no weight gets NaN output and ALL_NEG_INF_LSE. Stored as
    gluon_decode's `_store_half` does: the result for a sequence's only split, else the float32 partial (not
    for an empty split) and the LSE; 128 columns at a time. V_SCALED: the output times v_scale (an
    "fp8_pertensor" cache's scale, left out of its values) where the row has weight."""
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr = outputs
    ROWS: gl.constexpr = o_0.shape[0]
    D_V: gl.constexpr = o_0.shape[1]
    CHUNK: gl.constexpr = 128
    lse, divisor = _row_results(m, l_all, saw_keys, v_scale, V_SCALED)
    rows_l: gl.constexpr = _rows_layout(ROWS)
    rows = gl.arange(0, ROWS, layout=rows_l)
    # Each thread four consecutive columns of one row: vector loads from shared memory, coalesced stores.
    chunk_l: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])
    rows_c = gl.arange(0, ROWS, layout=gl.SliceLayout(1, chunk_l))
    cols_c = gl.arange(0, CHUNK, layout=gl.SliceLayout(0, chunk_l))
    per_row: gl.constexpr = gl.SliceLayout(1, chunk_l)
    f_0 = gl.expand_dims(gl.convert_layout(w_0 / divisor, per_row), 1)
    f_1 = gl.expand_dims(gl.convert_layout(w_1 / divisor, per_row), 1)
    offsets = gl.expand_dims(rows_c, 1).to(gl.int64) * D_V + gl.expand_dims(cols_c, 0)
    row_ok = gl.expand_dims(rows_c < R, 1) & gl.expand_dims(cols_c < CHUNK, 0)
    final = (splits_here == 1) & (split == 0)
    taken = (splits_here > 1) & (split < splits_here)
    part = (b.to(gl.int64) * NUM_SPLITS + split) * R
    for c in gl.static_range(D_V // CHUNK):
        # w / divisor is NaN for a NaN row: 0 * NaN and NaN * NaN alike give the row's NaN.
        out = (o_0.slice(c * CHUNK, CHUNK, dim=1).load(chunk_l) * f_0
               + o_1.slice(c * CHUNK, CHUNK, dim=1).load(chunk_l) * f_1)
        if final:
            gl.store(o_ptr + b.to(gl.int64) * R * D_V + c * CHUNK + offsets, out.to(o_ptr.dtype.element_ty),
                     mask=row_ok)
        if NUM_SPLITS > 1:
            if taken & nonempty:      # an empty split (lse -inf) is never read by the combine
                gl.store(o_part_ptr + part * D_V + c * CHUNK + offsets, out, mask=row_ok)
    if final:
        gl.store(lse_ptr + b.to(gl.int64) * R + rows, lse, mask=rows < R)
    if NUM_SPLITS > 1:
        gl.store(lse_part_ptr + part + rows, lse, mask=(rows < R) & taken)


@gluon.jit
def mla_decode_gluon_narrow_kernel(
    q_ptr, kv_ptr, seqlens_ptr, table_ptr, layer_ptr, kv_scale_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr,
    H: gl.constexpr, S_Q: gl.constexpr, N_MAX: gl.constexpr, NUM_LAYERS: gl.constexpr, LAYER_STRIDE: gl.constexpr,
    PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr, NUM_PAGES: gl.constexpr,
    D_V: gl.constexpr, D_R: gl.constexpr, CAUSAL: gl.constexpr,
    CAPACITY: gl.constexpr, NUM_SPLITS: gl.constexpr, UNIFORM_SPLITS: gl.constexpr, BALANCE: gl.constexpr,
    BATCH: gl.constexpr, BATCH_POW2: gl.constexpr, SLOTS: gl.constexpr, ROW_TILES: gl.constexpr,
    UNIFORM_NUM: gl.constexpr, UNIFORM_DEN: gl.constexpr, KV_FORMAT: gl.constexpr,
):
    """Grid (1, B, NUM_SPLITS), launched with num_warps=4 (the producer; the two consumer warpgroups are added:
    12 warps). Arguments, outputs and schedule as kernels/gluon_decode.py's `mla_decode_gluon_kernel` for
    R = S_Q * H <= 32 query rows (one row tile): q_ptr [B, R, 576]; kv_ptr [B, N_MAX, 576] in q's dtype (KV_FORMAT
    0), or uint8 tokens of 656 bytes (1, "fp8_blockscale", bf16 q) or 576 (2, "fp8_pertensor", its float32
    scale at kv_scale_ptr, 0-d or [NUM_LAYERS]), as pages [NUM_PAGES, PAGE_SIZE, ...] when PAGED, a stack of
    either read at layer_ptr; o_ptr [B, R, D_V]; with NUM_SPLITS > 1 o_part_ptr [B, NUM_SPLITS, R, D_V],
    lse_part_ptr [B, NUM_SPLITS, R] and splits_ptr [B] for `mla_decode_combine_kernel`; count_ptr is unused."""
    gl.static_assert(KV_FORMAT == 0 or KV_FORMAT == KV_BLOCKSCALE or KV_FORMAT == KV_PERTENSOR,
                     "caches in q's dtype, fp8_blockscale or fp8_pertensor")
    gl.static_assert(S_Q * H <= 32, "at most 32 query rows (S_q * H)")
    gl.static_assert(D_R == 64, "the rope part is one 64-wide TMA box")
    gl.static_assert(not PAGED or PAGE_SIZE % BLOCK_N == 0, "a 64-key block lies in one page")
    FP8: gl.constexpr = KV_FORMAT != 0
    BLOCKSCALE: gl.constexpr = KV_FORMAT == KV_BLOCKSCALE
    V_SCALED: gl.constexpr = KV_FORMAT == KV_PERTENSOR
    R: gl.constexpr = S_Q * H
    ROWS: gl.constexpr = 16 if R <= 16 else 32
    CONSUMER_REGS: gl.constexpr = FP8_CONSUMER_REGS if FP8 else (CONSUMER_REGS_16 if R <= 16 else CONSUMER_REGS_32)
    D: gl.constexpr = D_V + D_R
    TOKEN: gl.constexpr = D_V + D_V // 32 + 2 * D_R if BLOCKSCALE else D      # a token's stride in kv_ptr's elements
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    gl.static_assert(not FP8 or D_V == 4 * CODE_BOX, "FP8: 512 codes in 4 groups")
    gl.static_assert(not BLOCKSCALE or dtype == gl.bfloat16, "fp8_blockscale: bf16 queries (the rope values are bf16)")
    b = gl.program_id(1)
    split = gl.program_id(2)
    kv_ptr, v_scale = _layer_keys(kv_ptr, kv_scale_ptr, layer_ptr, NUM_LAYERS, LAYER_STRIDE, V_SCALED)
    seqlen, splits_here = _sequence_splits(seqlens_ptr, b, CAPACITY, NUM_SPLITS, UNIFORM_SPLITS, BALANCE, BATCH,
                                           BATCH_POW2, SLOTS, ROW_TILES, UNIFORM_NUM, UNIFORM_DEN)
    if NUM_SPLITS > 1:
        gl.store(splits_ptr + b, splits_here, mask=split == 0)
        if split >= splits_here:
            return      # past this sequence's splits: nothing to read or write
    lo, hi, first_limit = _split_keys(seqlen, splits_here, split, 0, H, S_Q, CAUSAL)
    n_blocks = gl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N

    q_descs = _descriptor_pair(q_ptr + b.to(gl.int64) * R * D, R, D_V, D_R, ROWS)      # rows past R read as 0
    k_descs, tail_descs, tail_start = _key_descriptors(kv_ptr, b, seqlen, table_ptr, N_MAX, TOKEN, D_V, D_R, PAGED,
                                                       PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, FP8, BLOCKSCALE)

    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    q_nope = gl.allocate_shared_memory(dtype, [ROWS, D_V], swizzled)
    q_rope = gl.allocate_shared_memory(dtype, [ROWS, D_R], swizzled)
    k_nope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D_V], swizzled)
    k_rope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D_R], swizzled)
    p_t = gl.allocate_shared_memory(dtype, [2, ROWS, BLOCK_N], swizzled)     # each group's P
    vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    x_m = gl.allocate_shared_memory(gl.float32, [ROWS], vec)                 # group 1's running max
    x_l = gl.allocate_shared_memory(gl.float32, [ROWS], vec)                 # and its row sums
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    handed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    mbarrier.init(handed, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_free.index(i), count=1)          # one group uses each slot

    qk_scale = scale * LOG2E * v_scale if V_SCALED else scale * LOG2E
    work = (qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale)
    outputs = (o_ptr, lse_ptr, o_part_ptr, lse_part_ptr)
    if FP8:
        loads = _fp8_loads(k_descs, tail_descs, k_nope, k_rope, table_ptr, b, lo, tail_start, PAGED, PAGE_SIZE,
                           MAX_BLOCKS, NUM_PAGES)
        prefetch = (kv_ptr if PAGED else kv_ptr + b.to(gl.int64) * N_MAX * TOKEN, N_MAX, TOKEN)
        gl.warp_specialize([
            (_fp8_producer, (q_descs, loads, q_nope, q_rope, k_nope, k_rope, loads[4], q_ready, loads[5], k_ready,
                             n_blocks, D_V, prefetch, BLOCKSCALE)),
            (_consumer, (0, q_nope, q_rope, k_nope, k_rope, p_t.index(0), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, loads, True, BLOCKSCALE, V_SCALED)),
            (_consumer, (1, q_nope, q_rope, k_nope, k_rope, p_t.index(1), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, loads, True, BLOCKSCALE, V_SCALED)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        gl.warp_specialize([
            (_producer, (q_descs, k_descs, tail_descs, q_nope, q_rope, k_nope, k_rope, q_ready, k_ready, k_free,
                         table_ptr, b, lo, n_blocks, tail_start, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V)),
            # `loads` is unused without FP8.
            (_consumer, (0, q_nope, q_rope, k_nope, k_rope, p_t.index(0), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, b, False, False, False)),
            (_consumer, (1, q_nope, q_rope, k_nope, k_rope, p_t.index(1), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS, b, False, False, False)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
