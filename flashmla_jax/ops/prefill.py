"""`mla_prefill`: causal flash attention for the non-absorbed MLA prefill (d_qk 192 / d_v 128), differentiable."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks, reference
from flashmla_jax.ops._launch import launch
from flashmla_jax.ops._registry import Implementation, Registry, TritonRunner
from flashmla_jax.ops.prefill_partition import partition_prefill

MAX_HEAD_DIM = 256


def _check_inputs(q, k, v, segment_ids):
    if q.ndim != 4:
        raise ValueError(f"q must be [B, S, H, d_qk], got shape {q.shape}")
    b, s, h, d_qk = q.shape
    _checks.float_dtype("q", q)
    for name, x in (("k", k), ("v", v)):
        _checks.same_dtype(name, x, "q", q)
    heads_ok = k.ndim == 4 and (h % k.shape[2] == 0 if k.shape[2] else h == 0)     # no heads: none of k either
    if k.ndim != 4 or k.shape[:2] != (b, s) or k.shape[3] != d_qk or not heads_ok:
        raise ValueError(f"k must be [B={b}, S={s}, H_kv, d_qk={d_qk}] with H={h} a multiple of H_kv, "
                         f"got shape {k.shape}")
    if v.ndim != 4 or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be [B={b}, S={s}, H_kv={k.shape[2]}, d_v], got shape {v.shape}")
    if segment_ids is not None:
        _checks.int32_array("segment_ids", segment_ids, (b, s), f"None or int32 [B={b}, S={s}]")


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


# ---------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class KernelTiles:
    """One prefill kernel's tiling. fwd and dq need block_m % block_n == 0, dkdv block_n % block_m == 0."""
    block_m: int              # query rows per program (dkdv: per inner step)
    block_n: int              # keys per inner step (dkdv: per program)
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class PrefillTiles:
    """The tiles of the three attention kernels, and the rows per program of the backward's preprocess
    (delta = rowsum(dO * O) - dLSE: bandwidth-bound, one row tile of D_V columns)."""
    fwd: KernelTiles
    dkdv: KernelTiles
    dq: KernelTiles
    preprocess_block_m: int = 64


def _tiles(fwd: tuple, dkdv: tuple, dq: tuple) -> PrefillTiles:
    return PrefillTiles(KernelTiles(*fwd), KernelTiles(*dkdv), KernelTiles(*dq))


# Static tile table per dtype class and width (no runtime autotuning): (block_m, block_n, warps, stages).
_TILES = {
    # H100, 16-bit inputs, max(d_qk, d_v) <= 128 (not swept: the wide class's tiles, which fit)
    ("16", "narrow"): _tiles(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    # H100, 16-bit inputs, widths up to 192: swept on P1 (192/128; benchmarks/benchmark_prefill.py --sweep).
    # fwd 128 x 128 at 3 stages (288 KB) and dq 128 x 64 at 4 stages (240 KB) overflow shared memory.
    ("16", "wide"): _tiles(fwd=(128, 64, 8, 3), dkdv=(64, 128, 8, 3), dq=(128, 64, 8, 3)),
    # widths up to 256: halved backward tiles so that dK + dV (or dQ) accumulators stay in registers
    ("16", "xwide"): _tiles(fwd=(128, 64, 8, 2), dkdv=(64, 64, 8, 2), dq=(64, 64, 8, 2)),
    # float32 inputs run 3xTF32 dots, whose operand splitting takes more shared memory than the model below
    # counts (dK/dV at 32 x 64 x 2 stages asked for 232 KB at 192/128): small tiles, one stage in the backward.
    ("32", "narrow"): _tiles(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1)),
    ("32", "wide"): _tiles(fwd=(64, 32, 4, 2), dkdv=(16, 64, 4, 1), dq=(64, 16, 4, 1)),
    ("32", "xwide"): _tiles(fwd=(32, 16, 4, 2), dkdv=(16, 32, 4, 1), dq=(32, 16, 4, 1)),
}
# The interpreter: small tiles, so that the tests' short sequences still cover partial and diagonal blocks.
_INTERPRET_TILES = PrefillTiles(KernelTiles(32, 16, 4, 1), KernelTiles(16, 32, 4, 1), KernelTiles(32, 16, 4, 1),
                                preprocess_block_m=16)
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


def _fit_shared_memory(kind: str, tiles: KernelTiles, dq: int, dv: int, esize: int) -> KernelTiles:
    bm, bn, warps, stages = dataclasses.astuple(tiles)
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
    return KernelTiles(bm, bn, warps, stages)


def prefill_tiles(implementation: str, dtype, d_qk: int, d_v: int) -> PrefillTiles:
    """The tiles of one shape class, from the static table, trimmed to fit shared memory."""
    if implementation == "interpret":
        return _INTERPRET_TILES
    bits = "32" if dtype == jnp.float32 else "16"
    width = "narrow" if max(d_qk, d_v) <= 128 else ("wide" if max(d_qk, d_v) <= 192 else "xwide")
    (qa, qb, _), (va, vb, _) = split_head_dim(d_qk), split_head_dim(d_v)
    esize = 6 if bits == "32" else 2        # float32: 4 bytes, counted 1.5x for the 3xTF32 operand splits
    table = _TILES[(bits, width)]
    fit = functools.partial(_fit_shared_memory, dq=qa + qb, dv=va + vb, esize=esize)
    return dataclasses.replace(table, fwd=fit("fwd", table.fwd), dkdv=fit("dkdv", table.dkdv), dq=fit("dq", table.dq))


# ---------------------------------------------------------------- plan


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One kernel's launch parameters: grid, warps, stages and constexprs."""
    grid: tuple
    num_warps: int
    num_stages: int
    constexprs: dict


@dataclasses.dataclass(frozen=True)
class PrefillPlan:
    """Static launch parameters of one prefill call: the forward, and the backward's three kernels, and what
    they were planned from (tiles, causal, segments), so that a shard can re-plan for its own shapes."""
    implementation: str       # "triton" or "interpret"
    fwd: KernelLaunch
    preprocess: KernelLaunch
    dkdv: KernelLaunch
    dq: KernelLaunch
    tiles: PrefillTiles
    causal: bool
    has_segments: bool

    def for_arrays(self, q, k, v) -> "PrefillPlan":
        """This plan for q [B', S, H', d_qk], k, v: itself when the shapes are the ones planned for, else
        the same tiles re-planned (a partitioned call runs on shards: grids and head counts change)."""
        b, s, h, _ = q.shape
        if self.fwd.grid[1] == b * h and self.fwd.constexprs["H"] == h and self.fwd.constexprs["H_KV"] == k.shape[2] \
                and self.fwd.constexprs["S"] == s:
            return self
        return plan_prefill(q.shape, k.shape, v.shape, q.dtype, self.causal, self.has_segments,
                            self.implementation, self.tiles)


def plan_prefill(q_shape: tuple, k_shape: tuple, v_shape: tuple, dtype, causal: bool, has_segments: bool,
                 implementation: str, tiles: PrefillTiles | None = None) -> PrefillPlan:
    """q_shape [B, S, H, d_qk], k_shape [B, S, H_kv, d_qk], v_shape [B, S, H_kv, d_v]; implementation
    "triton" or "interpret". `tiles` replaces `prefill_tiles`' choice (benchmarks/benchmark_prefill.py
    sweeps it)."""
    b, s, h, d_qk = q_shape
    h_kv, d_v = k_shape[2], v_shape[3]
    tiles = tiles or prefill_tiles(implementation, dtype, d_qk, d_v)
    qa, qb, qmask = split_head_dim(d_qk)
    va, vb, vmask = split_head_dim(d_v)
    dims = dict(S=s, H=h, H_KV=h_kv, D_QK=d_qk, QA=qa, QB=qb, QK_MASK_B=qmask, D_V=d_v, VA=va, VB=vb,
                V_MASK_B=vmask, CAUSAL=bool(causal), HAS_SEG=bool(has_segments),
                PRECISE=dtype == jnp.float32)   # float32 inputs: 3xTF32 dots (plain TF32 misses 1e-3)

    def attention(t: KernelTiles, programs: int, heads: int) -> KernelLaunch:
        return KernelLaunch((programs, b * heads), t.num_warps, t.num_stages,
                            dict(dims, BLOCK_M=t.block_m, BLOCK_N=t.block_n))

    block_r = tiles.preprocess_block_m
    preprocess = KernelLaunch((-(-s // block_r), b * h), 4, 1,
                              dict(S=s, H=h, D_V=d_v, VA=va, VB=vb, V_MASK_B=vmask, BLOCK_M=block_r))
    return PrefillPlan(implementation,
                       fwd=attention(tiles.fwd, -(-s // tiles.fwd.block_m), h), preprocess=preprocess,
                       dkdv=attention(tiles.dkdv, -(-s // tiles.dkdv.block_n), h_kv),
                       dq=attention(tiles.dq, -(-s // tiles.dq.block_m), h),
                       tiles=tiles, causal=bool(causal), has_segments=bool(has_segments))


# ---------------------------------------------------------------- kernels


def _seg_arg(segment_ids):
    return jnp.zeros((1,), jnp.int32) if segment_ids is None else segment_ids


def _run(kernel, plan: PrefillPlan, step: KernelLaunch, *args, out_shape, **kwargs):
    return launch(kernel, *args, out_shape=out_shape, grid=step.grid, implementation=plan.implementation,
                  num_warps=step.num_warps, num_stages=step.num_stages, **kwargs, **step.constexprs)


def _forward(q, k, v, segment_ids, scale, plan: PrefillPlan):
    """-> out [B, S, H, d_v] (q's dtype), lse [B, H, S] float32."""
    from flashmla_jax.kernels import prefill as kernels

    plan = plan.for_arrays(q, k, v)

    b, s, h, _ = q.shape
    out, lse = _run(kernels.mla_prefill_fwd_kernel, plan, plan.fwd, q, k, v, _seg_arg(segment_ids),
                    np.float32(scale), out_shape=[jax.ShapeDtypeStruct((b, s, h, v.shape[-1]), q.dtype),
                                                  jax.ShapeDtypeStruct((b, h, s), jnp.float32)])
    return out, lse


def _backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan: PrefillPlan):
    """Gradients of (out, lse) -> (dq, dk, dv). lse, dlse: [B, H, S] float32."""
    from flashmla_jax.kernels import prefill as kernels

    plan = plan.for_arrays(q, k, v)

    seg = _seg_arg(segment_ids)
    (delta,) = _run(kernels.mla_prefill_bwd_preprocess_kernel, plan, plan.preprocess, out, dout, dlse,
                    out_shape=[jax.ShapeDtypeStruct(lse.shape, jnp.float32)])
    dk, dv = _run(kernels.mla_prefill_bwd_dkdv_kernel, plan, plan.dkdv, q, k, v, dout, lse, delta, seg,
                  np.float32(scale),
                  out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)])
    (dq,) = _run(kernels.mla_prefill_bwd_dq_kernel, plan, plan.dq, q, k, v, dout, lse, delta, seg,
                 np.float32(scale), out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)])
    return dq, dk, dv


# Partitioning rules for the kernel launchers under jit over sharded inputs (ops/prefill_partition.py); _flash,
# _flash_fwd and _flash_bwd call these module globals. An "interpret" plan passes through unwrapped.
_forward, _backward = partition_prefill(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, segment_ids, scale, plan):
    return _forward(q, k, v, segment_ids, scale, plan)


def _flash_fwd(q, k, v, segment_ids, scale, plan):
    out, lse = _forward(q, k, v, segment_ids, scale, plan)
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, plan, residuals, cotangents):
    q, k, v, segment_ids, out, lse = residuals
    dout, dlse = cotangents
    dq, dk, dv = _backward(q, k, v, segment_ids, out, lse, dout.astype(out.dtype), dlse.astype(jnp.float32),
                           scale, plan)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def prefill_with_plan(plan: PrefillPlan, q, k, v, softmax_scale: float, segment_ids=None):
    """The kernels' path of `mla_prefill` as `plan` lays it out (differentiable; no input checks): how
    benchmarks run the op with their own tiles, `plan_prefill(..., tiles=...)`.

    q [B, S, H, d_qk], k [B, S, H_kv, d_qk], v [B, S, H_kv, d_v] -> out [B, S, H, d_v] (q's dtype),
    lse [B, S, H] float32."""
    out, lse = _flash(q, k, v, segment_ids, float(softmax_scale), plan)
    return out, lse.transpose(0, 2, 1)


def mla_prefill(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = True, softmax_scale: float | None = None,
                segment_ids: jax.Array | None = None, return_lse: bool = False, implementation: str | None = None):
    """Flash attention for the MLA prefill (non-absorbed form), differentiable in q, k and v.

    Args:
      q: [B, S, H, d_qk] queries ([q_nope ; q_pe], d_qk = 192 for DeepSeek), fp16/bf16/fp32.
      k: [B, S, H_kv, d_qk] keys; H must be a multiple of H_kv (query head h reads KV head h // (H // H_kv)).
      v: [B, S, H_kv, d_v] values (d_v = 128 for DeepSeek). Same dtype as q.
        The Triton kernels take d_qk and d_v any multiple of 16 up to 256 (they may differ); "xla" any.
      causal: query i sees keys j <= i.
      softmax_scale: scores are q·k times this, a Python float > 0 (ValueError otherwise, on every implementation;
        a traced value is a TypeError: it is compiled into the kernels); None means d_qk ** -0.5.
      segment_ids: None, or [B, S] int32 packing variable-length sequences: a token sees only keys with its
        own segment id (and, when causal, not after it).
      return_lse: also return the log-sum-exp of the scaled scores (differentiable too: its cotangent enters
        the backward as delta = rowsum(dO * O) - dLSE).
      implementation: "triton" (CUDA GPU), "xla" (the jnp reference, differentiated by JAX) or "interpret"
        (the Triton kernels through Triton's interpreter on the CPU); None: "triton" on a CUDA device, else "xla".

    Returns:
      out [B, S, H, d_v] in q's dtype, and with return_lse lse [B, S, H] float32 (natural log). Every row sees its
      own token; a NaN or inf in q, a key or value the row sees, or the scale makes that row NaN (out and lse)
      on every implementation. Empty inputs (B, S or H 0) give empty results.

    Gradients ("triton"/"interpret") come from the Triton backward through jax.custom_vjp; jax-triton has no
    batching rule, so vmap over the kernels is not supported (fold the batch into B).
    """
    q, k, v = (_checks.as_array(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
    segment_ids = None if segment_ids is None else _checks.as_array("segment_ids", segment_ids)
    return _mla_prefill(q, k, v, segment_ids, causal=causal, softmax_scale=_checks.static_scale(softmax_scale),
                        return_lse=return_lse, implementation=implementation)


@functools.partial(jax.jit, static_argnames=("causal", "softmax_scale", "return_lse", "implementation"))
def _mla_prefill(q, k, v, segment_ids, causal, softmax_scale, return_lse, implementation):
    """`mla_prefill` under jit, softmax_scale a float or None."""
    _check_inputs(q, k, v, segment_ids)
    scale = _checks.softmax_scale(softmax_scale, q.shape[-1])
    if q.size == 0:        # every implementation: empty rows
        b, s, h, _ = q.shape
        out, lse = jnp.zeros((b, s, h, v.shape[-1]), q.dtype), jnp.full((b, s, h), -jnp.inf, jnp.float32)
        return (out, lse) if return_lse else out
    impl = PREFILL.select(implementation, PrefillCall(q.shape[-1], v.shape[-1]))
    out, lse = impl.prefill(q, k, v, segment_ids, scale=scale, causal=causal)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- the implementations and their registry


@dataclasses.dataclass(frozen=True)
class PrefillCall:
    """The static facts of one prefill call that decide which implementation can run it."""
    d_qk: int
    d_v: int


class PrefillImplementation(Implementation[PrefillCall]):
    """prefill(q, k, v, segment_ids, *, scale, causal) -> (out [B, S, H, d_v], lse [B, S, H] float32),
    differentiable in q, k and v."""

    def prefill(self, q, k, v, segment_ids, *, scale, causal):
        raise NotImplementedError


class XlaPrefill(PrefillImplementation):
    """The jnp reference (any widths), differentiated by JAX."""
    name = "xla"

    def unsupported(self, call: PrefillCall) -> str | None:
        return None

    def prefill(self, q, k, v, segment_ids, *, scale, causal):
        return reference.mla_prefill_reference(q, k, v, softmax_scale=scale, causal=causal, segment_ids=segment_ids)


class TritonPrefill(TritonRunner, PrefillImplementation):
    """The tl forward and backward kernels (kernels/prefill.py) through jax-triton on a CUDA GPU (runner
    "triton") or Triton's interpreter ("interpret"), differentiated by their custom_vjp; `prefill_tiles` picks
    their tiles."""

    def unsupported(self, call: PrefillCall) -> str | None:
        for name, d in (("d_qk", call.d_qk), ("d_v", call.d_v)):
            if d % 16 or not 16 <= d <= MAX_HEAD_DIM:
                return f"the Triton kernels need {name} to be a multiple of 16 in [16, {MAX_HEAD_DIM}], got {d}"
        return self.runner_unsupported()

    def prefill(self, q, k, v, segment_ids, *, scale, causal):
        plan = plan_prefill(q.shape, k.shape, v.shape, q.dtype, causal, segment_ids is not None, self.name)
        return prefill_with_plan(plan, q, k, v, scale, segment_ids)


PREFILL = Registry("mla_prefill", {"triton": (TritonPrefill("triton"),), "xla": (XlaPrefill(),),
                                   "interpret": (TritonPrefill("interpret"),)})
