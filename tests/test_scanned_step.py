"""A model step scanned over stacked weights: per-executable compiler options and the HLO check for copied
weight slices (flashmla_jax/scanned_step.py)."""
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _util import rel_err
from flashmla_jax import LatentCache
from flashmla_jax import flax as fmx
from flashmla_jax import scanned_step as scanned_step_module
from flashmla_jax.scanned_step import SCANNED_STEP_COMPILER_OPTIONS, jit_scanned_step, stack_slices

PROJECTIONS = ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo")


def model_inputs(config, layers, b, n, dtype, seed=0):
    """(stacked cache holding n // 2 random tokens per sequence, stacked params {name: [L, ...]}, x [B, 1, M])."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = jax.vmap(lambda k: fmx.init_params(config, k, dtype))(jax.random.split(keys[0], layers))
    cache = LatentCache.create(b, n, dim=config.latent_dim, dtype=dtype, num_layers=layers)
    for i in range(layers):
        cache = cache.append(jax.random.normal(jax.random.fold_in(keys[1], i), (b, n // 2, config.latent_dim),
                                               dtype), layer=i)
    return cache, params, jax.random.normal(keys[2], (b, 1, config.hidden_size), dtype)


def scanned_step(config, implementation):
    """step(cache, params {name: [L, ...]}, x [B, 1, M]) -> (cache, y): one decode step of L layers scanned over
    the stacked weights and cache, as benchmarks/benchmark_model.py's model step."""
    def step(cache, params, x):
        positions = cache.lengths(0)[:, None]

        def layer(carry, inputs):
            h, cache = carry
            i, p = inputs
            y, cache = fmx.mla_attention(p, h, positions, cache, config=config, layer=i,
                                         implementation=implementation)
            return (h + y, cache), None

        (h, cache), _ = jax.lax.scan(layer, (x, cache), (jnp.arange(cache.num_layers), params))
        return cache, h
    return step


def weight_stacks(params):
    """The projection weights' stacks (the norms' [L, C] stacks are left out: their slices fuse into the norm)."""
    return {k: v for k, v in params.items() if k in PROJECTIONS}


SMALL = fmx.MLAConfig(hidden_size=96, num_heads=2, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16)


# ---------------------------------------------------------------- compiler options, one executable at a time


def test_scanned_step_options_are_xla_debug_options():
    """Each option is a DebugOptions field XLA applies to the executable being compiled: a value of the wrong
    type is refused naming the field, a misspelt field is refused as unknown (the CPU compile parses them
    as the GPU's does)."""
    f = jax.jit(lambda x: x @ x)
    x = jnp.ones((8, 8))
    assert SCANNED_STEP_COMPILER_OPTIONS
    for name in SCANNED_STEP_COMPILER_OPTIONS:
        with pytest.raises(jax.errors.JaxRuntimeError, match=f"While setting option {name}"):
            f.lower(x).compile(compiler_options={name: "not-a-bool"})
        with pytest.raises(jax.errors.JaxRuntimeError, match="No such compile option"):
            f.lower(x).compile(compiler_options={name + "_misspelt": False})


# A CPU-visible option: with XLA's fusion pass off, a scanned layer's weight slice compiles to a lone
# `wrapped_dynamic-slice`; with it on, to a `dynamic-slice_bitcast_fusion`.
NO_FUSION = {"xla_disable_hlo_passes": "fusion"}


def scanned_matmul(scale):
    """f(w [L, 8, 8], x [2, 8]) -> x through L layers tanh(h @ w[i]) * scale, scanned."""
    return lambda w, x: jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi) * scale, None), x, w)[0]


def test_compiler_options_change_one_executable_only():
    """compiler_options change the executable they are given to and no other one compiled after it (nor
    XLA_FLAGS)."""
    w, x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8)), jnp.ones((2, 8))
    flags = os.environ.get("XLA_FLAGS")
    no_fusion = jax.jit(scanned_matmul(2.0), compiler_options=NO_FUSION).lower(w, x).compile()
    later = jax.jit(scanned_matmul(3.0)).lower(w, x).compile()     # another computation: compiled afresh
    assert "wrapped_dynamic-slice" in no_fusion.as_text()
    assert "wrapped_dynamic-slice" not in later.as_text() and "dynamic-slice_bitcast_fusion" in later.as_text()
    assert os.environ.get("XLA_FLAGS") == flags
    np.testing.assert_allclose(no_fusion(w, x), scanned_matmul(2.0)(w, x), rtol=1e-6)


def test_jit_scanned_step_equals_default_compile():
    """The CPU ignores the GPU options, so jit_scanned_step's executable computes what plain jax.jit's does,
    with the donation passed through."""
    cache, params, x = model_inputs(SMALL, 3, 2, 32, jnp.float32)
    step = scanned_step(SMALL, "xla")
    want_cache, want = jax.jit(step)(cache, params, x)
    got_cache, got = jit_scanned_step(step, donate_argnums=0)(jax.tree.map(jnp.copy, cache), params, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_cache.kv, want_cache.kv)


def test_jit_scanned_step_passes_its_options_and_the_callers(monkeypatch):
    """jit_scanned_step hands XLA its constant (a bad value put there is refused at compile), a caller's
    compiler_options beside it (the fusion pass turned off shows in the HLO), and the caller's value where
    both name an option."""
    w, x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8)), jnp.ones((2, 8))
    hlo = jit_scanned_step(scanned_matmul(2.0), compiler_options=NO_FUSION).lower(w, x).compile().as_text()
    assert "wrapped_dynamic-slice" in hlo
    name = next(iter(SCANNED_STEP_COMPILER_OPTIONS))
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"While setting option {name}"):
        jit_scanned_step(scanned_matmul(2.0), compiler_options={name: "not-a-bool"}).lower(w, x).compile()
    monkeypatch.setattr(scanned_step_module, "SCANNED_STEP_COMPILER_OPTIONS", {name: "not-a-bool"})
    with pytest.raises(jax.errors.JaxRuntimeError, match=f"While setting option {name}"):
        jit_scanned_step(scanned_matmul(2.0)).lower(w, x).compile()


# ---------------------------------------------------------------- the HLO check, tested on the CPU


def test_stack_slices_finds_the_cpu_copies_of_a_scanned_step():
    """The CPU compile of the scanned step copies the slices of the stacks that feed its plain 2-D dot
    kernels (wq_a, wkv_a: a `dynamic-slice_bitcast_fusion` each, in the while body) and fuses the other
    slices into their consumers: the check must list those copies, once per layer loop, with their bytes."""
    cache, params, x = model_inputs(SMALL, 3, 2, 32, jnp.float32)
    hlo = jax.jit(scanned_step(SMALL, "xla")).lower(cache, params, x).compile().as_text()
    found = stack_slices(hlo, weight_stacks(params))
    names = [s.stack for s in found]
    assert {"wq_a", "wkv_a"} <= set(names) <= set(PROJECTIONS) and len(names) == len(set(names)), found
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    for s in found:
        assert s.nbytes == params[s.stack][0].nbytes and s.opcode == "fusion" and "dynamic-slice" in s.instruction, s
        assert s.computation != entry, s                         # in the loop's body, not the entry computation


def test_stack_slices_is_silent_without_stacks():
    """The same layers unrolled over separate per-layer weights: no instruction makes a layer's slice, and
    the check, given the stacks' shapes, lists nothing (the step computes what the scanned one does)."""
    layers = 3
    cache, params, x = model_inputs(SMALL, layers, 2, 32, jnp.float32)
    per_layer = [{k: v[i] for k, v in params.items()} for i in range(layers)]

    def unrolled(cache, per_layer, x):
        positions, h = cache.lengths(0)[:, None], x
        for i, p in enumerate(per_layer):
            y, cache = fmx.mla_attention(p, h, positions, cache, config=SMALL, layer=i, implementation="xla")
            h = h + y
        return cache, h

    compiled = jax.jit(unrolled).lower(cache, per_layer, x).compile()
    assert stack_slices(compiled.as_text(), weight_stacks(params)) == []
    assert rel_err(compiled(cache, per_layer, x)[1], jax.jit(scanned_step(SMALL, "xla"))(cache, params, x)[1]) < 1e-5


# What XLA's GPU compiler prints for a scanned step (shapes of M2-H128's wq_a): an async copy of one layer's
# slice (fusion-start / fusion-done), a cuBLAS GEMM reading another stack's slice in place (the slice inside
# a dynamic-slice fusion), and names that only view a buffer.
GPU_STYLE_HLO = """\
HloModule jit_step, is_scheduled=true

%dynamic-slice-fusion (p0: bf16[61,7168,1536], p1: s32[]) -> bf16[1,7168,1536] {
  %p0 = bf16[61,7168,1536]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[1,7168,1536]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,7168,1536}, backend_config={"dynamic_slice_config":{"loop_index":"0","byte_offset":"0","byte_stride":"22020096"}}
}

%address_computation (p0.1: bf16[61,7168,576], p1.1: s32[], p2: bf16[64,7168]) -> bf16[64,576] {
  %p0.1 = bf16[61,7168,576]{2,1,0} parameter(0)
  %p1.1 = s32[] parameter(1)
  %p2 = bf16[64,7168]{1,0} parameter(2)
  %c1 = s32[] constant(0)
  %slice = bf16[1,7168,576]{2,1,0} dynamic-slice(%p0.1, %p1.1, %c1, %c1), dynamic_slice_sizes={1,7168,576}
  %view = bf16[7168,576]{1,0} bitcast(%slice)
  ROOT %gemm = bf16[64,576]{1,0} custom-call(%p2, %view), custom_call_target="__cublas$gemm"
}

%body (arg: (s32[], bf16[61,7168,1536], bf16[61,7168,576], bf16[64,7168])) -> (s32[], bf16[61,7168,1536], bf16[61,7168,576], bf16[64,7168]) {
  %arg = (s32[], bf16[61,7168,1536]{2,1,0}, bf16[61,7168,576]{2,1,0}, bf16[64,7168]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %wq_a = bf16[61,7168,1536]{2,1,0} get-tuple-element(%arg), index=1
  %wkv_a = bf16[61,7168,576]{2,1,0} get-tuple-element(%arg), index=2
  %x = bf16[64,7168]{1,0} get-tuple-element(%arg), index=3
  %fusion-start = ((bf16[61,7168,1536]{2,1,0}, s32[]), bf16[1,7168,1536]{2,1,0}, u32[]) fusion-start(%wq_a, %i), kind=kCustom, calls=%dynamic-slice-fusion
  %fusion-done = bf16[1,7168,1536]{2,1,0} fusion-done(%fusion-start)
  %wq_a_layer = bf16[7168,1536]{1,0} bitcast(%fusion-done)
  %latent = bf16[64,576]{1,0} fusion(%wkv_a, %i, %x), kind=kCustom, calls=%address_computation
  ROOT %out = (s32[], bf16[61,7168,1536]{2,1,0}, bf16[61,7168,576]{2,1,0}, bf16[64,7168]{1,0}) tuple(%i, %wq_a, %wkv_a, %x)
}

ENTRY %main (p: (s32[], bf16[61,7168,1536], bf16[61,7168,576], bf16[64,7168])) -> bf16[7168,576] {
  %p = (s32[], bf16[61,7168,1536]{2,1,0}, bf16[61,7168,576]{2,1,0}, bf16[64,7168]{1,0}) parameter(0)
  %w = (s32[], bf16[61,7168,1536]{2,1,0}, bf16[61,7168,576]{2,1,0}, bf16[64,7168]{1,0}) while(%p), condition=%cond, body=%body
  %stack = bf16[61,7168,576]{2,1,0} get-tuple-element(%w), index=2
  ROOT copy.9 = bf16[7168,576]{0,1} copy(%unused_name_without_percent)
}
"""


def test_stack_slices_reads_gpu_style_hlo():
    """On GPU-style HLO text: the async copy counts once (its fusion-done), a slice read in place inside a
    dynamic-slice fusion does not count, bitcasts and parameters do not, and a `copy` written without the
    `%` sigil (newer XLA prints names bare) does."""
    stacks = {"wq_a": jax.ShapeDtypeStruct((61, 7168, 1536), jnp.bfloat16),
              "wkv_a": jax.ShapeDtypeStruct((61, 7168, 576), jnp.bfloat16)}
    found = stack_slices(GPU_STYLE_HLO, stacks)
    assert [(s.stack, s.instruction, s.opcode, s.shape, s.computation) for s in found] == [
        ("wq_a", "fusion-done", "fusion-done", "bf16[1,7168,1536]", "body"),
        ("wkv_a", "copy.9", "copy", "bf16[7168,576]", "main")]
    assert found[0].nbytes == 7168 * 1536 * 2
    assert stack_slices(GPU_STYLE_HLO, {"wkv_a": stacks["wkv_a"]})[0].instruction == "copy.9"


def test_stack_slices_errors():
    stack = jnp.zeros((2, 4, 4))
    with pytest.raises(TypeError, match="hlo_text"):
        stack_slices(b"HloModule m", {"w": stack})
    with pytest.raises(TypeError, match="stacks must be a mapping"):
        stack_slices("", [stack])
    with pytest.raises(TypeError, match=r"stacks\['w'\]"):
        stack_slices("", {"w": [[1.0]]})
    with pytest.raises(ValueError, match=r"stacks\['w'\] must be stacked"):
        stack_slices("", {"w": jnp.zeros((4,))})


# ---------------------------------------------------------------- GPU: the compiled step reads its stacks in place

GPU_CONFIG = fmx.MLAConfig(hidden_size=2048, num_heads=16, q_lora_rank=512)


def gpu_step_hlo(jit):
    cache, params, x = model_inputs(GPU_CONFIG, 4, 64, 1024, jnp.bfloat16)
    step = jit(scanned_step(GPU_CONFIG, "triton"), donate_argnums=0)
    return step, step.lower(cache, params, x).compile().as_text(), (cache, params, x)


@pytest.mark.gpu
def test_gpu_scanned_step_reads_weight_stacks_in_place():
    """4 scanned MLA layers with projections (hidden 2048, H 16, q LoRA 512, bf16, B 64, 1K cache), triton,
    donated, compiled by jit_scanned_step: no instruction outside a fused computation makes a buffer of one
    layer's slice of any weight stack (wq_a, wq_b, wkv_a, wkv_b, wo: dims [1, *rest] or [*rest], any
    opcode but views: dynamic-slice, copy, fusion, fusion-done...) or of the stacked cache; and the step
    equals the xla implementation."""
    step, hlo, (cache, params, x) = gpu_step_hlo(jit_scanned_step)
    found = stack_slices(hlo, {**weight_stacks(params), "kv": cache.kv})
    assert not found, "\n".join(map(str, found))
    _, want = jax.jit(scanned_step(GPU_CONFIG, "xla"))(cache, params, x)
    _, got = step(jax.tree.map(jnp.copy, cache), params, x)
    assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
def test_gpu_default_compile_copies_weight_slices():
    """The same step under plain jax.jit: XLA's default GPU compile (Triton GEMMs) copies layer slices of the
    weight stacks (what SCANNED_STEP_COMPILER_OPTIONS is for; the check sees the copies in GPU HLO). If this
    fails, the default compile reads the stacks in place and the options are no longer needed."""
    _, hlo, (_, params, _) = gpu_step_hlo(jax.jit)
    found = stack_slices(hlo, weight_stacks(params))
    assert found and {s.stack for s in found} <= set(PROJECTIONS), hlo[-4000:]
