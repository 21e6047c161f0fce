"""The 64-row decode kernel's cost split into a fixed part and a part per key block: kernel GPU time (CUPTI) of
one split per sequence at H 128 for B 66 and 132 (132 and 264 row-tile programs: one and two waves on an H200's
132 SMs) over several context lengths, FlashMLA beside it (CUDA events) when it imports, and the least-squares
line ms = fixed + per_block * blocks for each. Needs a CUDA GPU.

    python benchmarks/decode_block_cost.py [--batches 66 132] [--contexts 512 1024 2048 4096 8192]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

import common
import peers


def line(blocks, ms) -> tuple[float, float]:
    """(fixed µs, µs per block): the least-squares line through (blocks, ms) points."""
    per_block, fixed = np.polyfit(np.asarray(blocks, float), np.asarray(ms, float), 1)
    return fixed * 1e3, per_block * 1e3


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="*", type=int, default=[66, 132])
    parser.add_argument("--contexts", nargs="*", type=int, default=[512, 1024, 2048, 4096, 8192])
    args = parser.parse_args(argv)
    if not common.on_gpu():
        sys.exit("decode_block_cost.py times GPU kernels: run it on a CUDA GPU")
    import jax
    import jax.numpy as jnp

    import flashmla_jax as fm

    for b in args.batches:
        ours, theirs = [], []
        for n in args.contexts:
            kq, kk = jax.random.split(jax.random.PRNGKey(n + b))
            q = jax.random.normal(kq, (b, 1, 128, 576), jnp.bfloat16)
            kv = jax.random.normal(kk, (b, n, 576), jnp.bfloat16)
            lengths = jnp.full((b,), n, jnp.int32)
            calls = jax.jit(lambda q, kv, lengths: [fm.mla_decode(q, kv, lengths, softmax_scale=0.07, num_splits=1,
                                                                  implementation="triton") for _ in range(4)])
            kernels = common.gpu_kernel_times(lambda: calls(q, kv, lengths))
            ms = float(np.median([t for name, t in kernels if "mla_decode" in name and "combine" not in name]))
            peer_ms = peers.flashmla_decode_ms(q, kv, lengths, None, 0.07, 64)
            ours.append((n // 64, ms))
            if peer_ms is not None:
                theirs.append((n // 64, peer_ms))
            print(f"B {b:4d}  N {n:6d}  blocks {n // 64:4d}  ours {ms:.4f} ms"
                  + ("" if peer_ms is None else f"  flashmla {peer_ms:.4f} ms"), flush=True)
        for name, points in (("ours", ours), ("flashmla", theirs)):
            if len(points) >= 2:
                fixed, per_block = line(*zip(*points))
                print(f"B {b:4d}  {name:8s}  {fixed:.2f} µs + {per_block:.3f} µs a block", flush=True)


if __name__ == "__main__":
    main()
