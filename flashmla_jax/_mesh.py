"""Mesh-axis helpers shared by the named layouts (flashmla_jax/sharding.py) and the partitioning rules
(ops/decode_partition.py, ops/prefill_partition.py, and LatentCache.append's in cache.py).

A role (batch, heads, sequence) is served by a tuple of mesh axis names, `Axes`; () means not sharded. A
PartitionSpec entry is None, one name, or a tuple of names (major to minor).

How the rules work: each wraps a *body* (the per-shard function of one implementation: the jnp reference for
"xla", the Triton launches for "triton") in `jax.experimental.custom_partitioning`, with a Shardy
`sharding_rule` for propagation and a `partition` callback that picks the layout from the operands'
shardings. A rule never depends on its body, so both implementations share it and the CPU tests cover it
with the jnp body. Host callbacks must not go through these wrappers: a `pure_callback` inside
`custom_partitioning` is freed before it runs and the program segfaults (jax-ml/jax PR #23620), so the
"interpret" implementation runs unwrapped (ops/_host_call.py): under sharded jit its callback runs once on
device 0 over gathered inputs (correct, not partitioned); under `shard_map` it runs per device on the local
shards. Errors raised in `partition` surface when XLA compiles the jitted function.
"""
from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

Axes = tuple[str, ...]


def as_axes(axis) -> Axes:
    """None, a mesh axis name, or a sequence of names -> Axes."""
    if axis is None:
        return ()
    return (axis,) if isinstance(axis, str) else tuple(axis)


def entry(axes: Axes):
    """Axes as a PartitionSpec entry: None, one name, or a tuple of names."""
    return None if not axes else (axes[0] if len(axes) == 1 else tuple(axes))


def size(mesh, axes: Axes) -> int:
    """Devices along `axes` (1 for ())."""
    return math.prod(mesh.shape[a] for a in axes)


def check_divides(mesh, axes: Axes, extent: int, what: str) -> None:
    """ValueError naming the axes and the dimension when `axes` do not divide its `extent`."""
    d = size(mesh, axes)
    if axes and extent % d:
        raise ValueError(f"mesh axis {entry(axes)!r} (size {d}) does not divide {what} = {extent}: shard a "
                         "dimension only over axes whose total size divides it")


def axes_of(sharding, dim: int) -> Axes:
    """Mesh axes sharding dimension `dim` of an operand (() when replicated, or without a mesh)."""
    if not isinstance(sharding, NamedSharding):
        # decode_shardings=True gives NamedShardings whenever the jit knows a mesh; without one there is
        # nothing to partition over.
        return ()
    spec = tuple(sharding.spec) + (None,) * 8
    return as_axes(spec[dim])


def named(mesh, *dims: Axes) -> NamedSharding:
    """The NamedSharding with one Axes per dimension."""
    return NamedSharding(mesh, P(*(entry(a) for a in dims)))


def minus(axes: Axes, used: Axes) -> Axes:
    """`axes` without those in `used`, in order."""
    return tuple(a for a in axes if a not in used)


def collective_axis(axes: Axes):
    """`axes` as the axis name argument of a collective (psum, pmax, axis_index)."""
    return axes if len(axes) > 1 else axes[0]


def shard_index(axes: Axes):
    """Linear index of this device along `axes` (major to minor, as a PartitionSpec tuple tiles)."""
    return jax.lax.axis_index(collective_axis(axes)) if axes else 0
