"""`mla_decode`: absorbed MLA decode over a contiguous or paged latent cache."""
from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import reference
from flashmla_jax._backend import num_sms, resolve_implementation
from flashmla_jax.ops._launch import launch

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)


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
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
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
    """Block sizes, warps, pipelining depth and programs per SM for one (rows = S_q * H, dtype) class."""
    block_m = 16 if rows <= 16 else (32 if rows <= 32 else 64)
    block_n = 32 if dtype == jnp.float32 else 64
    if page_size is not None:
        block_n = min(block_n, page_size)
    num_warps = 4 if block_m <= 32 else 8
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=2, parts_per_sm=1)


def default_num_parts(row_tiles: int, parts_per_sm: int, sms: int) -> int:
    """Programs per row tile: the grid (row tiles x parts) fills each SM with `parts_per_sm` programs."""
    return max(1, sms * parts_per_sm // row_tiles)


def build_schedule(seqlens: jax.Array, block_n: int, num_parts: int) -> tuple[jax.Array, jax.Array]:
    """Cuts the key blocks of all sequences, end to end, into `num_parts` equal runs (on the device).

    seqlens: [B] int32, clamped to [0, capacity].
    Returns cu_blocks [B + 1] int32 (cumulative BLOCK_N blocks per sequence) and
    sched [2 + num_parts] int32 = [part_blocks, total_blocks, first_seq...] (kernels/decode.py).
    """
    n_blocks = (seqlens + block_n - 1) // block_n
    cu_blocks = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_blocks, dtype=jnp.int32)])
    total = cu_blocks[-1]
    part_blocks = jnp.maximum((total + num_parts - 1) // num_parts, 1)
    starts = jnp.arange(num_parts, dtype=jnp.int32) * part_blocks
    first_seq = jnp.searchsorted(cu_blocks[1:], starts, side="right").astype(jnp.int32)
    return cu_blocks, jnp.concatenate([part_blocks[None], total[None], first_seq])


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
    num_parts = num_splits or default_num_parts(row_tiles, cfg["parts_per_sm"], num_sms())
    seqlens = jnp.clip(cache_seqlens, 0, capacity)
    cu_blocks, sched = build_schedule(seqlens, cfg["BLOCK_N"], num_parts)
    table = block_table if paged else seqlens              # an unused pointer when contiguous
    from flashmla_jax.kernels import decode as kernels

    out_shapes = [jax.ShapeDtypeStruct((b, rows, head_dim_v), q.dtype),
                  jax.ShapeDtypeStruct((b, rows), jnp.float32),
                  jax.ShapeDtypeStruct((num_parts, 2, rows, head_dim_v), jnp.float32),
                  jax.ShapeDtypeStruct((num_parts, 2, rows), jnp.float32)]
    out, lse, o_part, lse_part = launch(
        kernels.mla_decode_split_kernel, q.reshape(b, rows, d), kv_cache, seqlens, table, cu_blocks, sched,
        np.float32(scale), out_shape=out_shapes, grid=(row_tiles, num_parts), implementation=implementation,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        B=b, H=h, S_Q=s_q, N_MAX=0 if paged else capacity, PAGED=paged, PAGE_SIZE=page_size or 1,
        MAX_BLOCKS=block_table.shape[1] if paged else 1, NUM_PAGES=kv_cache.shape[0] if paged else 1,
        D_V=head_dim_v, D_R=d - head_dim_v, CAUSAL=causal, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
    block_r, block_d = 4, min(128, head_dim_v)
    out, lse = launch(
        kernels.mla_decode_combine_kernel, o_part, lse_part, cu_blocks, sched, out, lse,
        out_shape=out_shapes[:2], grid=(-(-rows // block_r), head_dim_v // block_d, b),
        implementation=implementation, num_warps=4, num_stages=1, input_output_aliases={4: 0, 5: 1},
        R=rows, D_V=head_dim_v, BLOCK_R=block_r, BLOCK_D=block_d)
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
      num_splits: how many equal runs the key blocks of the whole batch are cut into (flash-decoding
        splits, balanced by the real lengths: a long sequence is split over several programs, short
        ones share one); None means one run per SM and row tile.
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
    if impl == "xla":
        out, lse = reference.mla_decode_reference(q, kv_cache, cache_seqlens, block_table, head_dim_v=head_dim_v,
                                                  softmax_scale=scale, causal=causal)
    else:
        _check_kernel_dims(q.shape[-1], head_dim_v)
        out, lse = _decode_triton(q, kv_cache, cache_seqlens, block_table, head_dim_v, scale, causal,
                                  num_splits, impl)
    return (out, lse) if return_lse else out
