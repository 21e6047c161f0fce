"""Model-step benchmark: the decode step of a stack of MLA layers, scanned over layers with one stacked latent
cache, donated and jitted (rows M1 and M2).

    python benchmarks/benchmark_model.py                          # M1, M2-H128, M2-H16 at B 64 and 128
    python benchmarks/benchmark_model.py --models M1 --batches 64 # a subset
    python benchmarks/benchmark_model.py --smoke                  # tiny sizes (CPU: xla and plain jnp only)
    python benchmarks/benchmark_model.py --parts model --compile default step gemm-any-off unrolled

Two parts, each one decode step (one new token per sequence, every layer), the cache at --context tokens:
- "attention": per layer, append the new latent and run absorbed decode attention (no projections: q and
  the latent are given). Forms: `scan` (lax.scan over layers, the stacked cache read in place through
  `layer=`), `separate` (the same layers over L separate cache buffers, unrolled in one jit: what the
  kernel costs alone), `xla` (scan, implementation="xla") and `jnp` (scan, the plain-jnp einsum attention
  of common.plain_jnp_decode over the layer's slice of the stacked cache). Compiled with XLA's defaults.
  Target: scan's per-layer time within 10% of separate's.
- "model": the whole MLA layer, projections included (`flashmla_jax.flax.mla_attention`: q LoRA, kv LoRA,
  RoPE, absorption, output projection; no MLP, no MoE, no embedding), with stacked random parameters and a
  residual, scanned over layers. Forms: `triton`, `xla` and `jnp` (the same layer with the plain-jnp
  attention), each compiled every way named by --compile (default: `default` and `step`), so that the
  baselines run under the same options as triton and under XLA's defaults:
    default            jax.jit as it is
    step               flashmla_jax.scanned_step.SCANNED_STEP_COMPILER_OPTIONS (Triton GEMMs off: cuBLAS)
    step-dsf           step + xla_gpu_enable_dynamic_slice_fusion (cuBLAS GEMMs fold the slice in, if the
                       default leaves that off)
    gemm-any-off       xla_gpu_triton_gemm_any=False: Triton GEMMs only where they fuse a producer or
                       consumer (a convert, a transpose), the pure GEMMs on cuBLAS
    gemm-any-off-dsf   gemm-any-off + dynamic-slice fusion
    unrolled           default options, the layer scan unrolled (static slices of the parameters, which
                       XLA's Triton GEMM fusion takes in; compile time grows with the layers)
  Target: triton's tokens/s at least 2x jnp's at D1-like sizes.

Per form: wall ms per step, synced every step like a sampling loop (the host waits for each step); GPU ms
per step from CUPTI's kernel records (all kernels; the attention kernels' share, names containing
"mla_decode"; the GEMM kernels' share, names containing "gemm" or "nvjet"); the gap wall - kernel GPU time,
which holds what CUPTI's kernel records do not: XLA's device-to-device copies (an async memcpy is no kernel;
jax's CUPTI hook records kernels only), launch gaps and the host's sync; and, from the compiled HLO
(flashmla_jax.scanned_step.stack_slices), the buffers holding one layer's slice of a weight stack or of the
cache, with the MB they copy per step. tokens/s = B / wall. Writes benchmarks/results/model_<device>.json
(rewritten after every row, so a run stopped early keeps its rows) and a PNG beside it; --dump-hlo DIR also
writes each compiled model step's HLO text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import common  # first: it puts this checkout's flashmla_jax on the path
import jax
import jax.numpy as jnp

from flashmla_jax import LatentCache
from flashmla_jax import flax as fmx
from flashmla_jax._backend import has_cuda_gpu
from flashmla_jax.scanned_step import SCANNED_STEP_COMPILER_OPTIONS, stack_slices

D, D_V = 576, 512


@dataclasses.dataclass(frozen=True)
class ModelDims:
    name: str
    layers: int
    hidden: int
    heads: int
    q_lora_rank: int | None

    def config(self) -> fmx.MLAConfig:
        return fmx.MLAConfig(hidden_size=self.hidden, num_heads=self.heads, q_lora_rank=self.q_lora_rank)

    def reduced(self) -> "ModelDims":
        return dataclasses.replace(self, layers=3, hidden=256, heads=min(self.heads, 4),
                                   q_lora_rank=self.q_lora_rank and 64)


MODELS = {
    "M1": ModelDims("M1", 27, 2048, 16, None),            # DeepSeek-V2-Lite
    "M2-H128": ModelDims("M2-H128", 61, 7168, 128, 1536),  # DeepSeek-V3 attention
    "M2-H16": ModelDims("M2-H16", 61, 7168, 16, 1536),     # DeepSeek-V3 attention, 16 heads as at TP 8
}
STEPS = 12            # timed steps per form (each appends one token per layer)


def random_stack(key, layers: int, shape: tuple, dtype) -> jax.Array:
    """[layers, *shape] normal values, made one layer at a time (no float32 copy of the whole stack)."""
    return jax.lax.map(lambda k: jax.random.normal(k, shape, jnp.float32).astype(dtype),
                       jax.random.split(key, layers))


def filled_cache(dims: ModelDims, batch: int, context: int, dtype, separate: bool):
    """A stacked cache (or a tuple of per-layer caches) holding context - STEPS - 1 random tokens per
    sequence, so that the timed steps end at `context`."""
    length = context - STEPS - 1
    seqlens = jnp.full((dims.layers, batch), length, jnp.int32)
    if separate:
        # One buffer at a time: slicing a stack would hold both (M2 at B 128 ran out of memory that way).
        layer = jax.jit(lambda k: jax.random.normal(k, (batch, context, D), jnp.float32).astype(dtype))
        return tuple(LatentCache(layer(k), seqlens[i], None, None, context)
                     for i, k in enumerate(jax.random.split(jax.random.PRNGKey(0), dims.layers)))
    kv = jax.jit(random_stack, static_argnums=(1, 2, 3))(jax.random.PRNGKey(0), dims.layers, (batch, context, D),
                                                          dtype)
    return LatentCache(kv, seqlens, None, None, context, dims.layers)


# ---------------------------------------------------------------- the attention step (no projections)


def attention_step(form: str, scale: float):
    """step(cache, q [L, B, 1, H, D], x [L, B, 1, D]) -> (cache, out [L, B, 1, H, D_V]), jitted and donated."""

    def attend(cache, i, q):
        if form == "jnp":
            kv = jax.lax.dynamic_index_in_dim(cache.kv, i, 0, keepdims=False)
            return common.plain_jnp_decode(q, kv, cache.lengths(i), scale)
        return cache.decode(q, layer=i, softmax_scale=scale, implementation="xla" if form == "xla" else "triton")

    def scanned(cache, qs, xs):
        def layer(cache, inputs):
            i, q, x = inputs
            cache = cache.append(x, layer=i)
            return cache, attend(cache, i, q)
        return jax.lax.scan(layer, cache, (jnp.arange(qs.shape[0]), qs, xs))

    def unrolled(caches, qs, xs):
        caches, outs = list(caches), []
        for i in range(qs.shape[0]):
            caches[i] = caches[i].append(xs[i])
            outs.append(caches[i].decode(qs[i], softmax_scale=scale, implementation="triton"))
        return tuple(caches), jnp.stack(outs)

    return jax.jit(unrolled if form == "separate" else scanned, donate_argnums=0)


# ---------------------------------------------------------------- the model step (projections included)

# The ways --compile names: (XLA compiler options for the step's executable, layer scan unrolled).
_DSF = {"xla_gpu_enable_dynamic_slice_fusion": True}
_GEMM_ANY_OFF = {"xla_gpu_triton_gemm_any": False}
# CUDA graphs for the loop too (WHILE, CONDITIONAL), from sequences of one command up: launch gaps and the host's
# per-layer work out of the step, where the commands allow (a custom call that is not graph-safe ends a graph).
_GRAPHS = {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,WHILE,CONDITIONAL",
           "xla_gpu_graph_min_graph_size": 1}
COMPILE_WAYS = {
    "default": ({}, False),
    "step": (dict(SCANNED_STEP_COMPILER_OPTIONS), False),
    "step-graphs": ({**SCANNED_STEP_COMPILER_OPTIONS, **_GRAPHS}, False),
    "step-dsf": ({**SCANNED_STEP_COMPILER_OPTIONS, **_DSF}, False),
    "gemm-any-off": (_GEMM_ANY_OFF, False),
    "gemm-any-off-dsf": ({**_GEMM_ANY_OFF, **_DSF}, False),
    "unrolled": ({}, True),
}
TOKENS_PER_S_BEFORE = {("M2-H128", 64): 1761}    # the H200's triton model step before the compile options


def model_step(form: str, config: fmx.MLAConfig, compile_way: str = "default"):
    """step(cache, params {name: [L, ...]}, x [B, 1, M]) -> (cache, y [B, 1, M]), jitted (compiled as
    COMPILE_WAYS[compile_way] says) and donated."""
    compiler_options, unroll = COMPILE_WAYS[compile_way]

    def layer_jnp(params, x, positions, cache, i):
        # mla_attention's absorbed path with the attention itself written as plain jnp.
        q_nope, q_pe = fmx.project_queries(params, x, positions, config)
        cache = cache.append(fmx.project_latent(params, x, positions, config).astype(cache.dtype), layer=i)
        w_uk, w_uv = fmx.split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
        q = fmx.absorb_query(q_nope, q_pe, w_uk).astype(cache.dtype)
        kv = jax.lax.dynamic_index_in_dim(cache.kv, i, 0, keepdims=False)
        o = common.plain_jnp_decode(q, kv, cache.lengths(i), config.softmax_scale, config.kv_lora_rank)
        o = fmx.absorb_output(o, w_uv)
        return jnp.einsum("bshv,hvm->bsm", o, params["wo"], preferred_element_type=jnp.float32).astype(x.dtype), cache

    def step(cache, params, x):
        positions = cache.lengths(0)[:, None]

        def layer(carry, inputs):
            h, cache = carry
            i, p = inputs
            if form == "jnp":
                y, cache = layer_jnp(p, h, positions, cache, i)
            else:
                y, cache = fmx.mla_attention(p, h, positions, cache, config=config, layer=i, implementation=form)
            return (h + y, cache), None

        (h, cache), _ = jax.lax.scan(layer, (x, cache), (jnp.arange(cache.num_layers), params), unroll=unroll)
        return cache, h

    return jax.jit(step, donate_argnums=0, compiler_options=compiler_options or None)


def slice_buffers(hlo: str, stacks: dict, per_step: int) -> tuple[dict[str, int], float]:
    """({stack: buffers holding one layer's slice of it}, MB those buffers take per step) from compiled HLO;
    per_step: how many times the module's layer body runs a step (the layers, or 1 when unrolled)."""
    found = stack_slices(hlo, stacks)
    counts: dict[str, int] = {}
    for s in found:
        counts[s.stack] = counts.get(s.stack, 0) + 1
    return counts, sum(s.nbytes for s in found) * per_step / 1e6


# ---------------------------------------------------------------- timing


def stepping(step, state, args):
    """run(): one step from the state the previous one left (the cache is donated, so each step must get the last
    one's), returning its output."""
    box = [state]

    def run():
        box[0], out = step(box[0], *args)
        return out

    return run


def kernel_summary(kernels: list[tuple[str, float]] | None) -> dict:
    """GPU ms of all kernels, of the attention kernels, of the GEMM kernels (cuBLAS and XLA's Triton GEMMs),
    and the ten longest kernels by name (summed over launches)."""
    if kernels is None:
        return dict(gpu_ms=None, attention_gpu_ms=None, gemm_gpu_ms=None, top_kernels=None)
    by_name: dict[str, float] = {}
    for name, ms in kernels:
        by_name[name] = by_name.get(name, 0.0) + ms
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:10]
    split = common.kernel_groups(kernels, dict(attention=("mla_decode",), gemm=("gemm", "nvjet")))
    return dict(gpu_ms=split["total"], attention_gpu_ms=split["attention"], gemm_gpu_ms=split["gemm"],
                top_kernels=[(n[:120], round(t, 4)) for n, t in top])


def run_form(part: str, form: str, dims: ModelDims, batch: int, context: int, dtype, inputs,
             compile_way: str = "default", dump_hlo: str | None = None) -> dict:
    scale = dims.config().softmax_scale
    if part == "attention":
        step = attention_step(form, scale)
        state = filled_cache(dims, batch, context, dtype, separate=form == "separate")
    else:
        step = model_step(form, dims.config(), compile_way)
        state = filled_cache(dims, batch, context, dtype, separate=False)
    t_compile = time.perf_counter()
    step = step.lower(state, *inputs).compile()
    t_compile = time.perf_counter() - t_compile
    if dump_hlo:
        os.makedirs(dump_hlo, exist_ok=True)
        with open(os.path.join(dump_hlo, f"{part}_{dims.name}_B{batch}_{form}_{compile_way}.hlo"), "w") as f:
            f.write(step.as_text())
    slices = {}
    if part == "model":
        hlo, per_step = step.as_text(), 1 if COMPILE_WAYS[compile_way][1] else dims.layers
        weights = {k: v for k, v in inputs[0].items() if v.ndim >= 3}
        slices["weight_slice_buffers"], slices["weight_slice_mb_per_step"] = slice_buffers(hlo, weights, per_step)
        slices["cache_slice_buffers"], slices["cache_slice_mb_per_step"] = slice_buffers(hlo, {"kv": state.kv},
                                                                                         per_step)
    # Each step waits for the previous one, as a sampling loop that reads its token on the host.
    run = stepping(step, state, inputs)
    del state
    wall = common.time_serial(run, repeats=STEPS - 2, warmup=1)
    kernels = common.gpu_kernel_times(run)
    del run
    k = kernel_summary(kernels)
    attn_ms = k["attention_gpu_ms"]
    return dict(part=part, form=form, model=dims.name, layers=dims.layers, hidden=dims.hidden, heads=dims.heads,
                batch=batch, context=context, compile=compile_way, compiler_options=COMPILE_WAYS[compile_way][0],
                unrolled=COMPILE_WAYS[compile_way][1], compile_s=t_compile, wall_ms=wall * 1e3,
                per_layer_wall_ms=wall * 1e3 / dims.layers, **k,
                wall_minus_kernel_ms=None if k["gpu_ms"] is None else wall * 1e3 - k["gpu_ms"],
                per_layer_attention_gpu_ms=None if attn_ms is None else attn_ms / dims.layers,
                tokens_per_s=batch / wall, **slices)


def row_key(r: dict) -> tuple:
    """What a row measures; rows from before --compile were all compiled the default way."""
    return r["part"], r["model"], r["batch"], r["form"], r.get("compile", "default")


def plot(results: list[dict], path: str) -> None:
    panels = []
    for part, key, label in (("attention", "per_layer_wall_ms", "ms per layer (wall)"),
                             ("model", "tokens_per_s", "tokens/s")):
        values = {(f"{r['model']} B{r['batch']}", bar_label(r)): r[key] for r in results if r["part"] == part}
        panels.append(common.BarPanel(f"{part} step on {common.device_name()}", label, values))
    common.plot_bars(panels, path)


def bar_label(r: dict) -> str:
    way = r.get("compile", "default")
    return r["form"] if way == "default" else f"{r['form']} ({way})"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="*", type=int, default=[64, 128])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--parts", nargs="*", default=["attention", "model"], choices=["attention", "model"])
    parser.add_argument("--compile", nargs="*", default=["default", "step"], choices=list(COMPILE_WAYS),
                        help="ways to compile the model part's step, every form each way (see the docstring)")
    parser.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled step's HLO text there")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (3 layers, B 2, 256 tokens)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an earlier run's JSON that this run does not measure again")
    args = parser.parse_args(argv)
    gpu = has_cuda_gpu()
    dtype = jnp.bfloat16 if gpu else jnp.float32
    models = [MODELS[m] for m in args.models]
    batches, context = args.batches, args.context
    if args.smoke or not gpu:
        models, batches, context = [m.reduced() for m in models], [2], 256
    forms = dict(attention=["scan", "separate", "xla", "jnp"] if gpu else ["xla", "jnp"],
                 model=["triton", "xla", "jnp"] if gpu else ["xla", "jnp"])
    ways = dict(attention=["default"], model=args.compile)
    path = os.path.join(common.RESULTS_DIR, f"model_{common.device_slug()}.json")
    earlier = []
    if args.merge and os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)["results"]
    meta = dict(device=common.device_name(), reduced_sizes=bool(args.smoke or not gpu), jax=jax.__version__,
                dtype=jnp.dtype(dtype).name, steps=STEPS, projections_in_model_part=True,
                compile_ways={k: dict(compiler_options=v[0], unrolled=v[1]) for k, v in COMPILE_WAYS.items()})

    def rows(fresh: list[dict]) -> list[dict]:
        keys = {row_key(r) for r in fresh}
        return [r for r in earlier if row_key(r) not in keys] + fresh

    results = []
    for dims in models:
        for batch in batches:
            key = jax.random.PRNGKey(1)
            for part in args.parts:
                if part == "attention":
                    inputs = (random_stack(key, dims.layers, (batch, 1, dims.heads, D), dtype),
                              random_stack(jax.random.fold_in(key, 1), dims.layers, (batch, 1, D), dtype))
                else:
                    # lax.map, not vmap: init_params draws float32, and all 61 layers of that at once
                    # would not fit beside the cache.
                    params = jax.jit(lambda ks: jax.lax.map(lambda k: fmx.init_params(dims.config(), k, dtype), ks))(
                        jax.random.split(key, dims.layers))
                    inputs = (params, jax.random.normal(key, (batch, 1, dims.hidden), jnp.float32).astype(dtype))
                for way in ways[part]:
                    for form in forms[part]:
                        try:
                            r = run_form(part, form, dims, batch, context, dtype, inputs, way, args.dump_hlo)
                        except Exception as e:  # noqa: BLE001 - e.g. out of memory: record it, keep the other rows
                            print(f"{part} {dims.name} B{batch} {form} [{way}]: {type(e).__name__}: {str(e)[:200]}",
                                  flush=True)
                            continue
                        results.append(r)
                        print(report_line(r), flush=True)
                        # Written after every row, so that a run stopped early keeps what it measured.
                        common.write_json("model", dict(meta, results=rows(results), summary=summarize(rows(results))))
                del inputs
    results = rows(results)
    summary = summarize(results)
    for line in summary:
        print(line)
    path = common.write_json("model", dict(meta, results=results, summary=summary))
    plot(results, path.replace(".json", ".png"))
    print(f"wrote {path} and its .png")


def report_line(r: dict) -> str:
    """One printed line per form; the kernel times (CUPTI) only where there are some (a GPU)."""
    line = (f"{r['part']:9} {r['model']:8} B{r['batch']:<4} {r['form']:9} {r['compile']:16} wall {r['wall_ms']:8.3f} ms "
            f"({r['per_layer_wall_ms']:.4f} ms/layer)")
    if r["gpu_ms"] is not None:
        line += (f"  kernels {r['gpu_ms']:8.3f} ms (attention {r['attention_gpu_ms']:.3f}, gemm {r['gemm_gpu_ms']:.3f})"
                 f"  wall-kernels {r['wall_minus_kernel_ms']:7.3f} ms")
    line += f"  {r['tokens_per_s']:10.0f} tokens/s"
    if r["part"] == "model":
        line += (f"  HLO slice buffers: weights {sum(r['weight_slice_buffers'].values())} "
                 f"({r['weight_slice_mb_per_step']:.0f} MB/step), cache {sum(r['cache_slice_buffers'].values())}")
    return line


def summarize(results: list[dict]) -> list[str]:
    """The targets, per (model, batch): scan vs separate per-layer wall time; per way of compiling, triton's
    wall time against its kernel time and its tokens/s against jnp's, compiled the same way and the default
    way."""
    lines = []
    by = {row_key(r): r for r in results}
    for (part, model, batch, form, way), r in by.items():
        if part == "attention" and form == "scan" and ("attention", model, batch, "separate", way) in by:
            sep = by[("attention", model, batch, "separate", way)]
            lines.append(f"{model} B{batch}: scanned/stacked {r['per_layer_wall_ms']:.4f} ms/layer vs separate "
                         f"buffers {sep['per_layer_wall_ms']:.4f} ({100 * (r['wall_ms'] / sep['wall_ms'] - 1):+.1f}%, "
                         f"target within 10%)")
        if part != "model" or form != "triton":
            continue
        if r["gpu_ms"]:
            target = "<= 1.05x" if model == "M2-H128" else "within 5%"
            lines.append(f"{model} B{batch} [{way}]: triton wall {r['wall_ms']:.2f} ms vs kernels {r['gpu_ms']:.2f} "
                         f"ms ({r['wall_ms'] / r['gpu_ms']:.3f}x, target {target}; HLO weight-slice copies "
                         f"{r.get('weight_slice_mb_per_step', float('nan')):.0f} MB/step)")
        if (model, batch) in TOKENS_PER_S_BEFORE:
            before = TOKENS_PER_S_BEFORE[(model, batch)]
            lines.append(f"{model} B{batch} [{way}]: triton {r['tokens_per_s']:.0f} tokens/s, {r['tokens_per_s'] / before:.2f}x "
                         f"the {before} of the default compile on the H200 (target >= 1.3x)")
        for base_way in dict.fromkeys((way, "default")):
            jnp_r = by.get(("model", model, batch, "jnp", base_way))
            if jnp_r is not None:
                lines.append(f"{model} B{batch} [{way}]: model step {r['tokens_per_s']:.0f} tokens/s vs plain jnp "
                             f"[{base_way}] {jnp_r['tokens_per_s']:.0f} "
                             f"({r['tokens_per_s'] / jnp_r['tokens_per_s']:.2f}x, target >= 2x)")
    return lines


if __name__ == "__main__":
    main()
