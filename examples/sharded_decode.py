"""A decode loop over many devices with plain `jax.jit`: the latent cache and the queries are laid out by
`flashmla_jax.sharding`, and every op (append, mla_decode) runs per shard.

    python examples/sharded_decode.py          # GPUs: all of them; CPU: 8 host devices stand in

Runs three layouts (batch DP, heads TP, sequence CP; plus DP x TP and DP x CP when the device count is even)
for a few steps each and checks every step against the same loop on one device.
"""
from __future__ import annotations

import os

# Before jax starts: on a CPU-only machine give it 8 devices (ignored by the GPU platform).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import flashmla_jax as fm  # noqa: E402
from flashmla_jax import sharding  # noqa: E402

B, H, D, D_V, MAX_LEN, STEPS = 8, 16, 576, 512, 256, 4
SCALE = 192 ** -0.5


def step(cache: fm.LatentCache, kv_new: jax.Array, q: jax.Array):
    """Append this step's latent row [B, 1, D], then attend with q [B, 1, H, D] -> (cache, out [B, 1, H, D_V])."""
    cache = cache.append(kv_new)
    return cache, cache.decode(q, head_dim_v=D_V, softmax_scale=SCALE)


def main():
    devices = np.array(jax.devices())
    n = len(devices)
    dtype = jnp.bfloat16 if devices[0].platform == "gpu" else jnp.float32
    one, two = Mesh(devices, ("x",)), (Mesh(devices.reshape(2, n // 2), ("data", "y")) if n % 2 == 0 else None)
    layouts = {"batch (DP)": sharding.data_parallel(one, "x"), "heads (TP)": sharding.tensor_parallel(one, "x"),
               "sequence (CP)": sharding.context_parallel(one, "x")}
    if two is not None:
        layouts["batch x heads"] = sharding.data_tensor_parallel(two, "data", "y")
        layouts["batch x sequence"] = sharding.data_context_parallel(two, "data", "y")

    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.standard_normal((B, 100, D)), dtype)
    lengths = jnp.asarray(rng.integers(0, 101, B), jnp.int32)                      # ragged, some may be 0
    cache0 = fm.LatentCache.create(B, MAX_LEN, D, dtype).append(prompt, num_new=lengths)
    inputs = [(jnp.asarray(rng.standard_normal((B, 1, D)), dtype), jnp.asarray(rng.standard_normal((B, 1, H, D)), dtype))
              for _ in range(STEPS)]

    jstep = jax.jit(step, donate_argnums=0)               # the cache is updated in place, per shard
    ref, cache = [], cache0
    for kv_new, q in inputs:
        cache, out = jax.jit(step)(cache, kv_new, q)       # one device; cache0 is kept for the layouts
        ref.append(np.asarray(out, np.float32))

    print(f"{n} x {devices[0].device_kind}, dtype {jnp.dtype(dtype).name}")
    for name, layout in layouts.items():
        # A copy: device_put may reuse cache0's buffer for one shard, and the loop donates the cache.
        cache = sharding.shard_cache(layout, jax.tree.map(jnp.copy, cache0))
        worst = 0.0
        for (kv_new, q), want in zip(inputs, ref):
            kv_new = jax.device_put(kv_new, layout.sharding(jax.sharding.PartitionSpec(*layout.kv_cache[:1])))
            cache, out = jstep(cache, kv_new, jax.device_put(q, layout.sharding(layout.q)))
            worst = max(worst, float(np.max(np.abs(np.asarray(out, np.float32) - want))))
        print(f"{name:>17}: out {out.sharding.spec}, cache {cache.kv.sharding.spec}, max |out - one device| {worst:.2e}")


if __name__ == "__main__":
    main()
