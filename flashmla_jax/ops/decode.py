"""`mla_decode`: absorbed MLA decode over a contiguous or paged latent cache."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import reference
from flashmla_jax._backend import num_sms, resolve_implementation
from flashmla_jax.ops._launch import launch

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MAX_SPLITS = 256


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _check_inputs(q, kv_cache, cache_seqlens, block_table, head_dim_v, num_splits):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S_q, H, D], got shape {q.shape}")
    b, s_q, h, d = q.shape
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if kv_cache.dtype != q.dtype:
        raise TypeError(f"kv_cache dtype {kv_cache.dtype} must equal q's dtype {q.dtype}")
    if kv_cache.ndim != 3 or kv_cache.shape[-1] != d:
        raise ValueError(f"kv_cache must be [B, N, {d}] (or [num_blocks, page_size, {d}] with block_table), "
                         f"got shape {kv_cache.shape}")
    if cache_seqlens.shape != (b,) or cache_seqlens.dtype != jnp.int32:
        raise TypeError(f"cache_seqlens must be int32 [{b}], got {cache_seqlens.dtype} {cache_seqlens.shape}")
    if not 0 < head_dim_v < d:
        raise ValueError(f"head_dim_v must be in (0, {d}): V is the first head_dim_v columns of the latent, "
                         f"got {head_dim_v}")
    if num_splits is not None and (not isinstance(num_splits, int) or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in [1, {MAX_SPLITS}], got {num_splits!r}")
    if block_table is None:
        if kv_cache.shape[0] != b:
            raise ValueError(f"contiguous kv_cache must be [B={b}, N, {d}], got shape {kv_cache.shape}")
    else:
        if block_table.ndim != 2 or block_table.shape[0] != b or block_table.dtype != jnp.int32:
            raise TypeError(f"block_table must be int32 [B={b}, max_blocks], got {block_table.dtype} "
                            f"{block_table.shape}")
        page_size = kv_cache.shape[1]
        if not _is_pow2(page_size) or not 16 <= page_size <= 256:
            raise ValueError(f"page_size (kv_cache.shape[1]) must be a power of two in [16, 256], got {page_size}")


def _check_kernel_dims(d: int, head_dim_v: int):
    if not (_is_pow2(head_dim_v) and _is_pow2(d - head_dim_v) and head_dim_v >= 16 and d - head_dim_v >= 16):
        raise ValueError(f"the Triton kernels need head_dim_v ({head_dim_v}) and D - head_dim_v ({d - head_dim_v}) "
                         "to be powers of two >= 16 (DeepSeek: 512 and 64)")


def _tile_config(rows: int, dtype, page_size: int | None) -> dict:
    """Block sizes, warps and pipelining depth for one (rows = S_q * H, dtype) class."""
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_n = 32 if dtype == jnp.float32 else 64
    if page_size is not None:
        block_n = min(block_n, page_size)
    num_warps = 4 if block_m <= 32 else 8
    num_stages = 2
    if block_m == 16 and block_n == 64 and dtype != jnp.float32:
        # H100 sweep (benchmarks/NOTES.md): 3 stages of 72 KB tiles; a paged cache wants 8 warps to hide
        # the block-table lookup ahead of each tile. 4 stages overflow shared memory.
        num_stages = 3
        num_warps = 8 if page_size is not None else 4
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)


def choose_num_splits(batch: int, row_tiles: int, capacity: int, block_n: int, sms: int) -> int:
    """Splits per sequence that minimise waves x blocks per program, from static shapes only.

    Each program costs its key blocks plus about one block of fixed work (q load, epilogue); one program
    per SM is resident at a time, as 576-wide tiles fill shared memory.
    """
    n_blocks = max(1, -(-capacity // block_n))
    programs = batch * row_tiles
    best, best_cost = 1, math.inf
    for splits in range(1, min(MAX_SPLITS, n_blocks) + 1):
        waves = -(-programs * splits // sms)
        cost = waves * (-(-n_blocks // splits) + 1) + (0.5 if splits > 1 else 0.0)
        if cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


def _decode_triton(q, kv_cache, cache_seqlens, block_table, head_dim_v, scale, causal, num_splits,
                   implementation, config=None):
    """The Triton path; `config` overrides `_tile_config` (benchmarks/tune_decode.py uses it)."""
    b, s_q, h, d = q.shape
    rows = s_q * h
    paged = block_table is not None
    page_size = kv_cache.shape[1] if paged else None
    cfg = config or _tile_config(rows, q.dtype, page_size)
    capacity = block_table.shape[1] * page_size if paged else kv_cache.shape[1]
    row_tiles = -(-rows // cfg["BLOCK_M"])
    if num_splits is None:
        num_splits = choose_num_splits(b, row_tiles, capacity, cfg["BLOCK_N"], num_sms())
    table = block_table if paged else cache_seqlens        # unused pointer when contiguous
    common = dict(
        H=h, S_Q=s_q, N_MAX=capacity if not paged else 0, PAGED=paged, PAGE_SIZE=page_size or 1,
        MAX_BLOCKS=block_table.shape[1] if paged else 1, NUM_PAGES=kv_cache.shape[0] if paged else 1,
        D_V=head_dim_v, D_R=d - head_dim_v, CAUSAL=causal, NUM_SPLITS=num_splits,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    q_rows = q.reshape(b, rows, d)
    if num_splits == 1:
        part_shape = [jax.ShapeDtypeStruct((b, rows, head_dim_v), q.dtype),
                      jax.ShapeDtypeStruct((b, rows), jnp.float32)]
    else:
        part_shape = [jax.ShapeDtypeStruct((b, num_splits, rows, head_dim_v), jnp.float32),
                      jax.ShapeDtypeStruct((b, num_splits, rows), jnp.float32)]
    from flashmla_jax.kernels import decode as kernels

    out, lse = launch(kernels.mla_decode_split_kernel, q_rows, kv_cache, cache_seqlens, table, np.float32(scale),
                      out_shape=part_shape, grid=(row_tiles, num_splits, b), implementation=implementation,
                      num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **common)
    if num_splits > 1:
        block_r = 4 if b * rows >= 4 * num_sms() else 1    # few rows (one long sequence): spread them
        out, lse = launch(kernels.mla_decode_combine_kernel, out, lse,
                          out_shape=[jax.ShapeDtypeStruct((b, rows, head_dim_v), q.dtype),
                                     jax.ShapeDtypeStruct((b, rows), jnp.float32)],
                          grid=(-(-rows // block_r), b), implementation=implementation, num_warps=4,
                          num_stages=1, R=rows, D_V=head_dim_v, NUM_SPLITS=num_splits,
                          SPLITS_POW2=max(2, 1 << (num_splits - 1).bit_length()), BLOCK_R=block_r)
    return out.reshape(b, s_q, h, head_dim_v), lse.reshape(b, s_q, h)


@functools.partial(jax.jit, static_argnames=("head_dim_v", "softmax_scale", "causal", "num_splits",
                                             "return_lse", "implementation"))
def mla_decode(q: jax.Array, kv_cache: jax.Array, cache_seqlens: jax.Array, block_table: jax.Array | None = None,
               head_dim_v: int = 512, softmax_scale: float | None = None, causal: bool = True,
               num_splits: int | None = None, return_lse: bool = False, implementation: str | None = None):
    """Absorbed MLA decode (multi-query attention over the latent cache; V = K[..., :head_dim_v]).

    Args:
      q: [B, S_q, H, D] absorbed queries ([q_nope · W_UKᵀ ; q_pe], D = 576 for DeepSeek), fp16/bf16/fp32.
      kv_cache: [B, N, D] contiguous, or [num_blocks, page_size, D] pages addressed by `block_table`;
        same dtype as q.
      cache_seqlens: [B] int32, valid tokens per sequence, the S_q new ones included. Values are clamped
        to [0, capacity] (capacity N, or max_blocks * page_size): a negative length counts as 0 and no
        value makes a kernel read outside the cache.
      block_table: None, or [B, max_blocks] int32 page indices (paged cache; page_size a power of two in
        [16, 256]). Entries past a sequence's length are never read; an out-of-range index is clamped.
      head_dim_v: width of V, the first columns of the latent (512).
      softmax_scale: scores are q·k times this; None means D ** -0.5. DeepSeek passes
        mscale² / sqrt(192).
      causal: query i of S_q sees keys < seqlen - S_q + i + 1; otherwise all keys < seqlen.
      num_splits: key splits per sequence (flash-decoding); None picks them from the static shapes and
        the GPU's SM count.
      return_lse: also return the log-sum-exp of the scaled scores.
      implementation: "triton" (CUDA GPU), "xla" (the jnp reference) or "interpret" (the Triton kernels
        on the CPU through Triton's interpreter); None means "triton" on a CUDA device, else "xla".

    Returns:
      out [B, S_q, H, head_dim_v] in q's dtype, and with return_lse lse [B, S_q, H] float32 (natural log).
      A row that sees no key gives out 0 and lse -inf.
    """
    _check_inputs(q, kv_cache, cache_seqlens, block_table, head_dim_v, num_splits)
    impl = resolve_implementation(implementation)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if impl != "xla":
        _check_kernel_dims(q.shape[-1], head_dim_v)

    def decode(q, kv_cache, cache_seqlens, block_table):
        if impl == "xla":
            return reference.mla_decode_reference(q, kv_cache, cache_seqlens, block_table, head_dim_v=head_dim_v,
                                                  softmax_scale=scale, causal=causal)
        return _decode_triton(q, kv_cache, cache_seqlens, block_table, head_dim_v, scale, causal, num_splits, impl)

    out, lse = _inference_only(_fold_vmap_into_batch(decode))(q, kv_cache, cache_seqlens, block_table)
    return (out, lse) if return_lse else out


def _fold_vmap_into_batch(decode):
    """`jax.vmap` support: jax-triton has no batching rule, so a vmapped axis V is folded into the
    kernel's batch (B -> V * B) and unfolded from the outputs. Pages of a batched paged cache are laid
    end to end and each member's block table is offset to its own pages (after clamping, so an
    out-of-range index never reaches another member's pages)."""

    @jax.custom_batching.custom_vmap
    def call(q, kv_cache, cache_seqlens, block_table):
        return decode(q, kv_cache, cache_seqlens, block_table)

    @call.def_vmap
    def _rule(axis_size, in_batched, q, kv_cache, cache_seqlens, block_table):
        q_b, kv_b, len_b, table_b = in_batched
        v = axis_size

        def batched(x, is_batched):
            return x if is_batched else jnp.broadcast_to(x, (v,) + x.shape)

        q = batched(q, q_b)
        b = q.shape[1]
        seqlens = batched(cache_seqlens, len_b).reshape(v * b)
        if block_table is None:
            kv = batched(kv_cache, kv_b).reshape((v * b,) + kv_cache.shape[-2:])
            table = None
        else:
            table = batched(block_table, table_b)
            kv = kv_cache
            if kv_b:
                num_pages = kv_cache.shape[1]
                kv = kv_cache.reshape((v * num_pages,) + kv_cache.shape[2:])
                offsets = (jnp.arange(v, dtype=jnp.int32) * num_pages)[:, None, None]
                table = jnp.clip(table, 0, num_pages - 1) + offsets
            table = table.reshape(v * b, -1)
        out, lse = call(q.reshape((v * b,) + q.shape[2:]), kv, seqlens, table)
        return (out.reshape((v, b) + out.shape[1:]), lse.reshape((v, b) + lse.shape[1:])), (True, True)

    return call


def _inference_only(decode):
    """Differentiating decode raises: it is an inference kernel (mla_prefill has gradients)."""

    @jax.custom_jvp
    def call(q, kv_cache, cache_seqlens, block_table):
        return decode(q, kv_cache, cache_seqlens, block_table)

    @call.defjvp
    def _jvp(primals, tangents):
        raise TypeError("mla_decode is inference-only and has no derivative; for gradients use "
                        "flashmla_jax.mla_prefill (non-absorbed attention with a Triton backward), or "
                        "jax.lax.stop_gradient on the decode inputs")

    return call
