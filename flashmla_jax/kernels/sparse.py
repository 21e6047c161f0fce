"""Sparse (top-k) absorbed MLA attention: DeepSeek Sparse Attention's decode and prefill.

Each query token (a "pair": one (sequence, query position) of a decode step, or one token of a prefill) attends to
its own list of TOPK token indices into a flat pool of latents (a paged pool is flat: index = page * page_size +
offset). Its H heads share that list, so one program takes BLOCK_M heads of one pair and walks the list in blocks
of BLOCK_N slots: it loads the slots' indices, gathers those tokens' latents (each token's row is contiguous, so a
gathered tile loads like a paged one), and runs the online softmax of kernels/decode.py over them (V is the first
D_V columns of the latent, as there). Slots past the pair's top-k length and indices outside [0, NUM_TOKENS) are
never loaded: they count as -1, whatever the pool holds there.

Split-K over the list (NUM_SPLITS > 1) serves grids too small to fill the GPU; the partials are merged as the
dense decode merges its splits (`_write_split`, and `mla_decode_combine_kernel` for many splits).
"""
import triton
import triton.language as tl

from flashmla_jax.kernels._common import LN2, LOG2E
from flashmla_jax.kernels.decode import (KV_BLOCKSCALE, _load_queries, _write_split, latent_scores,
                                         softmax_update)
from flashmla_jax.kernels.fp8 import load_blockscale_tile


@triton.jit
def _gather_tile(kv_ptr, idx_ptr, pair, start, hi, TOPK: tl.constexpr, NUM_TOKENS: tl.constexpr,
                 D_V: tl.constexpr, D_R: tl.constexpr, BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr,
                 KV_FORMAT: tl.constexpr, FP8_NATIVE: tl.constexpr):
    """Slots [start, start + BLOCK_N) of pair's index list: (k_v [BLOCK_N, D_V], k_r [BLOCK_N, D_R], valid
    [BLOCK_N]). A slot is valid below hi with an index in [0, NUM_TOKENS); invalid slots load nothing and give
    zeros."""
    slots = start + tl.arange(0, BLOCK_N)
    in_list = slots < hi
    idx = tl.load(idx_ptr + pair.to(tl.int64) * TOPK + slots, mask=in_list, other=-1)
    valid = in_list & (idx >= 0) & (idx < NUM_TOKENS)
    rows = tl.where(valid, idx, 0).to(tl.int64)          # pools pass 2^31 bytes: 64-bit offsets
    if KV_FORMAT == KV_BLOCKSCALE:
        k_v, k_r = load_blockscale_tile(kv_ptr, rows, valid, D_V, D_R, OUT_DTYPE, FP8_NATIVE, True)
    else:
        base = kv_ptr + rows[:, None] * (D_V + D_R)
        keep = valid[:, None]
        k_v = tl.load(base + tl.arange(0, D_V)[None, :], mask=keep, other=0.0)
        k_r = tl.load(base + D_V + tl.arange(0, D_R)[None, :], mask=keep, other=0.0)
    return k_v, k_r, valid


@triton.jit
def mla_sparse_kernel(
    q_ptr, kv_ptr, idx_ptr, topk_len_ptr, layer_ptr, scale,
    o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr, max_ptr,
    H: tl.constexpr, S_Q: tl.constexpr, TOPK: tl.constexpr, NUM_TOKENS: tl.constexpr, HAS_TOPK_LENGTH: tl.constexpr,
    NUM_LAYERS: tl.constexpr, LAYER_STRIDE: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLIT_LEN: tl.constexpr, SPLITS_POW2: tl.constexpr, ROW_TILES: tl.constexpr,
    LAST_MERGES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UNCHAIN_SCORES: tl.constexpr,
    KV_FORMAT: tl.constexpr, FP8_NATIVE: tl.constexpr, WRITE_MAX: tl.constexpr,
):
    """Grid (ROW_TILES = cdiv(H, BLOCK_M), P, NUM_SPLITS), P = B * S_Q pairs (pair = b * S_Q + s). The head
    tiles of a pair run side by side and share its gathered tokens through L2.

    q_ptr: [P, H, D_V + D_R]; idx_ptr: [P, TOPK] int32 token indices, invalid outside [0, NUM_TOKENS);
    topk_len_ptr: with HAS_TOPK_LENGTH [P // S_Q] int32 (sequence b's first topk_length slots count, clamped to
      [0, TOPK]), else never read;
    kv_ptr: the pool [NUM_TOKENS, W]: W = D_V + D_R values of q's dtype, or KV_BLOCKSCALE uint8 656-byte tokens
      (kernels/fp8.py). NUM_LAYERS > 0: a stack [NUM_LAYERS, NUM_TOKENS, W] of LAYER_STRIDE elements a layer,
      read at layer_ptr (0-d int32, clamped to [0, NUM_LAYERS)) in place.
    Each split covers SPLIT_LEN slots (a multiple of BLOCK_N).
    o_ptr [P, H, D_V] in q's dtype, lse_ptr [P, H] float32 (natural log; -inf and output 0 for a row with no
      valid index); o_part_ptr, lse_part_ptr, splits_ptr, count_ptr: the split partials and their merge, as in
      `mla_decode_split_kernel` (ops/decode.py's SplitOutputs, in that order); WRITE_MAX (NUM_SPLITS 1 only):
      max_ptr [P, H] float32, the largest scaled score q·k * scale (-inf for no valid index).
    """
    tl.static_assert(BLOCK_M >= 16 and (BLOCK_M & (BLOCK_M - 1)) == 0, "BLOCK_M must be a power of two >= 16")
    tl.static_assert(BLOCK_N >= 16 and (BLOCK_N & (BLOCK_N - 1)) == 0, "BLOCK_N must be a power of two >= 16")
    tl.static_assert(D_V >= 16 and (D_V & (D_V - 1)) == 0 and D_R >= 16 and (D_R & (D_R - 1)) == 0,
                     "D_V and D_R must be powers of two >= 16")
    tl.static_assert(SPLIT_LEN % BLOCK_N == 0, "a split covers whole blocks of BLOCK_N slots")
    tl.static_assert(SPLITS_POW2 >= NUM_SPLITS and (SPLITS_POW2 & (SPLITS_POW2 - 1)) == 0,
                     "SPLITS_POW2 must be a power of two >= NUM_SPLITS")
    tl.static_assert(not WRITE_MAX or NUM_SPLITS == 1, "max_logits is written by a list's only split")
    if NUM_LAYERS > 0:
        layer = tl.minimum(tl.maximum(tl.load(layer_ptr), 0), NUM_LAYERS - 1)
        kv_ptr += layer.to(tl.int64) * LAYER_STRIDE
    tile = tl.program_id(0)
    pair = tl.program_id(1)
    split = tl.program_id(2)

    length = TOPK
    if HAS_TOPK_LENGTH:
        length = tl.minimum(tl.maximum(tl.load(topk_len_ptr + pair // S_Q), 0), TOPK)
    lo = split * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, length)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < H
    offs_v = tl.arange(0, D_V)
    offs_r = tl.arange(0, D_R)
    q_v, q_r = _load_queries(q_ptr, pair, offs_m, row_ok, lo < hi, offs_v, offs_r, H, D_V, D_R)
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_V], dtype=tl.float32)
    for start in tl.range(lo, hi, BLOCK_N):
        k_v, k_r, valid = _gather_tile(kv_ptr, idx_ptr, pair, start, hi, TOPK, NUM_TOKENS, D_V, D_R, BLOCK_N,
                                       q_v.dtype, KV_FORMAT, FP8_NATIVE)
        s = latent_scores(q_v, q_r, k_v, k_r, qk_scale, lo < hi, UNCHAIN_SCORES)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_update(s, k_v, m_i, l_i, acc, False, True)
    splits_here = tl.full([], NUM_SPLITS, tl.int32)
    # ROW_RULES off (its two row masks are not read): the sparse ops give a row whose scores are all -inf 0, -inf.
    _write_split(o_ptr, lse_ptr, o_part_ptr, lse_part_ptr, splits_ptr, count_ptr, acc, m_i, l_i, pair, tile, split,
                 splits_here, lo < hi, offs_m, offs_v, row_ok, H, D_V, NUM_SPLITS, SPLITS_POW2, ROW_TILES, LAST_MERGES,
                 False, row_ok, row_ok)
    if WRITE_MAX:
        tl.store(max_ptr + pair.to(tl.int64) * H + offs_m, m_i * LN2, mask=row_ok)
