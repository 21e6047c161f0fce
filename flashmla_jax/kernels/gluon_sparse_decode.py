"""Sparse (top-k) absorbed MLA attention for Hopper in Gluon, decode and prefill (its max_logits too): kernels/gluon_decode.py's two consumer warpgroups (64
heads of one query token a program, the seesaw over 64-slot blocks) fed by a gathering producer.

Each query token (a "pair", as in kernels/sparse.py) attends to its own list of TOPK token indices into a flat
pool (a paged pool is flat: index = page * page_size + offset). Hopper's TMA cannot gather rows, so the producer
(the default partition, 4 warps) loads block j's 64 listed tokens with cp.async, row by row, into ring slot
j % 2 in the swizzled layout the wgmma reads: a cache in q's dtype directly; an "fp8_blockscale" pool's codes
into the upper half of the slot's tile, its bf16 rope and its scales beside. Every block is released to the
consumers by its copies themselves (cp.async arrivals on `k_ready`), and the consumers fence the slot for the
tensor cores' proxy. In q's dtype the block's first four 64-column boxes also complete `k_front`, on which the
scores start. An FP8 block is dequantized in place (`_dequantize`) by the consumer group that scores it (the
left group the even blocks, the right the odd ones), so two blocks convert at once and no conversion waits for
a gather.

Slots past the pair's top-k length and indices outside [0, NUM_TOKENS) are never read: their rows are
zero-filled and the producer stores each block's slot validity beside the ring, where the consumers mask the
scores by it (gluon_decode's SPARSE mode). A row with no valid index gives 0 and -inf; NaN propagates.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import async_copy, mbarrier

from flashmla_jax.kernels._common import LOG2E
from flashmla_jax.kernels.gluon_decode import (BLOCK_M, BLOCK_N, CODE_BOX, FP8_CONSUMER_REGS, HALF_V, KV_BLOCKSCALE,
                                               _descriptor_pair, _layer_keys, _left_half,
                                               _load_query_tile, _output_descriptor, _right_half,
                                               _seesaw_buffers)


# Registers a consumer thread with an FP8 pool, where the consumers dequantize and the producer only gathers
# (48 left to it): at 224 the consumers spill 8 bytes, at 240 the producer 16.
CONSUMER_REGS_CONVERTING = gl.constexpr(232)


@gluon.constexpr_function
def _row_chunks(row_bytes):
    """The layout of a [64, row_bytes // element] gather: 16 bytes a thread, a row over row_bytes // 16 threads."""
    threads = row_bytes // 16
    return gl.BlockedLayout([1, 16], [32 // threads, threads], [4, 1], [1, 0])


@gluon.jit
def _gather_rows(dst, rows, valid, base, offset, ROW_BYTES: gl.constexpr):
    """cp.async of ROW_BYTES bytes from base + rows[i] * token + offset (uint8 addressing) into row i of dst
    ([64, ROW_BYTES] uint8 view of the ring), for every valid row; invalid rows are zero-filled."""
    layout: gl.constexpr = _row_chunks(ROW_BYTES)
    r = gl.convert_layout(rows, gl.SliceLayout(1, layout))
    ok = gl.convert_layout(valid, gl.SliceLayout(1, layout))
    cols = gl.arange(0, ROW_BYTES, layout=gl.SliceLayout(0, layout))
    ptrs = base + gl.expand_dims(r, 1) + offset + gl.expand_dims(cols, 0)
    async_copy.async_copy_global_to_shared(dst, ptrs, mask=gl.expand_dims(ok, 1) & gl.expand_dims(cols >= 0, 0))


@gluon.jit
def _block_tokens(j, idx_ptr, pair, lo, hi, TOPK: gl.constexpr, NUM_TOKENS: gl.constexpr):
    """(valid, idx) [64]: which of block j's slots (lo + 64 j ...) hold a token of the pair's list inside the
    pool, and their indices."""
    flags_l: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    slots = lo + j * BLOCK_N + gl.arange(0, BLOCK_N, layout=flags_l)
    in_list = slots < hi
    idx = gl.load(idx_ptr + pair.to(gl.int64) * TOPK + slots, mask=in_list, other=-1)
    valid = in_list & (idx >= 0) & (idx < NUM_TOKENS)
    return valid, idx


@gluon.jit
def _gather_block(j, valid, idx, gather, TOKEN_BYTES: gl.constexpr, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """Block j's tokens (`_block_tokens`) into ring slot j % 2 once both consumer groups have released it: their
    validity into valid_x, their bytes by cp.async. gather: (kv_bytes (the pool as uint8), k_nope, k_rope,
    k_scales, valid_x, k_free, k_front). A pool in q's dtype: each thread's copies of the first four boxes arrive
    on k_front before the rest are issued."""
    kv_bytes, k_nope, k_rope, k_scales, valid_x, k_free, k_front = gather
    slot = j % 2
    mbarrier.wait(k_free.index(slot), ((j // 2) & 1) ^ 1)      # a fresh barrier passes phase 1
    valid_x.index(slot).store(valid.to(gl.int8))
    rows = gl.where(valid, idx, 0).to(gl.int64) * TOKEN_BYTES     # pools pass 2^31 bytes: 64-bit offsets
    box: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    tile = k_nope.index(slot)._reinterpret(gl.uint8, [8, BLOCK_N, 128], box)     # eight 128-byte boxes a row
    rope = k_rope.index(slot)._reinterpret(gl.uint8, [BLOCK_N, 128], box)
    if BLOCKSCALE:
        # 656-byte tokens: 512 codes, 4 float32 scales, 64 bf16 rope values; the codes into boxes 4-7, where
        # `_dequantize` reads them.
        for g in gl.static_range(D_V // CODE_BOX):
            _gather_rows(tile.index(4 + g), rows, valid, kv_bytes, g * CODE_BOX, CODE_BOX)
        _gather_rows(k_scales.index(slot), rows, valid, kv_bytes, D_V, D_V // 32)
        _gather_rows(rope, rows, valid, kv_bytes, D_V + D_V // 32, 128)
    else:
        for c in gl.static_range(4):                          # 512 values of 2 bytes: eight 128-byte boxes
            _gather_rows(tile.index(c), rows, valid, kv_bytes, c * 128, 128)
        # The first four boxes complete k_front: the consumers' products start on them while the rest lands.
        async_copy.mbarrier_arrive(k_front.index(slot), increment_count=False)
        for c in gl.static_range(4, 8):
            _gather_rows(tile.index(c), rows, valid, kv_bytes, c * 128, 128)
        _gather_rows(rope, rows, valid, kv_bytes, 2 * D_V, 128)


@gluon.jit
def _gather_producer(q_descs, q_nope, q_rope, k_nope, k_rope, k_scales, valid_x, q_ready, k_ready, k_free, k_front,
                     idx_ptr, kv_bytes, pair, lo, hi, n_blocks, TOPK: gl.constexpr, NUM_TOKENS: gl.constexpr,
                     TOKEN_BYTES: gl.constexpr, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """The default partition (4 warps): the query tile by TMA, then each block gathered (`_gather_block`). Each
    block's slot is released by its copies themselves (every thread's cp.async arrival on k_ready fires once that
    thread's copies have landed; one more arrival covers the flags), so the partition goes on to the next block
    without waiting, as a TMA producer does. An FP8 block arrives raw: the consumer group that scores it
    dequantizes it."""
    _load_query_tile(q_descs, q_nope, q_rope, q_ready, D_V)
    gather = (kv_bytes, k_nope, k_rope, k_scales, valid_x, k_free, k_front)
    for j in range(n_blocks):
        slot = j % 2
        valid, idx = _block_tokens(j, idx_ptr, pair, lo, hi, TOPK, NUM_TOKENS)   # ahead of the slot's wait
        _gather_block(j, valid, idx, gather, TOKEN_BYTES, D_V, BLOCKSCALE)
        async_copy.mbarrier_arrive(k_ready.index(slot), increment_count=False)
        gl.thread_barrier()               # every thread's flags stored before the one arrival for them
        mbarrier.arrive(k_ready.index(slot), count=1)


@gluon.jit
def mla_sparse_gluon_kernel(
    q_ptr, kv_ptr, idx_ptr, topk_len_ptr, layer_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr, max_ptr,
    H: gl.constexpr, S_Q: gl.constexpr, TOPK: gl.constexpr, NUM_TOKENS: gl.constexpr, HAS_TOPK_LENGTH: gl.constexpr,
    NUM_LAYERS: gl.constexpr, LAYER_STRIDE: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
    NUM_SPLITS: gl.constexpr, SPLIT_LEN: gl.constexpr, KV_FORMAT: gl.constexpr, WRITE_MAX: gl.constexpr,
):
    """Grid (ROW_TILES = cdiv(H, 64), P = B * S_Q pairs, NUM_SPLITS), launched with num_warps=4 (the producer; the
    two consumer warpgroups are added: 12 warps). As kernels/sparse.py's `mla_sparse_kernel` (count_ptr unused;
    WRITE_MAX, one split: max_ptr [P, H] float32, each row's largest scaled score): q_ptr [P, H, 576] bf16 / fp16; idx_ptr [P, TOPK] int32; topk_len_ptr
    [P // S_Q] int32 with HAS_TOPK_LENGTH; kv_ptr the pool [NUM_TOKENS, 576] in q's dtype, or with KV_FORMAT 1
    ("fp8_blockscale", bf16 q) uint8 [NUM_TOKENS, 656]; NUM_LAYERS > 0: a stack read at layer_ptr. Each split
    covers SPLIT_LEN slots; o_ptr [P, H, D_V], lse_ptr [P, H]; with NUM_SPLITS > 1 o_part_ptr [P, NUM_SPLITS, H,
    D_V], lse_part_ptr [P, NUM_SPLITS, H] and splits_ptr [P] for `mla_decode_combine_kernel`."""
    gl.static_assert(KV_FORMAT == 0 or KV_FORMAT == KV_BLOCKSCALE, "caches in q's dtype or fp8_blockscale")
    gl.static_assert(D_V == 2 * HALF_V and D_R == 64, "DeepSeek's 512 + 64 latent")
    gl.static_assert(SPLIT_LEN % BLOCK_N == 0, "a split covers whole blocks of 64 slots")
    gl.static_assert(not WRITE_MAX or NUM_SPLITS == 1, "max_logits is written by a list's only split")
    BLOCKSCALE: gl.constexpr = KV_FORMAT == KV_BLOCKSCALE
    D: gl.constexpr = D_V + D_R
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    TOKEN_BYTES: gl.constexpr = D_V + D_V // 32 + 2 * D_R if BLOCKSCALE else 2 * D
    gl.static_assert(not BLOCKSCALE or dtype == gl.bfloat16, "fp8_blockscale: bf16 queries (the rope values are bf16)")
    tile = gl.program_id(0)
    pair = gl.program_id(1)
    split = gl.program_id(2)
    kv_ptr, v_scale = _layer_keys(kv_ptr, q_ptr, layer_ptr, NUM_LAYERS, LAYER_STRIDE, False)
    length = TOPK
    if HAS_TOPK_LENGTH:
        length = gl.minimum(gl.maximum(gl.load(topk_len_ptr + pair // S_Q), 0), TOPK)
    lo = split * SPLIT_LEN
    hi = gl.minimum(lo + SPLIT_LEN, length)
    n_blocks = gl.maximum(hi - lo + BLOCK_N - 1, 0) // BLOCK_N
    if NUM_SPLITS > 1:
        gl.store(splits_ptr + pair, NUM_SPLITS, mask=(tile == 0) & (split == 0))

    q_base = q_ptr + (pair.to(gl.int64) * H + tile * BLOCK_M) * D
    q_rows = gl.minimum(H - tile * BLOCK_M, BLOCK_M)
    q_descs = _descriptor_pair(q_base, q_rows, D_V, D_R, BLOCK_M)          # rows past q_rows read as 0
    # k_ready: each producer thread's copies arrive, and one arrival for the flags.
    PRODUCER_THREADS: gl.constexpr = gl.num_warps() * 32          # the default partition: the launch's warps
    q_nope, q_rope, k_nope, k_rope, m_x, l_x, q_ready, k_ready, k_free, p_ready, done = _seesaw_buffers(
        dtype, dtype, D_V, D_R, PRODUCER_THREADS + 1)
    k_front = k_ready                # FP8: unused (the consumers wait for the whole block, then convert it)
    if not BLOCKSCALE:
        k_front = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())    # boxes 0-3 landed
        for i in gl.static_range(2):
            mbarrier.init(k_front.index(i), count=PRODUCER_THREADS)     # every producer thread's copies of them
    bars = (q_ready, k_ready, k_free, p_ready, done, k_front)
    rows_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    valid_x = gl.allocate_shared_memory(gl.int8, [2, BLOCK_N], rows_layout)      # each slot's flags
    plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
    k_scales = gl.allocate_shared_memory(gl.uint8, [2, BLOCK_N, D_V // 32], plain)      # blockscale only

    o_desc = _output_descriptor(o_ptr + (pair.to(gl.int64) * H + tile * BLOCK_M) * D_V, q_rows, D_V)
    o_part_desc = o_desc
    if NUM_SPLITS > 1:
        o_part_desc = _output_descriptor(o_part_ptr + ((pair.to(gl.int64) * NUM_SPLITS + split) * H + tile * BLOCK_M)
                                         * D_V, q_rows, D_V)
    smem = (q_nope, q_rope, k_nope, k_rope, m_x, l_x, valid_x, m_x, k_scales)     # m_x: unused (a query factor)
    # The consumers' prefix mask is the split's end (slots past it are invalid anyway): hi as the "length".
    work = (scale * LOG2E, hi, lo, n_blocks, hi, tile, pair, split, NUM_SPLITS, v_scale)
    outputs = (o_desc, o_part_desc, lse_ptr, lse_part_ptr)
    kv_bytes = kv_ptr.to(gl.pointer_type(gl.uint8), bitcast=True)
    gl.warp_specialize([
        (_gather_producer, (q_descs, q_nope, q_rope, k_nope, k_rope, k_scales, valid_x, q_ready, k_ready, k_free,
                            k_front, idx_ptr, kv_bytes, pair, lo, hi, n_blocks, TOPK, NUM_TOKENS, TOKEN_BYTES, D_V,
                            BLOCKSCALE)),
        (_left_half, (smem, bars, work, outputs, H, 1, False, NUM_SPLITS, False, True, WRITE_MAX, max_ptr, False,
                      not BLOCKSCALE, KV_BLOCKSCALE if BLOCKSCALE else 0)),
        (_right_half, (smem, bars, work, outputs, H, 1, False, NUM_SPLITS, False, True, False, not BLOCKSCALE,
                       KV_BLOCKSCALE if BLOCKSCALE else 0)),
    ], [4, 4], [CONSUMER_REGS_CONVERTING if BLOCKSCALE else FP8_CONSUMER_REGS] * 2)
