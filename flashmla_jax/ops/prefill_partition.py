"""Partitioning rules of `mla_prefill`'s kernel launchers, forward and backward (flashmla_jax/_mesh.py says how
a rule wraps a body).

Layouts: batch and heads (q's H and, when the head axes divide it, k/v's H_kv; with H_kv = 1 k/v are
replicated and their gradients psum-reduced over the head axes). A sharding of S (or of d) is replicated:
causal context-parallel prefill (ring attention) is not built. A mesh axis whose size does not divide the
dimension it shards raises ValueError naming both.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning

from flashmla_jax._mesh import Axes, axes_of, check_divides, collective_axis, entry, minus, named, size


def plan_prefill_partition(mesh, q_sharding, k_sharding, q_shape: tuple, k_shape: tuple) -> tuple[Axes, Axes, bool]:
    """(batch axes, head axes, k/v heads sharded too) for one prefill call (module docstring's rules)."""
    b, _, h, _ = q_shape
    h_kv = k_shape[2]
    batch = axes_of(q_sharding, 0) or axes_of(k_sharding, 0)
    heads = minus(axes_of(q_sharding, 2) or axes_of(k_sharding, 2), batch)
    check_divides(mesh, batch, b, "the batch B (q axis 0)")
    check_divides(mesh, heads, h, "the heads H (q axis 2)")
    if heads and h_kv % size(mesh, heads) and h_kv != 1:
        raise ValueError(f"mesh axis {entry(heads)!r} (size {size(mesh, heads)}) shards q's H = {h} but divides "
                         f"neither k/v's H_kv = {h_kv} nor is H_kv 1: a shard's query heads would need KV heads "
                         "of other shards")
    return batch, heads, bool(heads) and h_kv % size(mesh, heads) == 0


def partition_prefill(forward: Callable, backward: Callable) -> tuple[Callable, Callable]:
    """Wraps ops/prefill.py's kernel launchers (same signatures) in partitioning rules.

    forward(q, k, v, segment_ids, scale, plan) -> (out [B, S, H, d_v], lse [B, H, S]);
    backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan) -> (dq, dk, dv).
    q [B, S, H, d_qk]; k [B, S, H_kv, d_qk]; v [B, S, H_kv, d_v]; segment_ids None or [B, S] int32;
    plan the PrefillPlan (None for jnp bodies, as the CPU tests run; tests/_util.py). A plan for "interpret" passes
    through unwrapped (host callbacks cannot run inside custom_partitioning).
    """

    def specs(mesh, arg_shapes, with_seg):
        q_s, k_s = arg_shapes[0], arg_shapes[1]
        batch, heads, kv_sharded = plan_prefill_partition(mesh, q_s.sharding, k_s.sharding, q_s.shape, k_s.shape)
        kvh = heads if kv_sharded else ()
        qs = named(mesh, batch, (), heads, ())
        kvs = named(mesh, batch, (), kvh, ())
        lse = named(mesh, batch, heads, ())
        seg = (named(mesh, batch, ()),) if with_seg else ()
        # k/v replicated over the head axes (H_kv = 1): each shard's dK, dV is a partial sum.
        reduce_axes = heads if heads and not kv_sharded else ()
        return qs, kvs, lse, seg, reduce_axes

    def interpreted(plan):
        return plan is not None and plan.implementation == "interpret"

    def fwd(q, k, v, segment_ids, scale, plan):
        if interpreted(plan):
            return forward(q, k, v, segment_ids, scale, plan)
        with_seg = segment_ids is not None

        def fn(q, k, v, *seg):
            return forward(q, k, v, seg[0] if seg else None, scale, plan)

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            qs, kvs, lse, seg, _ = specs(mesh, arg_shapes, with_seg)
            return mesh, fn, (qs, lse), (qs, kvs, kvs) + seg

        wrapped = custom_partitioning(fn)
        wrapped.def_partition(partition=partition, sharding_rule=(
            "b s h d, b s k d, b s k e" + (", b s" if with_seg else "") + " -> b s h e, b h s"))
        return tuple(wrapped(q, k, v, *((segment_ids,) if with_seg else ())))

    def bwd(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan):
        if interpreted(plan):
            return backward(q, k, v, segment_ids, out, lse, dout, dlse, scale, plan)
        with_seg = segment_ids is not None

        def fn(q, k, v, *rest):
            seg, (out, lse, dout, dlse) = (rest[0], rest[1:]) if with_seg else (None, rest)
            return backward(q, k, v, seg, out, lse, dout, dlse, scale, plan)

        def partition(mesh, arg_shapes, result_shape):
            del result_shape
            qs, kvs, lse_s, seg, reduce_axes = specs(mesh, arg_shapes, with_seg)

            def lower(*args):
                dq, dk, dv = fn(*args)
                if reduce_axes:
                    name = collective_axis(reduce_axes)
                    dk, dv = (jax.lax.psum(x.astype(jnp.float32), name).astype(x.dtype) for x in (dk, dv))
                return dq, dk, dv

            return mesh, lower, (qs, kvs, kvs), (qs, kvs, kvs) + seg + (qs, lse_s, qs, lse_s)

        wrapped = custom_partitioning(fn)
        wrapped.def_partition(partition=partition, sharding_rule=(
            "b s h d, b s k d, b s k e" + (", b s" if with_seg else "")
            + ", b s h e, b h s, b s h e, b h s -> b s h d, b s k d, b s k e"))
        return tuple(wrapped(q, k, v, *((segment_ids,) if with_seg else ()), out, lse, dout, dlse))

    return fwd, bwd
