"""A jitted, donated MLA decode loop over a paged LatentCache; prints tokens/s.

Each step appends one new latent row per sequence ([c_kv ; k_pe], 576 wide) and attends the step's
absorbed queries (B, 1, H, 576) against the cache (V = the first 512 columns). Queries and latents are
random: this measures the loop, not a model.

    python examples/decode_loop.py                                  # CPU: xla, B 8, 16 heads, 256 steps
    python examples/decode_loop.py --batch 128 --prompt 4096 --steps 512        # GPU: triton (default)
    python examples/decode_loop.py --scan                           # the whole loop in one lax.scan

The Python loop calls one jitted step with the cache donated (`donate_argnums=0`), so the append updates
the cache buffer in place; `--scan` runs every step inside one jitted `lax.scan`.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import flashmla_jax as fm

D, D_V = 576, 512                       # DeepSeek-V2/V3: kv_lora_rank 512 + rope 64; V = c_kv
SOFTMAX_SCALE = 192 ** -0.5             # 1 / sqrt(qk_nope 128 + rope 64), mscale 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8, help="sequences decoded together (B)")
    p.add_argument("--heads", type=int, default=16, help="query heads (16 = DeepSeek-V3 at TP 8)")
    p.add_argument("--prompt", type=int, default=1024, help="longest prompt; lengths are ragged in [prompt/2, prompt]")
    p.add_argument("--steps", type=int, default=256, help="decode steps timed")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--implementation", default=None, choices=["triton", "xla", "interpret"],
                   help="mla_decode implementation; default: triton on a CUDA GPU, else xla")
    p.add_argument("--scan", action="store_true", help="run all steps in one jitted lax.scan")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def prefilled_cache(key, batch, prompt, capacity, page_size, dtype) -> fm.LatentCache:
    """A paged cache holding ragged prompts (lengths uniform in [prompt/2, prompt]) of random latents."""
    k_len, k_kv = jax.random.split(key)
    lengths = jax.random.randint(k_len, (batch,), max(1, prompt // 2), prompt + 1, dtype=jnp.int32)
    cache = fm.LatentCache.create(batch, capacity, D, dtype, page_size=page_size)
    latents = jax.random.normal(k_kv, (batch, prompt, D), jnp.float32).astype(dtype)
    return jax.jit(lambda c, x, n: c.append(x, num_new=n), donate_argnums=0)(cache, latents, lengths)


def decode_step(cache: fm.LatentCache, key: jax.Array, heads: int, implementation: str | None):
    """One token per sequence: append its latent [B, 1, 576], attend q [B, 1, H, 576] -> out [B, 1, H, 512]."""
    k_kv, k_q = jax.random.split(key)
    b, dtype = cache.batch, cache.dtype
    latent = jax.random.normal(k_kv, (b, 1, D), jnp.float32).astype(dtype)
    q = jax.random.normal(k_q, (b, 1, heads, D), jnp.float32).astype(dtype)
    cache = cache.append(latent)
    out = cache.decode(q, head_dim_v=D_V, softmax_scale=SOFTMAX_SCALE, implementation=implementation)
    return cache, out


def main(argv=None):
    args = parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    capacity = args.prompt + args.steps + 1             # + 1: the warm-up step of the Python loop
    key_cache, key_steps = jax.random.split(jax.random.PRNGKey(args.seed))
    cache = prefilled_cache(key_cache, args.batch, args.prompt, capacity, args.page_size, dtype)
    keys = jax.random.split(key_steps, args.steps + 1)
    step = functools.partial(decode_step, heads=args.heads, implementation=args.implementation)

    if args.scan:
        run = jax.jit(lambda c, ks: jax.lax.scan(step, c, ks), donate_argnums=0)
        compiled = run.lower(cache, keys[1:]).compile()
        jax.block_until_ready(cache)
        start = time.perf_counter()
        cache, outs = compiled(cache, keys[1:])
        jax.block_until_ready((cache, outs))
        last = outs[-1]
    else:
        run = jax.jit(step, donate_argnums=0)
        cache, last = run(cache, keys[0])               # compile + warm-up
        jax.block_until_ready((cache, last))
        start = time.perf_counter()
        for i in range(1, args.steps + 1):
            cache, last = run(cache, keys[i])
        jax.block_until_ready((cache, last))
    elapsed = time.perf_counter() - start

    last = np.asarray(last, np.float32)
    assert np.all(np.isfinite(last)), "non-finite decode output"
    lengths = np.asarray(cache.seqlens)
    print(f"device {jax.devices()[0].device_kind} | implementation {args.implementation or 'default'} | "
          f"{'lax.scan' if args.scan else 'python loop, donated jit step'}")
    print(f"B {args.batch}, H {args.heads}, {args.dtype}, page {args.page_size}, cache lengths "
          f"{lengths.min()}..{lengths.max()} of {capacity}")
    print(f"{args.steps} steps in {elapsed:.3f} s: {elapsed / args.steps * 1e3:.3f} ms/step, "
          f"{args.batch * args.steps / elapsed:,.0f} tokens/s")


if __name__ == "__main__":
    main()
