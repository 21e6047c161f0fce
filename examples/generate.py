"""Greedy generation with a small random-weight DeepSeek-like decoder built from the package's MLA layer.

Each block is RMSNorm -> MultiHeadLatentAttention -> RMSNorm -> SwiGLU MLP, with DeepSeek's latent dims
(kv_lora_rank 512, qk_nope 128, qk_rope 64, v 128). The blocks are one stack of parameters scanned over
layers (`nnx.vmap` to build, `nnx.scan` to run, as large JAX models are written) and the latent cache is one
layer-stacked `LatentCache` that every layer reads in place. The prompt is prefilled in one jitted call
(non-absorbed attention through `mla_prefill`, its latents appended to the cache); then all N tokens are
decoded greedily inside one jitted `lax.scan` (absorbed attention through `mla_decode`). The weights are
random, so the text is meaningless: this measures speed (warm executions; the first execution of each
kernel set is reported apart as start-up cost), the cache's size against the K/V cache an MHA model of the
same shape would need, and checks the cached decode against a cache-free recompute.

Both jitted calls scan the blocks over stacked weights, so both are compiled by
`flashmla_jax.scanned_step.jit_scanned_step`: XLA's default GPU compile copies every layer's weights out of
the stacks on every call (its Triton GEMMs do not read a slice in place); the compiler options give the GEMMs
to cuBLAS, which does (the CPU ignores them). `--compile default` compiles with plain jax.jit, for
comparison; the example prints how many weight-slice buffers each compiled call holds. The weights are
stored in the activations' dtype (as a bf16 checkpoint is): float32 weights would be converted, slice by
slice, on every call, which the compiler options do not avoid.

    python examples/generate.py                                    # CPU (xla): 2 layers, 64 tokens
    python examples/generate.py --layers 4 --batch 16 --tokens 256 # GPU (triton kernels, bf16, paged cache)
    python examples/generate.py --kv-format fp8_blockscale         # an FP8 latent cache (656 bytes a token)

With --kv-format the cache stores FP8 latents (flashmla_jax/fp8.py) and the example also reports how far the
FP8-cache generation's logits are from the bf16-cache model's on the same tokens. "fp8_pertensor" needs one
scale per layer chosen up front: here amax / 448 of the prompt's latents (a bf16-cache prefill), times 2 as
headroom for the tokens generated later.

Start-up: the first execution of a Triton kernel has the driver compile its PTX and load the module. The
driver keeps what it compiled in CUDA's compute cache (CUDA_CACHE_PATH, ~/.nv/ComputeCache by default), so a
second process pays only the module load; `--compilation-cache DIR` also keeps XLA's executables (JAX's
persistent compilation cache) across processes.
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

import flashmla_jax as fm
from flashmla_jax._extras import require
from flashmla_jax._backend import has_cuda_gpu
from flashmla_jax.flax import MultiHeadLatentAttention
from flashmla_jax.fp8 import E4M3_MAX, FP8_FORMATS, bytes_per_token
from flashmla_jax.scanned_step import jit_scanned_step, stack_slices

nnx = require("flax.nnx", "examples/generate.py")


def parse_args(argv=None):
    gpu = has_cuda_gpu()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder blocks")
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per sequence (N)")
    p.add_argument("--batch", type=int, default=2, help="sequences generated together (B)")
    p.add_argument("--prompt", type=int, default=32, help="prompt length")
    p.add_argument("--heads", type=int, default=16, help="attention heads (16 = DeepSeek-V3 per GPU at TP 8)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--q-lora-rank", type=int, default=None, help="query LoRA rank (default: none, V2-Lite style)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--page-size", type=int, default=64 if gpu else 0, help="cache page size; 0 = contiguous")
    p.add_argument("--dtype", default="bfloat16" if gpu else "float32", choices=["bfloat16", "float16", "float32"],
                   help="activations and cache (default: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--implementation", default=None, choices=["triton", "xla", "interpret"],
                   help="attention ops; default: triton on a CUDA GPU, else xla")
    p.add_argument("--kv-format", default="none", choices=["none", *FP8_FORMATS],
                   help="latent cache format: none (the activations' dtype) or an FP8 format")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", default="step", choices=["step", "default"],
                   help="step: jit_scanned_step (SCANNED_STEP_COMPILER_OPTIONS); default: plain jax.jit")
    p.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="JAX's persistent compilation cache directory (kept across processes)")
    args = p.parse_args(argv)
    for name in ("layers", "tokens", "batch", "prompt", "heads", "hidden", "vocab"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


# ---------------------------------------------------------------- the model

class RMSNorm(nnx.Module):
    def __init__(self, dim: int):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x):
        """x [..., dim] -> [..., dim] in x's dtype (statistics in float32)."""
        x32 = x.astype(jnp.float32)
        return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6) * self.weight[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    def __init__(self, dim: int, inner: int, dtype, rngs: nnx.Rngs):
        make = functools.partial(nnx.Linear, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.gate, self.up, self.down = make(dim, inner), make(dim, inner), make(inner, dim)

    def __call__(self, x):
        """x [B, S, dim] -> [B, S, dim]."""
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, args, dtype, rngs: nnx.Rngs):
        self.attn_norm, self.mlp_norm = RMSNorm(args.hidden), RMSNorm(args.hidden)
        self.attn = MultiHeadLatentAttention(args.hidden, args.heads, q_lora_rank=args.q_lora_rank, dtype=dtype,
                                             param_dtype=dtype, implementation=args.implementation, rngs=rngs)
        self.mlp = SwiGLU(args.hidden, 2 * args.hidden, dtype, rngs)



class Decoder(nnx.Module):
    def __init__(self, args, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(args.vocab, args.hidden, dtype=dtype, param_dtype=dtype, rngs=rngs)

        @nnx.split_rngs(splits=args.layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return Block(args, dtype, rngs)

        self.blocks = blocks(rngs)          # one Block whose parameters carry a leading [layers] axis
        self.norm = RMSNorm(args.hidden)
        self.head = nnx.Linear(args.hidden, args.vocab, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)

    def __call__(self, tokens, positions, cache=None, cache_empty=False):
        """tokens [B, S] int32, positions [B, S], cache None or a layer-stacked LatentCache ->
        (logits [B, S, vocab] float32, the cache with S more tokens in every layer)."""

        # A lax.scan over the blocks' stacked state (nnx.scan does the same, but refuses modules merged
        # outside an enclosing lax.scan, as the decode loop below has them).
        block_def, block_state = nnx.split(self.blocks)

        def run(carry, layer_state):
            h, cache, layer = carry
            block = nnx.merge(block_def, layer_state)
            a, cache = block.attn(block.attn_norm(h), positions, cache, cache_empty=cache_empty,
                                  layer=None if cache is None else layer)
            h = h + a
            return (h + block.mlp(block.mlp_norm(h)), cache, layer + 1), None

        (h, cache, _), _ = jax.lax.scan(run, (self.embed(tokens), cache, jnp.int32(0)), block_state)
        return self.head(self.norm(h)).astype(jnp.float32), cache


# ---------------------------------------------------------------- generation

def make_generate(graphdef, num_tokens: int, donate: bool, jit=jit_scanned_step):
    """Jitted prefill(state, prompt, cache) and decode(state, first, cache) -> (tokens [B, N], logits, cache);
    `jit` compiles them (jit_scanned_step, or jax.jit)."""

    @jit
    def prefill(state, prompt, cache):
        model = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
        logits, cache = model(prompt, positions, cache, cache_empty=True)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), logits[:, -1], cache

    @functools.partial(jit, donate_argnums=(2,) if donate else ())
    def decode(state, first, cache):
        model = nnx.merge(graphdef, state)

        def step(carry, _):
            token, cache = carry
            positions = cache.lengths(0)[:, None]            # the new token's position = tokens cached so far
            logits, cache = model(token[:, None], positions, cache)
            nxt = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return (nxt, cache), (token, logits[:, 0])

        (_, cache), (tokens, logits) = jax.lax.scan(step, (first, cache), None, length=num_tokens)
        return tokens.T, jnp.swapaxes(logits, 0, 1), cache          # [B, N], [B, N, vocab]

    return prefill, decode


def timed(fn, *args):
    """(outputs, seconds) of one call, waited for."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def attention_kernel_ms(prefill, decode, state, prompt, empty_cache) -> dict[str, float] | None:
    """GPU ms of the mla_decode and mla_prefill kernels in one generation (CUPTI); None without a GPU."""
    if jax.devices()[0].platform != "gpu":
        return None
    from jax.experimental.mosaic.gpu import profiler

    generate = jax.jit(lambda state, prompt: decode(state, *prefill(state, prompt, empty_cache())[::2]))
    _, kernels = profiler.measure(generate, aggregate=False)(state, prompt)
    return {name: sum(t for k, t in kernels or [] if name in k) for name in ("mla_decode", "mla_prefill")}


def cache_report(args, capacity: int, dtype, kv_format: str | None) -> list[str]:
    """Latent cache bytes vs an MHA K/V cache of the same model (K: H x 192, V: H x 128 per token and layer,
    in the activations' dtype)."""
    tokens = args.layers * args.batch * capacity
    per_token = bytes_per_token(kv_format, dtype)
    latent = tokens * per_token
    mha = tokens * args.heads * (128 + 64 + 128) * dtype.itemsize
    v3 = 128 * (128 + 64 + 128)
    return [f"cache: {args.layers} layers x {args.batch} seqs x {capacity} tokens, {per_token} bytes / token / layer "
            f"({kv_format or 'no FP8'}; bf16: {bytes_per_token(None)})",
            f"  latent ({per_token:4d} B / token / layer) {latent / 2**20:10.2f} MiB",
            f"  MHA K+V ({args.heads} heads x 320)       {mha / 2**20:10.2f} MiB",
            f"  saved: {100 * (1 - latent / mha):.1f}% ({mha / latent:.1f}x smaller); at DeepSeek-V3's 128 heads: "
            f"{100 * (1 - 576 / v3):.1f}% ({v3 / 576:.0f}x)"]


def main(argv=None):
    args = parse_args(argv)
    if args.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    dtype = jnp.dtype(args.dtype)
    impl = args.implementation or ("triton" if has_cuda_gpu() else "xla")
    args.implementation = impl
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), implementation={impl}, "
          f"dtype={dtype.name}, page_size={args.page_size or 'contiguous'}, {args.layers} layers scanned")

    model = Decoder(args, dtype, nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    capacity = args.prompt + args.tokens
    jit = jit_scanned_step if args.compile == "step" else jax.jit
    prefill, decode = make_generate(graphdef, args.tokens, donate=jax.default_backend() != "cpu", jit=jit)

    kv_format = None if args.kv_format == "none" else args.kv_format

    scales = None                        # fp8_pertensor: one per layer, calibrated below

    def empty_cache(kv_format=kv_format, cache_dtype=dtype):
        return fm.LatentCache.create(args.batch, capacity, dim=576, dtype=cache_dtype, page_size=args.page_size or None,
                                     num_layers=args.layers, kv_format=kv_format,
                                     kv_scale=scales if kv_format == "fp8_pertensor" else None)

    prompt = jnp.asarray(np.random.default_rng(args.seed).integers(0, args.vocab, (args.batch, args.prompt)),
                         jnp.int32)
    if kv_format == "fp8_pertensor":     # calibrated on the prompt: amax / 448 per layer, 2x headroom
        bf16 = prefill(state, prompt, empty_cache(None, cache_dtype=jnp.bfloat16))[2].kv
        amax = jnp.max(jnp.abs(bf16.astype(jnp.float32)).reshape(args.layers, -1), axis=1)
        scales = 2 * amax / E4M3_MAX
        print(f"fp8_pertensor scales (per layer, amax / 448 of the prompt's latents x 2): "
              f"{np.asarray(scales).round(5).tolist()}")

    # Compile ahead of time, so the timings below are execution only.
    t0 = time.perf_counter()
    prefill_c = prefill.lower(state, prompt, empty_cache()).compile()
    first, _, cache_sd = jax.eval_shape(prefill, state, prompt, empty_cache())
    decode_c = decode.lower(state, first, cache_sd).compile()
    print(f"compiled prefill + {args.tokens}-step decode scan in {time.perf_counter() - t0:.1f} s "
          f"({args.compile} compiler options)")
    weights = {"/".join(str(getattr(k, "key", k)) for k in path): leaf
               for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model.blocks, nnx.Param))
               if leaf.ndim >= 3}                 # the blocks' stacked matrices [layers, ...]
    print("weight-slice buffers in the compiled HLO (each copies one layer's matrix whenever the layer runs): "
          f"prefill {len(stack_slices(prefill_c.as_text(), weights))}, "
          f"decode {len(stack_slices(decode_c.as_text(), weights))}")

    # The first execution of each kernel set (start-up), then warm executions (the speed).
    (first, first_logits, cache), cold_prefill = timed(prefill_c, state, prompt, empty_cache())
    (tokens, logits, cache), cold_decode = timed(decode_c, state, first, cache)
    (first, first_logits, cache), t_prefill = timed(prefill_c, state, prompt, empty_cache())
    (tokens, logits, cache), t_decode = timed(decode_c, state, first, cache)

    print(f"prefill: {args.batch} x {args.prompt} tokens in {1e3 * t_prefill:.1f} ms "
          f"({args.batch * args.prompt / t_prefill:,.0f} tokens/s)")
    print(f"decode:  {args.batch} x {args.tokens} tokens in {1e3 * t_decode:.1f} ms "
          f"({args.batch * args.tokens / t_decode:,.0f} tokens/s, {1e3 * t_decode / args.tokens:.2f} ms/step)")
    print(f"start-up (first execution less a warm one): prefill {1e3 * (cold_prefill - t_prefill):.1f} ms, "
          f"decode {1e3 * (cold_decode - t_decode):.1f} ms")
    kernel_ms = attention_kernel_ms(prefill, decode, state, prompt, empty_cache)
    if kernel_ms is not None:
        print(f"attention kernels (CUPTI): decode {1e3 * kernel_ms['mla_decode'] / (args.tokens * args.layers):.1f} "
              f"us per layer and step, prefill {kernel_ms['mla_prefill'] / args.layers:.3f} ms per layer")
    print(f"sequence 0, first tokens: {np.asarray(tokens[0, :16]).tolist()}")
    for line in cache_report(args, capacity, dtype, kv_format):
        print(line)
    print(f"  this cache's buffer: {cache.kv.nbytes / 2**20:.2f} MiB ({cache.kv.dtype}, shape {cache.kv.shape})")

    # Check: one cache-free forward over prompt + generated tokens gives the logits that chose each token.
    full = jnp.concatenate([prompt, tokens], axis=1)
    positions = jnp.broadcast_to(jnp.arange(full.shape[1], dtype=jnp.int32), full.shape)
    ref, _ = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p))(state, full, positions)
    cached = jnp.concatenate([first_logits[:, None], logits[:, :-1]], axis=1)   # the logits that chose tokens
    ref = ref[:, args.prompt - 1:-1]
    err = float(jnp.linalg.norm(cached - ref) / jnp.linalg.norm(ref))
    agree = float(jnp.mean(jnp.argmax(ref, -1) == tokens))
    expected = "~1e-6 in float32" if dtype == jnp.float32 else "~1e-2 in 16-bit, where near-ties may flip"
    expected = expected if kv_format is None else "the FP8 cache's rounding: see below"
    print(f"check vs cache-free recompute: logits rel err {err:.2e}, greedy choices agree {100 * agree:.1f}% "
          f"({expected})")
    if kv_format is not None:
        # The same tokens through a bf16 cache (teacher-forced: the prompt and the generated tokens in one
        # prefill, whose latents are rounded to bf16 as such a cache stores them).
        forced = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s)(t, p, c, cache_empty=True)[0])
        ref = forced(state, full, positions, empty_cache(None, jnp.bfloat16))[:, args.prompt - 1:-1]
        err = float(jnp.linalg.norm(cached - ref) / jnp.linalg.norm(ref))
        agree = float(jnp.mean(jnp.argmax(ref, -1) == tokens))
        print(f"{kv_format} cache vs a bf16 cache on the same tokens: logits rel err {err:.2e}, greedy choices "
              f"agree {100 * agree:.1f}%")


if __name__ == "__main__":
    main()
