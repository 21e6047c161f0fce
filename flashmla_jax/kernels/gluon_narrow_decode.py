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
tokens or more) or stacked. An FP8 cache never has converted keys in shared memory: the producer
(`_stage_producer`) streams raw blocks into four stages (stage s for consumer group s % 2) and each consumer
group (`_code_consumer`) converts its block's codes straight into both products' wgmma A operands in registers,
in fp16 (the section "FP8 caches" below); its O^T is merged in a stage's 32 KB, so ops runs FP8 through this
kernel only up to 16 rows (`ops.decode.uses_narrow_kernel`).
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                              warpgroup_mma_init, warpgroup_mma_wait)

from flashmla_jax.kernels._common import LOG2E
from flashmla_jax.kernels.gluon_decode import (BLOCK_N, CODE_BOX, KV_BLOCKSCALE, KV_PERTENSOR, _block_row,
                                               _descriptor_pair, _fp8_block_load, _key_descriptors, _layer_keys,
                                               _load_query_tile, _producer, _query_factor, _row_results, _rope_codes,
                                               _safe, _sequence_splits, _split_keys)

# Registers per consumer thread (the producer's warps get the rest): O^T [512, rows] takes rows * 4 of them.
# Compiled without spills at these: 232 for 16 rows (at 240 the paged producer's 24 spill), 240 for 32.
CONSUMER_REGS_16 = gl.constexpr(232)
CONSUMER_REGS_32 = gl.constexpr(240)
# FP8 caches: raw key blocks in flight (stage s holds the blocks of consumer group s % 2), and the registers of
# the consumers, which convert the codes themselves (the producer only issues loads and converts the query).
CODE_STAGES = gl.constexpr(4)
CODE_CONSUMER_REGS = gl.constexpr(232)


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
              NUM_SPLITS: gl.constexpr):
    """Consumer warpgroup `group` for a cache in q's dtype: blocks group, group + 2, ... of this split, then
    (group 1) its state to shared memory, or (group 0) the merge of both and the output. p_t [ROWS, 64]: this
    group's P for the P V product (the wgmma's B operand comes from shared memory)."""
    qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale = work
    ROWS: gl.constexpr = q_nope.shape[0]
    D_V: gl.constexpr = k_nope.shape[2]
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
        mbarrier.wait(k_ready.index(group), i & 1)
        s = _block_scores_t(q_nope, q_rope, slot_nope, slot_rope)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
        m_i, l_i, acc = _softmax_step(s, lo + j * BLOCK_N, m_i, l_i, acc, 1.0, p_t, work, H, S_Q, CAUSAL)
        acc = warpgroup_mma(slot_nope.permute((1, 0)), p_t.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(k_free.index(group), count=1)
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    o_0 = k_nope.index(0)._reinterpret(gl.float32, [ROWS, D_V], plain)
    o_1 = k_nope.index(1)._reinterpret(gl.float32, [ROWS, D_V], plain)
    _hand_over_or_write(group, acc, m_i, l_i, o_0, o_1, x_m, x_l, handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS,
                        False)


@gluon.jit
def _softmax_step(s, start, m_i, l_i, acc, acc_factor, p_t, work, H: gl.constexpr, S_Q: gl.constexpr,
                  CAUSAL: gl.constexpr):
    """One block's online softmax over the keys (axis 0 of S^T [64, ROWS], keys from `start`): the scores scaled
    and masked past each row's limit, the running max and row sums updated, O^T (acc [512, ROWS]) rescaled (and
    times acc_factor, a change of its units), and P^T stored into p_t [ROWS, 64] for the P V product, fenced and
    complete in all four warps. Returns (m_new, l_i, acc)."""
    qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale = work
    ROWS: gl.constexpr = p_t.shape[0]
    keys_l: gl.constexpr = _keys_layout(ROWS)
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
    acc = acc * gl.expand_dims(alpha * acc_factor, 0)
    p_t.store(gl.permute(p.to(p_t.dtype), (1, 0)))
    fence_async_shared()
    gl.thread_barrier()        # every warp's part of P stored before the warpgroup's wgmma reads it
    return m_new, l_i, acc


@gluon.jit
def _hand_over_or_write(group: gl.constexpr, acc, m_i, l_i, o_0, o_1, x_m, x_l, handed, work, outputs,
                        H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr, NUM_SPLITS: gl.constexpr,
                        V_SCALED: gl.constexpr):
    """The end of consumer group `group`'s loop: acc [512, ROWS] (O^T, channels in order), running max m_i and
    row sums l_i [ROWS]. Each group's O, [ROWS, 512] float32, goes into its own idle buffer (o_0, o_1: views of
    shared memory the group no longer reads); group 1 then hands its state over, and group 0 merges the two and
    writes the split's result (`_write_rows`)."""
    qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale = work
    ROWS: gl.constexpr = o_0.shape[0]
    D_V: gl.constexpr = o_0.shape[1]
    rows_l: gl.constexpr = _rows_layout(ROWS)
    # A NaN in a row's accumulator makes its row sum NaN (gluon_decode's `_finish_rows` rule), so that the
    # merge below carries it whatever the weights.
    nan_in_row = gl.convert_layout(gl.max(gl.where(acc != acc, 1, 0), axis=0), rows_l)
    l_i = gl.where(nan_in_row > 0, float("nan"), l_i)
    if group == 1:
        o_1.store(gl.permute(acc, (1, 0)))
        x_m.store(m_i)
        x_l.store(l_i)
        gl.thread_barrier()        # all of group 1's stores before its one arrival
        mbarrier.arrive(handed, count=1)
    else:
        o_0.store(gl.permute(acc, (1, 0)))
        gl.thread_barrier()        # group 0's own O stored by all its warps before they read it back
        mbarrier.wait(handed, 0)
        m_1 = x_m.load(rows_l)
        m = gl.maximum(m_i, m_1)
        m_safe = _safe(m)
        w_0 = gl.exp2(m_i - m_safe)
        w_1 = gl.exp2(m_1 - m_safe)
        l_all = l_i * w_0 + x_l.load(rows_l) * w_1
        saw_keys = (n_blocks > 0) & (lo < _row_limits(seqlen, ROWS, H, S_Q, CAUSAL))
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


# ---- FP8 caches: the codes converted straight into the products' register operands ----
#
# A raw block (TMA: the codes [4, 64, 128] group-major, the rope and a blockscale token's scales) is never
# written back to shared memory: each consumer group loads its block's codes from the stage into registers in the
# layouts the wgmma A operands need and converts them there, one hardware e4m3 -> fp16 pair conversion per two
# codes (exact), and the products run in fp16 from registers. The query takes fp16 too, once per program: a
# bf16 query is scaled by a power of two that puts its largest magnitude in [2^14, 2^15) (exact for every value
# within 2^24 of it), and the scores are divided by it again. A blockscale code is multiplied by its scale times
# 2^-E (fp16, one multiply a pair), E the exponent of the block's largest scale (`_block_power`), so that its
# values stay in fp16's range whatever the cache's; the scores are multiplied by 2^E after the products and O^T
# is kept in units of the current block's 2^E. Both products are sums over channels, so the channels may come in
# any order as long as both operands agree: the query's columns are permuted once per program
# (`_query_operands`), and P V permutes the rows of O^T, undone when O is stored. A block moves ~140 KB through
# shared memory (its TMA store, two reads of its codes, the query and P) instead of ~320 KB with a converted tile.


@gluon.constexpr_function
def _score_code_layout():
    """[64 keys, 128 codes] of one code group, as `_score_operand` loads them: warp w on keys 16 w + [0, 16),
    lane bits 2-4 and one register bit on the key (the wgmma A fragment's rows: lane / 4, + 8), lane bits 0-1 on
    the group's 32-byte quarter, 32 registers on its bytes: two 16-byte loads a key and thread, and no bank
    conflict under the 128-byte swizzle (a load phase's 8 lanes read 4 quarters of 2 keys)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [0, 16], [8, 0]],
                                      lane_bases=[[0, 32], [0, 64], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 128])


@gluon.constexpr_function
def _rope_code_operand_layout():
    """[64 keys, 64 rope codes]: as `_score_code_layout` with 16-byte quarters (64-byte swizzle, no conflict)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [0, 4], [0, 8], [8, 0]],
                                      lane_bases=[[0, 16], [0, 32], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 64])


@gluon.constexpr_function
def _value_code_layout():
    """[4 groups, 16 keys, 128 codes]: a 16-key slice of a block's codes, as `_value_operand` loads them: warp
    w on group w, lane bits 0-1 on keys 2 and 4, lane bits 2-4 on the 16-byte chunk, registers on the chunk's
    16 bytes and on keys 1 and 8 (the A fragment's columns): one 16-byte load a key and thread, no bank
    conflict (a load phase's 8 lanes read 2 chunks of 4 keys)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 8, 0]],
                                      lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 16], [0, 0, 32], [0, 0, 64]],
                                      warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, 16, 128])


@gluon.constexpr_function
def _key_scales_layout():
    """[64 keys, 4 groups] float32 scales of a blockscale block, each thread its two keys' four (the keys it holds
    in `_score_code_layout`)."""
    return gl.DistributedLinearLayout(reg_bases=[[0, 1], [0, 2], [8, 0]],
                                      lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
                                      warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4])


@gluon.constexpr_function
def _slice_scales_layout():
    """[16 keys, 4 groups] float32 scales of a 16-key slice, each thread its four keys of its warp's group (the
    keys and group it holds in `_value_code_layout`)."""
    return gl.DistributedLinearLayout(reg_bases=[[1, 0], [8, 0]], lane_bases=[[2, 0], [4, 0], [0, 0], [0, 0], [0, 0]],
                                      warp_bases=[[0, 1], [0, 2]], block_bases=[], shape=[16, 4])


@gluon.jit
def _fp16_codes(codes, scale, SCALED: gl.constexpr):
    """uint8 e4m3 codes -> fp16 (exact), SCALED: times scale (fp16, broadcast against codes)."""
    values = codes.to(gl.float8e4nv, bitcast=True).to(gl.float16)
    if SCALED:
        values = values * scale
    return values


@gluon.jit
def _operand(values, ROWS: gl.constexpr):
    """fp16 values laid out as the wgmma A fragment of `_keys_layout(ROWS)`, as that operand (no data moves)."""
    return gl.convert_layout(values, gl.DotOperandLayout(0, _keys_layout(ROWS), 2), assert_trivial=True)


@gluon.jit
def _score_operand(group_codes, key_scales, c: gl.constexpr, down, ROWS: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """Code group c of a block (group_codes: its [64, 128] uint8 in shared memory) as the A operand of the
    scores over the group's 128 channels, in the column order `_query_operands` gives the query: column
    16 s + 8 e1 + 2 t + e0 holds byte 32 t + 4 s + 2 e1 + e0 (t < 4, s < 8, e1, e0 < 2), so that a thread's
    fragment is two 32-byte runs of codes. BLOCKSCALE: times each key's scale of group c (key_scales: the
    block's [64, 4] in `_key_scales_layout`) and `down` (the block's power of two), rounded to fp16."""
    layout: gl.constexpr = _score_code_layout()
    x = group_codes.load(layout)
    scale = 1.0
    if BLOCKSCALE:
        group = gl.arange(0, 4, layout=gl.SliceLayout(0, _key_scales_layout()))
        scale = gl.sum(gl.where(gl.expand_dims(group, 0) == c, key_scales, 0.0), axis=1) * down
        scale = gl.expand_dims(gl.convert_layout(scale.to(gl.float16), gl.SliceLayout(1, layout),
                                                 assert_trivial=True), 1)
    v = _fp16_codes(x, scale, BLOCKSCALE)
    return _operand(v.reshape([BLOCK_N, 4, 8, 2, 2]).permute((0, 2, 3, 1, 4)).reshape([BLOCK_N, CODE_BOX]), ROWS)


@gluon.jit
def _rope_operand(rope_codes, ROWS: gl.constexpr):
    """A block's rope codes (uint8 [64, 64], `_rope_codes`) as the A operand of the scores' rope part, in the
    column order `_query_operands` gives the query's rope: column 16 s + 8 e1 + 2 t + e0 holds byte
    16 t + 4 s + 2 e1 + e0 (t, s < 4)."""
    x = rope_codes.load(_rope_code_operand_layout())
    v = _fp16_codes(x, 1.0, False)
    return _operand(v.reshape([BLOCK_N, 4, 4, 2, 2]).permute((0, 2, 3, 1, 4)).reshape([BLOCK_N, 64]), ROWS)


@gluon.jit
def _value_operand(codes, scales, k: gl.constexpr, down, ROWS: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """Keys [16 k, 16 k + 16) of a block (codes [4, 64, 128] uint8) as the A operand of O^T += V^T P^T: V^T
    [512, 16] with its rows permuted so that a thread's fragment is one 16-byte chunk of a group a key: row
    64 m + 16 w + 8 h + g holds channel 128 w + 16 g + 2 m + h (m, g < 8; w < 4; h < 2). O^T comes out in that
    row order (`_channel_order` undoes it). BLOCKSCALE: times scale[key, group] (scales: the block's [64, 4]
    float32 in shared memory) and `down`, rounded to fp16."""
    layout: gl.constexpr = _value_code_layout()
    x = codes.slice(16 * k, 16, dim=1).load(layout)
    scale = 1.0
    if BLOCKSCALE:
        key_scales = scales.slice(16 * k, 16, dim=0).load(_slice_scales_layout())       # [16 keys, 4 groups]
        scale = (gl.permute(key_scales, (1, 0)) * down).to(gl.float16)
        scale = gl.expand_dims(gl.convert_layout(scale, gl.SliceLayout(2, layout), assert_trivial=True), 2)
    v = _fp16_codes(x, scale, BLOCKSCALE)
    return _operand(v.reshape([4, 16, 8, 8, 2]).permute((3, 0, 4, 2, 1)).reshape([4 * CODE_BOX, 16]), ROWS)


@gluon.jit
def _channel_order(acc):
    """O^T [512, ROWS] from `_value_operand`'s row order back to the channels' (row 128 w + 16 g + 2 m + h)."""
    ROWS: gl.constexpr = acc.shape[1]
    return acc.reshape([8, 4, 2, 8, ROWS]).permute((1, 3, 0, 2, 4)).reshape([4 * CODE_BOX, ROWS])


@gluon.jit
def _code_scores_t(q_nope, q_rope, codes, rope, scales, q_factor, BLOCKSCALE: gl.constexpr):
    """S^T = K Q^T [64, ROWS] float32 of one raw block (codes [4, 64, 128] uint8; the query in fp16 times
    q_factor, its columns permuted), each code group converted while the product of the one before runs.
    Pertensor: rope [64, 64] holds the rope codes (`_rope_codes`), in the same product. Blockscale: rope holds
    the bf16 rope values, multiplied with the bf16 query rope (q_rope) on their own accumulator, and the codes
    take the block's scales (scales [64, 4] float32) over a power of two of the block, restored after."""
    ROWS: gl.constexpr = q_nope.shape[0]
    zeros = gl.zeros([BLOCK_N, ROWS], gl.float32, layout=_keys_layout(ROWS))
    down = 1.0
    up = 1.0
    key_scales = 1.0
    if BLOCKSCALE:
        s_rope = warpgroup_mma(rope, q_rope.permute((1, 0)), warpgroup_mma_init(zeros), is_async=True)
        key_scales = scales.load(_key_scales_layout())
        down, up = _block_power(key_scales)
    s = warpgroup_mma_init(zeros)
    a = _score_operand(codes.index(0), key_scales, 0, down, ROWS, BLOCKSCALE)
    s = warpgroup_mma(a, q_nope.slice(0, CODE_BOX, dim=1).permute((1, 0)), s, is_async=True)
    for c in gl.static_range(1, 4):
        a_next = _score_operand(codes.index(c), key_scales, c, down, ROWS, BLOCKSCALE)
        s, a = warpgroup_mma_wait(num_outstanding=0, deps=(s, a))       # a's registers live until its product ends
        s = warpgroup_mma(a_next, q_nope.slice(c * CODE_BOX, CODE_BOX, dim=1).permute((1, 0)), s, is_async=True)
        a = a_next
    if BLOCKSCALE:
        s, a, s_rope = warpgroup_mma_wait(num_outstanding=0, deps=(s, a, s_rope))
        s = s_rope + s * (up / q_factor)
    else:
        a_next = _rope_operand(_rope_codes(rope), ROWS)
        s, a = warpgroup_mma_wait(num_outstanding=0, deps=(s, a))
        s = warpgroup_mma(a_next, q_rope.permute((1, 0)), s, is_async=True)
        s, a_next = warpgroup_mma_wait(num_outstanding=0, deps=(s, a_next))
        s = s / q_factor
    return s, down, up


@gluon.jit
def _block_power(key_scales):
    """(down, up): 2^-E and 2^E for a block's scales (key_scales [64, 4] float32), E the exponent of the largest,
    so that a code times its scale times down stays within fp16 (|code| <= 448, scale * down < 2); the exponent
    is clamped so that both stay normal float32."""
    peak = gl.max(gl.max(key_scales, axis=1), axis=0)
    e = gl.minimum(gl.maximum((peak.to(gl.int32, bitcast=True) >> 23) & 0xFF, 1), 253)
    return ((254 - e) << 23).to(gl.float32, bitcast=True), (e << 23).to(gl.float32, bitcast=True)


@gluon.jit
def _code_values_product(codes, scales, down, p_t, acc, BLOCKSCALE: gl.constexpr):
    """acc + V^T P^T [512, ROWS] (rows in `_value_operand`'s order) for one raw block (codes [4, 64, 128]
    uint8; blockscale: times the block's scales and `down`), P^T from p_t [ROWS, 64] fp16; each 16-key slice
    converted while the product of the one before runs."""
    ROWS: gl.constexpr = p_t.shape[0]
    a = _value_operand(codes, scales, 0, down, ROWS, BLOCKSCALE)
    acc = warpgroup_mma(a, p_t.slice(0, 16, dim=1).permute((1, 0)), acc, is_async=True)
    for k in gl.static_range(1, BLOCK_N // 16):
        a_next = _value_operand(codes, scales, k, down, ROWS, BLOCKSCALE)
        acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
        acc = warpgroup_mma(a_next, p_t.slice(16 * k, 16, dim=1).permute((1, 0)), acc, is_async=True)
        a = a_next
    acc, a = warpgroup_mma_wait(num_outstanding=0, deps=(acc, a))
    return acc


@gluon.jit
def _stage_codes(codes, stage, RANK: gl.constexpr):
    """Stage `stage`'s codes (codes: [CODE_STAGES, 4 * 64, 128] uint8) as [4, 64, 128] (group, token, byte), in
    the 128-byte swizzled layout of rank RANK: 2 to index a group, 3 to slice keys across the groups or as the
    TMA's box (the same bytes either way)."""
    boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=RANK)
    return codes.index(stage)._reinterpret(gl.uint8, [4, BLOCK_N, CODE_BOX], boxes)


@gluon.jit
def _stage_merge_buffer(codes, stage, ROWS: gl.constexpr, D_V: gl.constexpr):
    """Stage `stage`'s 32 KB of codes as a consumer group's O, [ROWS, D_V] float32, for the merge."""
    plain: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
    return codes.index(stage)._reinterpret(gl.float32, [ROWS, D_V], plain)


@gluon.jit
def _code_consumer(group: gl.constexpr, q_nope, q_rope, q_factor, codes, k_rope, k_scales, p_t, x_m, x_l, q_ready,
                   k_ready, k_free, handed, work, outputs, H: gl.constexpr, S_Q: gl.constexpr, CAUSAL: gl.constexpr,
                   NUM_SPLITS: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """Consumer warpgroup `group` for an FP8 cache: blocks j = group, group + 2, ... of this split, each from raw
    stage j % CODE_STAGES (released once both products have read it), then the hand-over or the merge and the
    output as `_consumer`'s. q_nope: the fp16 query `_query_operands` wrote (q_rope too for pertensor; blockscale:
    bf16 as loaded), q_factor [ROWS] float32 the power of two it was scaled by. Blockscale: O^T is kept in
    units of the current block's power of two (`_block_power`), changed with each block's rescale."""
    qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale = work
    ROWS: gl.constexpr = q_nope.shape[0]
    D_V: gl.constexpr = q_nope.shape[1]
    plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=_rows_layout(ROWS))
    l_i = gl.zeros([ROWS], gl.float32, layout=_rows_layout(ROWS))
    acc = gl.zeros([D_V, ROWS], gl.float32, layout=_keys_layout(ROWS))
    units = 1.0                    # blockscale: O^T = acc * units
    mbarrier.wait(q_ready, 0)
    factor = gl.max(q_factor.load(_rows_layout(ROWS)), axis=0)
    for i in range((n_blocks - group + 1) // 2):
        j = 2 * i + group
        stage = j % CODE_STAGES
        mbarrier.wait(k_ready.index(stage), (j // CODE_STAGES) & 1)
        scales = k_scales.index(stage)._reinterpret(gl.float32, [BLOCK_N, 4], plain)
        s, down, up = _code_scores_t(q_nope, q_rope, _stage_codes(codes, stage, 2), k_rope.index(stage), scales,
                                     factor, BLOCKSCALE)
        m_i, l_i, acc = _softmax_step(s, lo + j * BLOCK_N, m_i, l_i, acc, units * down, p_t, work, H, S_Q, CAUSAL)
        units = up
        acc = _code_values_product(_stage_codes(codes, stage, 3), scales, down, p_t, acc, BLOCKSCALE)
        mbarrier.arrive(k_free.index(stage), count=1)
    if BLOCKSCALE:
        acc = acc * units
    # Stage g holds only group g's blocks, all consumed by now.
    _hand_over_or_write(group, _channel_order(acc), m_i, l_i, _stage_merge_buffer(codes, 0, ROWS, D_V),
                        _stage_merge_buffer(codes, 1, ROWS, D_V), x_m, x_l, handed, work, outputs, H, S_Q, CAUSAL,
                        NUM_SPLITS, not BLOCKSCALE)


@gluon.jit
def _query_operands(q_nope, q_rope, q_factor, ROPE: gl.constexpr):
    """The query tile (q_nope [ROWS, 512] in q's dtype) rewritten in place as fp16 in the consumers' column order:
    each 128-column group's column 16 s + 8 e1 + 2 t + e0 takes column 32 t + 4 s + 2 e1 + e0 (`_score_operand`);
    with ROPE (pertensor) the rope too (q_rope [ROWS, 64]: column 16 s + 8 e1 + 2 t + e0 takes 16 t + 4 s + 2 e1
    + e0, `_rope_operand`). A bf16 query is scaled by 2^k, k such that the largest magnitude rewritten lands in
    [2^14, 2^15) (q_factor [ROWS] gets 2^k; fp16 queries: 1). Once per program, in the producer's warps."""
    ROWS: gl.constexpr = q_nope.shape[0]
    D_V: gl.constexpr = q_nope.shape[1]
    D_R: gl.constexpr = q_rope.shape[1]
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    swizzled: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    factor = 1.0
    if q_nope.dtype == gl.bfloat16:
        amax = gl.max(gl.max(gl.abs(q_nope.slice(0, CODE_BOX, dim=1).load(layout).to(gl.float32)), axis=1), axis=0)
        for c in gl.static_range(1, D_V // CODE_BOX):
            x = q_nope.slice(c * CODE_BOX, CODE_BOX, dim=1).load(layout).to(gl.float32)
            amax = gl.maximum(amax, gl.max(gl.max(gl.abs(x), axis=1), axis=0))
        if ROPE:
            amax = gl.maximum(amax, gl.max(gl.max(gl.abs(q_rope.load(layout).to(gl.float32)), axis=1), axis=0))
        factor = _query_factor(amax)
    # One 128-column group at a time, in place: each is read by every warp before any writes it.
    for c in gl.static_range(D_V // CODE_BOX):
        x = (q_nope.slice(c * CODE_BOX, CODE_BOX, dim=1).load(layout).to(gl.float32) * factor).to(gl.float16)
        x = x.reshape([ROWS, 4, 8, 2, 2]).permute((0, 2, 3, 1, 4)).reshape([ROWS, CODE_BOX])
        gl.thread_barrier()
        q_nope._reinterpret(gl.float16, [ROWS, D_V], swizzled).slice(c * CODE_BOX, CODE_BOX, dim=1).store(x)
    if ROPE:
        r = (q_rope.load(layout).to(gl.float32) * factor).to(gl.float16)
        r = r.reshape([ROWS, 4, 4, 2, 2]).permute((0, 2, 3, 1, 4)).reshape([ROWS, D_R])
        gl.thread_barrier()
        q_rope._reinterpret(gl.float16, [ROWS, D_R], swizzled).store(r)
    q_factor.store(gl.full([ROWS], factor, gl.float32, layout=gl.SliceLayout(1, layout)))


@gluon.jit
def _stage_load(j, start, row, loads, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """TMA loads of key block j (its first key `start`, at descriptor row `row`: `_block_row`) into raw stage
    j % CODE_STAGES, completing k_ready there. loads: (k_descs, tail_descs, codes, k_rope, k_scales, k_ready,
    tail_start, PAGED)."""
    k_descs, tail_descs, codes, k_rope, k_scales, k_ready, tail_start, PAGED = loads
    stage = j % CODE_STAGES
    _fp8_block_load(k_ready.index(stage), start, row, k_descs, tail_descs, tail_start, _stage_codes(codes, stage, 3),
                    k_rope.index(stage), k_scales.index(stage), PAGED, D_V, BLOCKSCALE)


@gluon.jit
def _stage_producer(q_descs, loads, q_nope, q_rope, q_factor, q_loaded, q_ready, k_free, table_ptr, b, lo,
                    n_blocks, PAGED: gl.constexpr, PAGE_SIZE: gl.constexpr, MAX_BLOCKS: gl.constexpr,
                    NUM_PAGES: gl.constexpr, D_V: gl.constexpr, BLOCKSCALE: gl.constexpr):
    """The default partition for an FP8 cache on the register-operand path (4 warps): the query tile, the first
    CODE_STAGES blocks' raw bytes, the query as the consumers' fp16 operands (`_query_operands`, then q_ready),
    then each later block into its stage once the consumer group that read the stage's last block has released
    it."""
    _load_query_tile(q_descs, q_nope, q_rope, q_loaded, D_V)
    for j in gl.static_range(CODE_STAGES):
        if j < n_blocks:
            start, row = _block_row(j, lo, table_ptr, b, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
            _stage_load(j, start, row, loads, D_V, BLOCKSCALE)
    mbarrier.wait(q_loaded, 0)
    _query_operands(q_nope, q_rope, q_factor, not BLOCKSCALE)
    fence_async_shared()           # the rewritten tile (generic stores) before the consumers' wgmma reads it
    gl.thread_barrier()
    mbarrier.arrive(q_ready, count=1)
    for j in range(CODE_STAGES, n_blocks):
        # The page is looked up before waiting for the stage: its load latency hides behind the wait.
        start, row = _block_row(j, lo, table_ptr, b, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES)
        mbarrier.wait(k_free.index(j % CODE_STAGES), ((j // CODE_STAGES) & 1) ^ 1)
        _stage_load(j, start, row, loads, D_V, BLOCKSCALE)


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
    CONSUMER_REGS: gl.constexpr = CODE_CONSUMER_REGS if FP8 else (CONSUMER_REGS_16 if R <= 16 else CONSUMER_REGS_32)
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
    vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
    qk_scale = scale * LOG2E * v_scale if V_SCALED else scale * LOG2E
    work = (qk_scale, seqlen, lo, n_blocks, first_limit, b, split, splits_here, v_scale)
    outputs = (o_ptr, lse_ptr, o_part_ptr, lse_part_ptr)
    q_nope = gl.allocate_shared_memory(dtype, [ROWS, D_V], swizzled)
    q_rope = gl.allocate_shared_memory(dtype, [ROWS, D_R], swizzled)
    if FP8:
        gl.static_assert(R <= 16, "FP8: at most 16 query rows (a group's O is merged in a stage's codes)")
        # Raw stages: the codes [4, 64, 128] as the TMA lands them (`_stage_codes`), the rope (blockscale: bf16
        # values; pertensor: its codes in the first 4 KB, `_rope_codes`) and a blockscale token's 4 scales.
        boxes: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        plain: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=8, rank=2)
        codes = gl.allocate_shared_memory(gl.uint8, [CODE_STAGES, D_V // CODE_BOX * BLOCK_N, CODE_BOX], boxes)
        k_rope = gl.allocate_shared_memory(dtype, [CODE_STAGES, BLOCK_N, D_R], swizzled)
        k_scales = gl.allocate_shared_memory(gl.uint8, [CODE_STAGES, BLOCK_N, D_V // 32], plain)
        p_t = gl.allocate_shared_memory(gl.float16, [2, ROWS, BLOCK_N], swizzled)  # each group's P
        x_m = gl.allocate_shared_memory(gl.float32, [ROWS], vec)                 # group 1's running max
        x_l = gl.allocate_shared_memory(gl.float32, [ROWS], vec)                 # and its row sums
        q_factor = gl.allocate_shared_memory(gl.float32, [ROWS], vec)            # the query's power of two
        q_loaded = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        handed = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [CODE_STAGES, 1], mbarrier.MBarrierLayout())
        k_free = gl.allocate_shared_memory(gl.int64, [CODE_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_loaded, count=1)
        mbarrier.init(q_ready, count=1)
        mbarrier.init(handed, count=1)
        for i in gl.static_range(CODE_STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(k_free.index(i), count=1)      # one group uses each stage
        loads = (k_descs, tail_descs, codes, k_rope, k_scales, k_ready, tail_start, PAGED)
        q16_nope = q_nope._reinterpret(gl.float16, [ROWS, D_V], swizzled)       # as `_query_operands` leaves it
        q16_rope = q_rope if BLOCKSCALE else q_rope._reinterpret(gl.float16, [ROWS, D_R], swizzled)
        gl.warp_specialize([
            (_stage_producer, (q_descs, loads, q_nope, q_rope, q_factor, q_loaded, q_ready, k_free, table_ptr, b, lo,
                               n_blocks, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V, BLOCKSCALE)),
            (_code_consumer, (0, q16_nope, q16_rope, q_factor, codes, k_rope, k_scales, p_t.index(0), x_m, x_l,
                              q_ready, k_ready, k_free, handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS,
                              BLOCKSCALE)),
            (_code_consumer, (1, q16_nope, q16_rope, q_factor, codes, k_rope, k_scales, p_t.index(1), x_m, x_l,
                              q_ready, k_ready, k_free, handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS,
                              BLOCKSCALE)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
    else:
        k_nope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D_V], swizzled)
        k_rope = gl.allocate_shared_memory(dtype, [2, BLOCK_N, D_R], swizzled)
        p_t = gl.allocate_shared_memory(dtype, [2, ROWS, BLOCK_N], swizzled)     # each group's P
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
            mbarrier.init(k_free.index(i), count=1)      # one group uses each slot
        gl.warp_specialize([
            (_producer, (q_descs, k_descs, tail_descs, q_nope, q_rope, k_nope, k_rope, q_ready, k_ready, k_free,
                         table_ptr, b, lo, n_blocks, tail_start, PAGED, PAGE_SIZE, MAX_BLOCKS, NUM_PAGES, D_V)),
            (_consumer, (0, q_nope, q_rope, k_nope, k_rope, p_t.index(0), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS)),
            (_consumer, (1, q_nope, q_rope, k_nope, k_rope, p_t.index(1), x_m, x_l, q_ready, k_ready, k_free,
                         handed, work, outputs, H, S_Q, CAUSAL, NUM_SPLITS)),
        ], [4, 4], [CONSUMER_REGS, CONSUMER_REGS])
