"""`mla_prefill`: causal flash attention for the non-absorbed MLA prefill (d_qk 192 / d_v 128), differentiable."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import reference
from flashmla_jax._backend import resolve_implementation
from flashmla_jax.ops._launch import launch

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32)
MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, segment_ids):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, H, d_qk], got shape {q.shape}")
    b, s, h, d_qk = q.shape
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} dtype {x.dtype} must equal q's dtype {q.dtype}")
    if k.ndim != 4 or k.shape[:2] != (b, s) or k.shape[3] != d_qk or k.shape[2] < 1 or h % k.shape[2]:
        raise ValueError(f"k must be [B={b}, S={s}, H_kv, d_qk={d_qk}] with H={h} a multiple of H_kv, "
                         f"got shape {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B={b}, S={s}, H_kv={k.shape[2]}, d_v], got shape {v.shape}")
    if segment_ids is not None and (segment_ids.shape != (b, s) or segment_ids.dtype != jnp.int32):
        raise TypeError(f"segment_ids must be None or int32 [B={b}, S={s}], got {segment_ids.dtype} "
                        f"{segment_ids.shape}")


def _check_kernel_dims(d_qk: int, d_v: int):
    for name, d in (("d_qk", d_qk), ("d_v", d_v)):
        if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
            raise ValueError(f"the Triton kernels need {name} to be a multiple of 16 in [16, {MAX_HEAD_DIM}], got {d}")


def split_head_dim(d: int) -> tuple[int, int, bool]:
    """Head dim d -> (DA, DB, mask_b): two power-of-two column chunks, each its own tl.dot.

    A power of two >= 32 splits in halves (128 -> 64 + 64), anything else into the largest power of two
    below it plus the next power of two >= the rest (192 -> 128 + 64; 80 -> 64 + 16; 112 -> 64 + 64 with
    the last 16 columns masked: the padding lives only in registers, never in memory traffic).
    """
    if d & (d - 1) == 0:
        return (d // 2, d // 2, False) if d >= 32 else (16, 16, True)
    da = 1 << (d.bit_length() - 1)
    db = max(16, 1 << (d - da - 1).bit_length())
    return da, db, da + db != d


# Static tile table, per implementation, dtype class and width (no runtime autotuning).
# Each entry: (BLOCK_M, BLOCK_N, num_warps, num_stages). fwd and dq need BLOCK_M % BLOCK_N == 0, dkdv
# BLOCK_N % BLOCK_M == 0.
_TILES = {
    # H100, 16-bit inputs, max(d_qk, d_v) <= 128 (not swept: the wide class's tiles, which fit)
    ("triton", "16", "narrow"): dict(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    # H100, 16-bit inputs, widths up to 192: swept on P1 (192/128; benchmarks/benchmark_prefill.py --sweep).
    # fwd 128 x 128 at 3 stages (288 KB) and dq 128 x 64 at 4 stages (240 KB) overflow shared memory.
    ("triton", "16", "wide"): dict(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    # widths up to 256: halved backward tiles so that dK + dV (or dQ) accumulators stay in registers
    ("triton", "16", "xwide"): dict(fwd=(128, 64, 8, 2), dkdv=(64, 64, 8, 2), dq=(64, 64, 8, 2)),
    # float32 inputs run 3xTF32 dots, whose operand splitting takes more shared memory than the model below
    # counts (dK/dV at 32 x 64 x 2 stages asked for 232 KB at 192/128): small tiles, one stage in the backward.
    ("triton", "32", "narrow"): dict(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1)),
    ("triton", "32", "wide"): dict(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1)),
    ("triton", "32", "xwide"): dict(fwd=(32, 16, 4, 2), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1)),
}
# Shared memory a config may use (H100: 227 KB per block; configs up to 208 KB were seen to run at 192/128, and
# `_fit_shared_memory` keeps any (d_qk, d_v, dtype) inside this by dropping stages, then block size).
SMEM_BUDGET = 216 * 1024


def _smem_bytes(kind: str, bm: int, bn: int, stages: int, dq: int, dv: int, esize: int) -> int:
    """Pipelined operand buffers: the streamed tiles times `stages`, plus the resident tile."""
    w = dq + dv
    if kind == "fwd":                      # resident q [bm, dq]; streamed k, v [bn, dq + dv]
        return (bm * dq + stages * bn * w) * esize
    if kind == "dq":                       # resident q, dO [bm, dq + dv]; streamed k, v
        return (bm * w + stages * bn * w) * esize
    return (bn * w + stages * bm * w) * esize   # dkdv: resident k, v [bn, ...]; streamed q, dO [bm, ...]


def _fit_shared_memory(kind: str, cfg: tuple, dq: int, dv: int, esize: int) -> tuple:
    bm, bn, warps, stages = cfg
    while _smem_bytes(kind, bm, bn, stages, dq, dv, esize) > SMEM_BUDGET:
        streamed = bm if kind == "dkdv" else bn
        if stages > 2:
            stages -= 1
        elif streamed > 16:                # keeps BLOCK_M % BLOCK_N (or BLOCK_N % BLOCK_M) == 0
            bm, bn = (bm // 2, bn) if kind == "dkdv" else (bm, bn // 2)
        elif stages > 1:
            stages -= 1
        else:
            bm, bn = (bm, bn // 2) if kind == "dkdv" else (bm // 2, bn)
            if min(bm, bn) < 16:
                raise ValueError(f"no {kind} tile fits shared memory for d_qk={dq}, d_v={dv}")
    return bm, bn, warps, stages


_INTERPRET_TILES = dict(fwd=(32, 16, 4, 1), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1))
_TILE_OVERRIDE: dict | None = None          # benchmarks/benchmark_prefill.py sets this to tune (then re-traces)


def tile_config(implementation: str, dtype, d_qk: int, d_v: int) -> dict:
    """{"fwd" | "dkdv" | "dq": (BLOCK_M, BLOCK_N, num_warps, num_stages)} for one shape class, from the
    static table, trimmed to fit shared memory."""
    if _TILE_OVERRIDE is not None:
        return dict(_TILE_OVERRIDE)
    if implementation == "interpret":
        return dict(_INTERPRET_TILES)
    bits = "32" if dtype == jnp.float32 else "16"
    width = "narrow" if max(d_qk, d_v) <= 128 else ("wide" if max(d_qk, d_v) <= 192 else "xwide")
    (qa, qb, _), (va, vb, _) = split_head_dim(d_qk), split_head_dim(d_v)
    esize = 6 if bits == "32" else 2        # float32: 4 bytes, counted 1.5x for the 3xTF32 operand splits
    return {kind: _fit_shared_memory(kind, cfg, qa + qb, va + vb, esize)
            for kind, cfg in _TILES[("triton", bits, width)].items()}


def _dims(q, k, v) -> dict:
    d_qk, d_v = q.shape[-1], v.shape[-1]
    qa, qb, qmask = split_head_dim(d_qk)
    va, vb, vmask = split_head_dim(d_v)
    return dict(S=q.shape[1], H=q.shape[2], H_KV=k.shape[2], D_QK=d_qk, QA=qa, QB=qb, QK_MASK_B=qmask,
                D_V=d_v, VA=va, VB=vb, V_MASK_B=vmask,
                PRECISE=q.dtype == jnp.float32)   # float32 inputs: 3xTF32 dots (plain TF32 misses 1e-3)


def _seg_arg(segment_ids):
    return jnp.zeros((1,), jnp.int32) if segment_ids is None else segment_ids


def _forward(q, k, v, segment_ids, causal, scale, impl, tiles):
    """-> out [B, S, H, d_v] (q's dtype), lse [B, H, S] float32."""
    from flashmla_jax.kernels import prefill as kernels

    b, s, h, _ = q.shape
    bm, bn, warps, stages = tiles["fwd"]
    out, lse = launch(
        kernels.mla_prefill_fwd_kernel, q, k, v, _seg_arg(segment_ids), np.float32(scale),
        out_shape=[jax.ShapeDtypeStruct((b, s, h, v.shape[-1]), q.dtype),
                   jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        grid=(-(-s // bm), b * h), implementation=impl, num_warps=warps, num_stages=stages,
        CAUSAL=causal, HAS_SEG=segment_ids is not None, BLOCK_M=bm, BLOCK_N=bn, **_dims(q, k, v))
    return out, lse


def _backward(q, k, v, segment_ids, out, lse, dout, dlse, causal, scale, impl, tiles):
    """Gradients of (out, lse) -> (dq, dk, dv). lse, dlse: [B, H, S] float32."""
    from flashmla_jax.kernels import prefill as kernels

    b, s, h, d_qk = q.shape
    h_kv, d_v = k.shape[2], v.shape[-1]
    dims = _dims(q, k, v)
    seg = _seg_arg(segment_ids)
    has_seg = segment_ids is not None
    block_r = 64 if impl == "triton" else 16
    (delta,) = launch(
        kernels.mla_prefill_bwd_preprocess_kernel, out, dout, dlse,
        out_shape=[jax.ShapeDtypeStruct((b, h, s), jnp.float32)], grid=(-(-s // block_r), b * h),
        implementation=impl, num_warps=4, num_stages=1, S=s, H=h, D_V=d_v, VA=dims["VA"], VB=dims["VB"],
        V_MASK_B=dims["V_MASK_B"], BLOCK_M=block_r)
    bm, bn, warps, stages = tiles["dkdv"]
    dk, dv = launch(
        kernels.mla_prefill_bwd_dkdv_kernel, q, k, v, dout, lse, delta, seg, np.float32(scale),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(-(-s // bn), b * h_kv), implementation=impl, num_warps=warps, num_stages=stages,
        CAUSAL=causal, HAS_SEG=has_seg, BLOCK_M=bm, BLOCK_N=bn, **dims)
    bm, bn, warps, stages = tiles["dq"]
    (dq,) = launch(
        kernels.mla_prefill_bwd_dq_kernel, q, k, v, dout, lse, delta, seg, np.float32(scale),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
        grid=(-(-s // bm), b * h), implementation=impl, num_warps=warps, num_stages=stages,
        CAUSAL=causal, HAS_SEG=has_seg, BLOCK_M=bm, BLOCK_N=bn, **dims)
    return dq, dk, dv


# --- sharding hook (issue 12): the fwd and bwd kernel launchers get partitioning rules (ops/partition.py);
# _flash, _flash_fwd and _flash_bwd call these module globals. "interpret" passes through unwrapped.
from flashmla_jax.ops.partition import partition_prefill  # noqa: E402
_forward, _backward = partition_prefill(_forward, _backward)
# --- end sharding hook


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, segment_ids, causal, scale, impl, tiles_key):
    return _forward(q, k, v, segment_ids, causal, scale, impl, dict(tiles_key))


def _flash_fwd(q, k, v, segment_ids, causal, scale, impl, tiles_key):
    out, lse = _forward(q, k, v, segment_ids, causal, scale, impl, dict(tiles_key))
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, scale, impl, tiles_key, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, dout.astype(out.dtype), dlse.astype(jnp.float32),
                           causal, scale, impl, dict(tiles_key))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _mla_prefill(q, k, v, causal=True, softmax_scale=None, segment_ids=None, return_lse=False,
                 implementation=None):
    _check_inputs(q, k, v, segment_ids)
    impl = resolve_implementation(implementation)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    if impl == "xla":
        out, lse = reference.mla_prefill_reference(q, k, v, softmax_scale=scale, causal=causal,
                                                   segment_ids=segment_ids)
    else:
        _check_kernel_dims(q.shape[-1], v.shape[-1])
        if not scale > 0:
            raise ValueError(f"the Triton kernels need softmax_scale > 0, got {scale}")
        tiles = tile_config(impl, q.dtype, q.shape[-1], v.shape[-1])
        out, lse = _flash(q, k, v, segment_ids, bool(causal), scale, impl, tuple(sorted(tiles.items())))
        lse = lse.transpose(0, 2, 1)
    return (out, lse) if return_lse else out


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale", "return_lse", "implementation"))
def mla_prefill(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True, softmax_scale: float | None = None,
                segment_ids: jax.Array | None = None, return_lse: bool = False, implementation: str | None = None):
    """Flash attention for the MLA prefill (non-absorbed form), differentiable in q, k and v.

    Args:
      q: [B, S, H, d_qk] queries ([q_nope ; q_pe], d_qk = 192 for DeepSeek), fp16/bf16/fp32.
      k: [B, S, H_kv, d_qk] keys; H must be a multiple of H_kv (query head h reads KV head h // (H // H_kv)).
      v: [B, S, H_kv, d_v] values (d_v = 128 for DeepSeek). Same dtype as q.
        The Triton kernels take d_qk and d_v any multiple of 16 up to 256 (they may differ); "xla" any.
      causal: query i sees keys j <= i.
      softmax_scale: scores are q·k times this; None means d_qk ** -0.5. The Triton kernels need it > 0.
      segment_ids: None, or [B, S] int32 packing variable-length sequences: a token sees only keys with its
        own segment id (and, when causal, not after it).
      return_lse: also return the log-sum-exp of the scaled scores (differentiable too: its cotangent enters
        the backward as delta = rowsum(dO * O) - dLSE).
      implementation: "triton" (CUDA GPU), "xla" (the jnp reference, differentiated by JAX) or "interpret"
        (the Triton kernels through Triton's interpreter on the CPU); None: "triton" on a CUDA device, else "xla".

    Returns:
      out [B, S, H, d_v] in q's dtype, and with return_lse lse [B, S, H] float32 (natural log).

    Gradients ("triton"/"interpret") come from the Triton backward through jax.custom_vjp; jax-triton has no
    batching rule, so vmap over the kernels is not supported (fold the batch into B).
    """
    return _mla_prefill(q, k, v, causal, softmax_scale, segment_ids, return_lse, implementation)
