"""The FP8 latent caches, all of them: the byte layouts, quantize / dequantize in JAX, the device-side e4m3
decode and tile loaders in Triton's interpreter, `mla_decode(kv_format=...)` in the interpreter against the
reference on the dequantized cache (and the "xla" path), `LatentCache(kv_format=...)`, the Flax layer with an
FP8 cache, and the quantization error itself against a bfloat16 cache. Every test draws fresh random data.
Interpreted decode shapes use D_V 128 (one blockscale group) and D_R 64, so a token is 128 + 4 + 128 = 260
bytes (blockscale) or 192 (pertensor)."""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import triton
import triton.language as tl

import flashmla_jax as fm
from flashmla_jax import LatentCache, fp8
from flashmla_jax.fp8 import (LATENT_FORMATS, SCALE_FLOOR, bytes_per_token, dequantize_latent, latent_format,
                              quantize_latent)
from flashmla_jax.kernels import fp8 as kfp8
from flashmla_jax.ops import decode as decode_ops
from flashmla_jax.ops._launch import launch
from _util import rel_err

E4M3 = ml_dtypes.float8_e4m3fn
ALL_BYTES = np.arange(256, dtype=np.uint8)
ALL_E4M3 = ALL_BYTES.view(E4M3).astype(np.float32)        # index = bit pattern; 0x7F / 0xFF are NaN
D_V, D_R = 128, 64                                          # the interpreted decode tests' latent widths
D = D_V + D_R
FORMATS = ("fp8_blockscale", "fp8_pertensor")


def _rng(request) -> np.random.Generator:
    """A generator seeded by the test's name: fresh data per test, reproducible across runs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _latents(rng, shape, dtype=np.float32) -> np.ndarray:
    """Random latents [..., 576] whose 128-groups and k_pe span magnitudes 1e-3 .. 1e3."""
    x = rng.standard_normal((*shape, 576)).astype(np.float32)
    mags = 10.0 ** rng.uniform(-3, 3, (*shape, 5)).astype(np.float32)
    x[..., :512] *= np.repeat(mags[..., :4], 128, axis=-1)
    x[..., 512:] *= mags[..., 4:]
    return x.astype(dtype)


def _np_blockscale(x: np.ndarray) -> np.ndarray:
    """The 656-byte tokens built by hand with NumPy: e4m3 c_kv bytes, 4 little-endian float32 scales,
    64 little-endian bfloat16 k_pe values (scale = max(amax · fl(1/448), 2^-126), codes x · fl(1/scale))."""
    x = np.asarray(x, np.float32)
    groups = x[..., :512].reshape(*x.shape[:-1], 4, 128)
    scales = np.maximum(np.abs(groups).max(-1) * np.float32(1 / 448), np.float32(SCALE_FLOOR)).astype(np.float32)
    codes = np.clip(groups * (np.float32(1) / scales[..., None]), -448, 448).astype(E4M3).view(np.uint8)
    scale_bytes = scales.astype("<f4").view(np.uint8)
    rope_bytes = x[..., 512:].astype(ml_dtypes.bfloat16).view("<u2").view(np.uint8)
    return np.concatenate([codes.reshape(*x.shape[:-1], 512), scale_bytes, rope_bytes], axis=-1)


# ---- the formats as data ------------------------------------------------------------------------------

def test_format_table():
    b, p = LATENT_FORMATS["fp8_blockscale"], LATENT_FORMATS["fp8_pertensor"]
    assert (b.bytes_per_token, b.c_kv_offset, b.scale_offset, b.rope_offset, b.group_size, b.num_scales) == \
        (656, 0, 512, 528, 128, 4)
    assert b.rope_dtype == jnp.bfloat16 and b.storage_dtype == np.uint8 and not b.per_tensor_scale
    assert (p.bytes_per_token, p.rope_offset, p.group_size, p.num_scales, p.scale_offset) == (576, 512, None, 0, None)
    assert p.rope_dtype == E4M3 and p.per_tensor_scale
    assert [bytes_per_token(f) for f in (None, "fp8_blockscale", "fp8_pertensor")] == [1152, 656, 576]
    assert bytes_per_token(None, jnp.float32) == 2304
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.bytes_per_token = 1


def test_format_other_widths():
    f = latent_format("fp8_blockscale", d_v=256, d_r=32)
    assert (f.bytes_per_token, f.rope_offset, f.num_scales) == (256 + 8 + 64, 264, 2)
    with pytest.raises(ValueError, match="d_v"):
        latent_format("fp8_blockscale", d_v=500)
    with pytest.raises(ValueError, match="d_r"):
        latent_format("fp8_blockscale", d_r=63)
    with pytest.raises(ValueError, match="kv_format"):
        latent_format("fp8_e5m2")
    with pytest.raises(ValueError, match="d_v"):
        latent_format("fp8_pertensor", d_v=-1)
    # Wrong types are TypeErrors, as everywhere (flashmla_jax/_checks.py).
    for kwargs in (dict(d_v="512"), dict(d_v=True), dict(d_r=64.0)):
        with pytest.raises(TypeError, match="d_v" if "d_v" in kwargs else "d_r"):
            latent_format("fp8_blockscale", **kwargs)
    with pytest.raises(TypeError, match="kv_format"):
        latent_format(1)


# ---- quantization: bytes ------------------------------------------------------------------------------

def test_rounding_is_nearest_even_like_ml_dtypes(request):
    """With scale 1, pertensor bytes are exactly ml_dtypes' e4m3 rounding: every finite value, every
    midpoint between neighbours (ties to even) and its two float32 neighbours, random values."""
    rng = _rng(request)
    finite = np.unique(ALL_E4M3[np.isfinite(ALL_E4M3)])
    mids = ((finite[1:] + finite[:-1]) / 2).astype(np.float32)
    x = np.concatenate([finite, mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf)),
                        rng.uniform(-448, 448, 4000).astype(np.float32)]).astype(np.float32)
    x = np.concatenate([x, rng.standard_normal(576 - x.size % 576).astype(np.float32)]).reshape(-1, 576)
    packed, scale = quantize_latent(jnp.asarray(x), "fp8_pertensor", scale=1.0)
    assert packed.dtype == jnp.uint8 and scale.dtype == jnp.float32 and scale.shape == ()
    np.testing.assert_array_equal(np.asarray(packed), x.astype(E4M3).view(np.uint8))


def test_blockscale_bytes_match_hand_built_tokens(request):
    x = _latents(_rng(request), (3, 5))
    packed = np.asarray(quantize_latent(jnp.asarray(x), "fp8_blockscale"))
    assert packed.shape == (3, 5, 656) and packed.dtype == np.uint8
    np.testing.assert_array_equal(packed, _np_blockscale(x))
    # The parts where the layout says: scales at [512, 528), little-endian float32 ≈ amax / 448.
    scales = packed[..., 512:528].copy().view("<f4")
    amax = np.abs(x[..., :512].reshape(3, 5, 4, 128)).max(-1)
    np.testing.assert_allclose(scales, amax / 448, rtol=2.0 ** -22)   # within 2 ulp of amax / 448
    np.testing.assert_array_equal(packed[..., 528:].copy().view("<u2"),
                                  x[..., 512:].astype(ml_dtypes.bfloat16).view(np.uint16))


def test_dequantize_reads_a_flashmla_buffer(request):
    """A FlashMLA V3.2 style paged cache [num_blocks, page, 656] assembled byte by byte, with arbitrary
    (non-NaN) e4m3 bytes, positive scales (some powers of two, as FlashMLA's UE8M0 rounding makes) and
    bfloat16 k_pe, reads as e4m3 * scale and the bfloat16 values."""
    rng = _rng(request)
    codes = rng.integers(0, 256, (2, 8, 512), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x11
    scales = (10.0 ** rng.uniform(-4, 2, (2, 8, 4))).astype(np.float32)
    scales[:, ::2] = 2.0 ** np.ceil(np.log2(scales[:, ::2]))
    rope = (rng.standard_normal((2, 8, 64)) * 3).astype(ml_dtypes.bfloat16)
    buf = np.concatenate([codes, scales.astype("<f4").view(np.uint8), rope.view("<u2").view(np.uint8)], -1)
    assert buf.shape == (2, 8, 656)
    out = np.asarray(dequantize_latent(jnp.asarray(buf), "fp8_blockscale", dtype=jnp.float32))
    want_v = (codes.view(E4M3).astype(np.float32).reshape(2, 8, 4, 128) * scales[..., None]).reshape(2, 8, 512)
    np.testing.assert_array_equal(out[..., :512], want_v)
    np.testing.assert_array_equal(out[..., 512:], rope.astype(np.float32))
    out_bf16 = dequantize_latent(jnp.asarray(buf), "fp8_blockscale")          # default dtype bfloat16
    assert out_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out_bf16), np.concatenate([want_v, rope.astype(np.float32)], -1)
                                  .astype(ml_dtypes.bfloat16))


# ---- quantization: accuracy -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_blockscale_round_trip_error(request, dtype):
    """Per element: |x - x̂| ≤ 2^-4 |x| (3 mantissa bits, rounded) + 2^-10 scale (e4m3 subnormal spacing
    2^-9, halved), hence ≤ 2^-4 amax of its group. k_pe: exact for bfloat16 input, bfloat16 rounding else."""
    x = jnp.asarray(_latents(_rng(request), (4, 16)), dtype)
    xf = np.asarray(x, np.float32)
    out = np.asarray(dequantize_latent(quantize_latent(x, "fp8_blockscale"), "fp8_blockscale", dtype=jnp.float32))
    groups, got = xf[..., :512].reshape(4, 16, 4, 128), out[..., :512].reshape(4, 16, 4, 128)
    amax = np.abs(groups).max(-1, keepdims=True)
    err = np.abs(got - groups)
    assert np.all(err <= 2.0 ** -4 * np.abs(groups) + 2.0 ** -10 * amax / 448 * (1 + 1e-6))
    assert np.all(err <= 2.0 ** -4 * amax)
    assert np.max(err / amax) > 2.0 ** -7          # the bound is not vacuous: rounding happened
    np.testing.assert_allclose(out[..., 512:], xf[..., 512:], rtol=2.0 ** -8, atol=0)
    if dtype == jnp.bfloat16:
        np.testing.assert_array_equal(out[..., 512:], xf[..., 512:])


def test_pertensor_round_trip_error(request):
    x = jnp.asarray(_latents(_rng(request), (3, 7)) / 100)
    packed, scale = quantize_latent(x, "fp8_pertensor")
    assert packed.shape == (3, 7, 576) and float(scale) == pytest.approx(float(jnp.max(jnp.abs(x))) / 448, rel=1e-6)
    out = np.asarray(dequantize_latent(packed, "fp8_pertensor", scale, dtype=jnp.float32))
    xf = np.asarray(x)
    assert np.all(np.abs(out - xf) <= 2.0 ** -4 * np.abs(xf) + 2.0 ** -10 * float(scale) * (1 + 1e-6))
    assert np.abs(out).max() == pytest.approx(np.abs(xf).max(), rel=2.0 ** -4)


def test_pertensor_append_with_the_cache_scale(request):
    """An append quantizes with the cache's fixed scale: returned unchanged, and the same bytes as the
    tokens quantized together with the first ones."""
    rng = _rng(request)
    first, later = jnp.asarray(_latents(rng, (2, 6)) / 10), jnp.asarray(_latents(rng, (2, 1)) / 1e4)
    _, cache_scale = quantize_latent(first, "fp8_pertensor")
    packed, scale = quantize_latent(later, "fp8_pertensor", scale=cache_scale)
    assert float(scale) == float(cache_scale)
    both, _ = quantize_latent(jnp.concatenate([first, later], 1), "fp8_pertensor", scale=cache_scale)
    np.testing.assert_array_equal(np.asarray(packed), np.asarray(both)[:, 6:])
    for given in (float(cache_scale), np.float32(cache_scale), np.asarray([float(cache_scale)], np.float32)):
        np.testing.assert_array_equal(np.asarray(quantize_latent(later, "fp8_pertensor", scale=given)[0]),
                                      np.asarray(packed))


def test_saturation_at_448(request):
    """Values beyond ±448 · scale become exactly ±448 (bytes 0x7E / 0xFE), never NaN (0x7F / 0xFF)."""
    x = jnp.asarray(_latents(_rng(request), (2, 9)))
    scale = float(jnp.max(jnp.abs(x))) / 448 / 8            # an 8x too small cache scale
    packed, _ = quantize_latent(x, "fp8_pertensor", scale=scale)
    b = np.asarray(packed)
    big = np.abs(np.asarray(x)) / np.float32(scale) > 464   # past the midpoint to the would-be 480
    assert big.sum() > 10
    assert np.all((b[big] & 0x7F) == 0x7E) and not np.any((b & 0x7F) == 0x7F)
    out = np.asarray(dequantize_latent(packed, "fp8_pertensor", scale, dtype=jnp.float32))
    np.testing.assert_allclose(np.abs(out[big]), 448 * np.float32(scale), rtol=1e-6)
    # blockscale: each group's largest |value| lands on ±448 exactly
    codes = np.asarray(quantize_latent(x, "fp8_blockscale"))[..., :512].copy().view(E4M3).astype(np.float32)
    np.testing.assert_array_equal(np.abs(codes.reshape(2, 9, 4, 128)).max(-1), 448)


def test_zero_groups_get_the_floor_scale(request):
    """An all-zero group gets scale 2^-126 and zero bytes, and dequantizes to exact zeros; so do the
    whole tensor (pertensor) and groups whose amax / 448 would underflow; nothing is NaN or inf."""
    x = _latents(_rng(request), (3, 4))
    x[0, 1, 128:256] = 0.0
    x[1, :, :512] = 0.0
    x[2, 2, 384:512] = 1e-39                                 # a float32 subnormal group
    packed = np.asarray(quantize_latent(jnp.asarray(x), "fp8_blockscale"))
    scales = packed[..., 512:528].copy().view("<f4")
    assert scales[0, 1, 1] == np.float32(SCALE_FLOOR) and np.all(scales[1] == np.float32(SCALE_FLOOR))
    assert np.all(packed[0, 1, 128:256] == 0) and np.all(packed[1, :, :512] == 0)
    assert np.all(scales > 0) and np.all(np.isfinite(scales))
    out = np.asarray(dequantize_latent(jnp.asarray(packed), "fp8_blockscale", dtype=jnp.float32))
    assert np.all(np.isfinite(out))
    assert np.all(out[0, 1, 128:256] == 0) and np.all(out[1, :, :512] == 0)
    assert np.all(np.abs(out[2, 2, 384:512]) < 2.0 ** -130)
    x[2, 2, 384:512] = 0.0                  # XLA's CPU flushes the subnormals, NumPy does not: compare the rest
    np.testing.assert_array_equal(np.delete(packed, 2, axis=0), np.delete(_np_blockscale(x), 2, axis=0))
    zeros, scale = quantize_latent(jnp.zeros((2, 3, 576), jnp.bfloat16), "fp8_pertensor")
    assert float(scale) == SCALE_FLOOR and not np.any(np.asarray(zeros))
    assert not np.any(np.asarray(dequantize_latent(zeros, "fp8_pertensor", scale)))


def test_nan_free_over_wide_magnitudes(request):
    rng = _rng(request)
    x = rng.standard_normal((4, 8, 576)) * (10.0 ** rng.uniform(-30, 30, (4, 8, 1)))
    x = jnp.asarray(x, jnp.float32)
    block = quantize_latent(x, "fp8_blockscale")
    per, scale = quantize_latent(x, "fp8_pertensor")
    for codes in (np.asarray(block)[..., :512], np.asarray(per)):
        assert not np.any((codes & 0x7F) == 0x7F)                           # no e4m3 NaN byte
    assert np.all(np.isfinite(np.asarray(dequantize_latent(block, "fp8_blockscale", dtype=jnp.float32))))
    assert np.all(np.isfinite(np.asarray(dequantize_latent(per, "fp8_pertensor", scale, dtype=jnp.float32))))


def test_other_widths_round_trip(request):
    x = jnp.asarray(_rng(request).standard_normal((5, 256 + 32)), jnp.float32)
    packed = quantize_latent(x, "fp8_blockscale", d_r=32)
    assert packed.shape == (5, 328)
    out = dequantize_latent(packed, "fp8_blockscale", dtype=jnp.float32, d_r=32)
    assert out.shape == (5, 288)
    assert float(jnp.max(jnp.abs(out - x))) <= 2.0 ** -4 * float(jnp.max(jnp.abs(x)))


# ---- jit ----------------------------------------------------------------------------------------------

def test_jit_and_a_donated_append_step(request):
    rng = _rng(request)
    x = jnp.asarray(_latents(rng, (2, 3)), jnp.bfloat16)
    eager = quantize_latent(x, "fp8_blockscale")
    np.testing.assert_array_equal(np.asarray(jax.jit(quantize_latent, static_argnums=1)(x, "fp8_blockscale")),
                                  np.asarray(eager))

    @jax.jit
    def dq(p):
        return dequantize_latent(p, "fp8_blockscale")
    np.testing.assert_array_equal(np.asarray(dq(eager)), np.asarray(dequantize_latent(eager, "fp8_blockscale")))

    # An append into a preallocated cache, in place, at a traced position, with a traced pertensor scale.
    @jax.jit
    def append(cache, new, pos, scale):
        block = quantize_latent(new, "fp8_blockscale")
        packed, _ = quantize_latent(new, "fp8_pertensor", scale=scale)
        return (jax.lax.dynamic_update_slice_in_dim(cache[0], block, pos, axis=1),
                jax.lax.dynamic_update_slice_in_dim(cache[1], packed, pos, axis=1))
    append = jax.jit(append, donate_argnums=0)
    cache = (jnp.zeros((2, 8, 656), jnp.uint8), jnp.zeros((2, 8, 576), jnp.uint8))
    scale = jnp.float32(float(jnp.max(jnp.abs(x.astype(jnp.float32)))) / 448)
    cache = append(cache, x, jnp.int32(4), scale)
    np.testing.assert_array_equal(np.asarray(cache[0][:, 4:7]), np.asarray(eager))
    np.testing.assert_array_equal(np.asarray(cache[1][:, 4:7]),
                                  np.asarray(quantize_latent(x, "fp8_pertensor", scale=scale)[0]))
    assert not np.any(np.asarray(cache[0][:, :4]))


# ---- errors -------------------------------------------------------------------------------------------

def test_quantize_errors(request):
    x = jnp.asarray(_latents(_rng(request), (2,)))
    packed = quantize_latent(x, "fp8_blockscale")
    with pytest.raises(ValueError, match="kv_format"):
        quantize_latent(x, "fp8")
    with pytest.raises(ValueError, match="kv_format"):
        quantize_latent(x, None)
    with pytest.raises(ValueError, match="kv_format"):
        dequantize_latent(packed, "int8")
    with pytest.raises(TypeError, match="kv_format"):
        quantize_latent(x, 1)
    with pytest.raises(TypeError, match="kv_format"):
        dequantize_latent(packed, ["fp8_blockscale"])
    with pytest.raises(TypeError, match="d_r"):
        quantize_latent(x, "fp8_blockscale", d_r=64.0)
    with pytest.raises(TypeError, match="d_r"):
        dequantize_latent(packed, "fp8_blockscale", d_r="64")
    with pytest.raises(TypeError, match="latent"):
        quantize_latent(x.astype(jnp.int32), "fp8_blockscale")
    with pytest.raises(TypeError, match="latent"):
        quantize_latent([1.0] * 576, "fp8_blockscale")
    with pytest.raises(ValueError, match="d_v"):
        quantize_latent(x[:, :570], "fp8_blockscale")
    with pytest.raises(ValueError, match="last axis"):
        quantize_latent(x[:, :64], "fp8_pertensor")
    with pytest.raises(ValueError, match="scale"):
        quantize_latent(x, "fp8_blockscale", scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        quantize_latent(x, "fp8_pertensor", scale=jnp.ones(2))
    with pytest.raises(TypeError, match="scale"):
        quantize_latent(x, "fp8_pertensor", scale="1.0")
    with pytest.raises(TypeError, match="scale"):
        quantize_latent(x, "fp8_pertensor", scale=jnp.int32(1))
    with pytest.raises(TypeError, match="packed"):
        dequantize_latent(packed.astype(jnp.int8), "fp8_blockscale")
    with pytest.raises(TypeError, match="packed"):
        dequantize_latent(np.zeros((2, 656), np.float32), "fp8_blockscale")
    with pytest.raises(ValueError, match="packed"):
        dequantize_latent(packed[:, :655], "fp8_blockscale")
    with pytest.raises(ValueError, match="scale"):
        dequantize_latent(packed, "fp8_blockscale", scale=1.0)
    with pytest.raises(ValueError, match="scale"):
        dequantize_latent(packed[:, :576], "fp8_pertensor")
    with pytest.raises(TypeError, match="dtype"):
        dequantize_latent(packed, "fp8_blockscale", dtype=jnp.int32)


def test_exported_from_the_package():
    assert fm.quantize_latent is quantize_latent and fm.dequantize_latent is dequantize_latent
    assert {"quantize_latent", "dequantize_latent"} <= set(fm.__all__)
    assert fp8.E4M3_MAX == 448.0


# ---- device side, in Triton's interpreter -------------------------------------------------------------


@triton.jit
def _decode_kernel(x_ptr, o_ptr, N: tl.constexpr, FP8_NATIVE: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(o_ptr + offs, kfp8.e4m3_to_float32(tl.load(x_ptr + offs), FP8_NATIVE))


@triton.jit
def _tile_kernel(kv_ptr, rows_ptr, scale_ptr, n_valid, kv_out, kr_out, BLOCK_N: tl.constexpr, D_V: tl.constexpr,
                 D_R: tl.constexpr, PERTENSOR: tl.constexpr, OUT_DTYPE: tl.constexpr, FP8_NATIVE: tl.constexpr,
                 MASKED: tl.constexpr):
    """Loads tokens rows[0:BLOCK_N] (the first n_valid valid) into kv_out [BLOCK_N, D_V], kr_out [BLOCK_N, D_R]."""
    offs_n = tl.arange(0, BLOCK_N)
    rows = tl.load(rows_ptr + offs_n).to(tl.int64)
    valid = offs_n < n_valid
    if PERTENSOR:
        k_v, k_r = kfp8.load_pertensor_tile(kv_ptr, rows, valid, tl.load(scale_ptr), D_V, D_R, OUT_DTYPE,
                                            FP8_NATIVE, MASKED)
    else:
        k_v, k_r = kfp8.load_blockscale_tile(kv_ptr, rows, valid, D_V, D_R, OUT_DTYPE, FP8_NATIVE, MASKED)
    tl.store(kv_out + offs_n[:, None] * D_V + tl.arange(0, D_V)[None, :], k_v)
    tl.store(kr_out + offs_n[:, None] * D_R + tl.arange(0, D_R)[None, :], k_r)


def _decode_all_bytes(native: bool) -> np.ndarray:
    out, = launch(_decode_kernel, jnp.asarray(ALL_BYTES), out_shape=[jax.ShapeDtypeStruct((256,), jnp.float32)],
                  grid=(1,), implementation="interpret", N=256, FP8_NATIVE=native)
    return np.asarray(out)


def test_bit_decode_matches_ml_dtypes_on_all_256_patterns():
    out = _decode_all_bytes(native=False)
    np.testing.assert_array_equal(out, ALL_E4M3)                              # NaN == NaN here
    np.testing.assert_array_equal(np.signbit(out), np.signbit(ALL_E4M3))      # -0.0, the NaNs' signs
    assert np.isnan(out[0x7F]) and np.isnan(out[0xFF]) and out[0x7E] == 448 and out[0x01] == 2.0 ** -9


def test_native_decode_in_the_interpreter():
    """The float8e4nv conversion runs in the interpreter and gives every finite pattern exactly; its
    0x7F / 0xFF (NaN in float8_e4m3fn) are not checked: Triton 3.6's interpreter gives ±480 there."""
    out = _decode_all_bytes(native=True)
    finite = np.isfinite(ALL_E4M3)
    np.testing.assert_array_equal(out[finite], ALL_E4M3[finite])
    np.testing.assert_array_equal(np.signbit(out[finite]), np.signbit(ALL_E4M3[finite]))


def _run_tile(packed, rows, scale, n_valid, pertensor, out_dtype, native, masked, d_v=512, d_r=64):
    outs = launch(_tile_kernel, packed, jnp.asarray(rows, jnp.int32), jnp.asarray(scale, jnp.float32), n_valid,
                  out_shape=[jax.ShapeDtypeStruct((len(rows), d_v), out_dtype),
                             jax.ShapeDtypeStruct((len(rows), d_r), out_dtype)],
                  grid=(1,), implementation="interpret", BLOCK_N=len(rows), D_V=d_v, D_R=d_r, PERTENSOR=pertensor,
                  OUT_DTYPE=tl.float32 if out_dtype == jnp.float32 else tl.bfloat16, FP8_NATIVE=native,
                  MASKED=masked)
    return np.concatenate([np.asarray(o, np.float32) for o in outs], axis=-1)


def _poisoned_cache(rng, pertensor, tokens=24):
    """A random cache [tokens, bytes] and its float32 dequantization; the last 4 tokens hold poison (NaN
    bytes, infinite scales, NaN k_pe) and must never be read by a masked load."""
    x = jnp.asarray(_latents(rng, (tokens,)))
    fmt = "fp8_pertensor" if pertensor else "fp8_blockscale"
    if pertensor:
        packed, scale = quantize_latent(x, fmt)
        ref = dequantize_latent(packed, fmt, scale, dtype=jnp.float32)
    else:
        packed, scale = quantize_latent(x, fmt), jnp.float32(1.0)
        ref = dequantize_latent(packed, fmt, dtype=jnp.float32)
    poison = np.asarray(packed).copy()
    poison[-4:] = 0xFF
    if not pertensor:
        poison[-4:, 512:528] = np.full((4, 4), np.inf, "<f4").view(np.uint8)
    return jnp.asarray(poison), scale, np.asarray(ref)


@pytest.mark.parametrize("pertensor", [False, True], ids=["blockscale", "pertensor"])
@pytest.mark.parametrize("native", [False, True], ids=["bits", "native"])
def test_tile_loader_matches_dequantize(request, pertensor, native):
    """Scattered rows (as a paged table gives them), float32 tiles: exactly dequantize_latent's values;
    masked rows read as zeros though their bytes are poison."""
    rng = _rng(request)
    packed, scale, ref = _poisoned_cache(rng, pertensor)
    rows = np.concatenate([rng.permutation(20)[:6], [20, 23]])             # 6 valid, then 2 poisoned
    got = _run_tile(packed, rows, scale, 6, pertensor, jnp.float32, native, masked=True)
    np.testing.assert_array_equal(got[:6], ref[rows[:6]])
    np.testing.assert_array_equal(got[6:], 0.0)
    got = _run_tile(packed, rows[:4], scale, 4, pertensor, jnp.float32, native, masked=False)
    np.testing.assert_array_equal(got, ref[rows[:4]])


@pytest.mark.parametrize("pertensor", [False, True], ids=["blockscale", "pertensor"])
def test_tile_loader_bfloat16(request, pertensor):
    """bfloat16 tiles: exactly the float32 values rounded to nearest even, as the GPU rounds (Triton's
    interpreter alone truncates; ops/_launch.py's cast hook rounds)."""
    rng = _rng(request)
    packed, scale, ref = _poisoned_cache(rng, pertensor, tokens=12)
    rows = rng.permutation(8)[:4]
    got = _run_tile(packed, rows, scale, 4, pertensor, jnp.bfloat16, False, masked=True)
    np.testing.assert_array_equal(got, ref[rows].astype(ml_dtypes.bfloat16).astype(np.float32))


# ---- mla_decode over FP8 caches: the kernels in the interpreter ------------------------------------

def _inputs(seed, b, s_q, h, n, seqlens, dtype=jnp.bfloat16, d_v=D_V):
    """q [B, S_q, H, d_v + D_R] of dtype, latents [B, N, d_v + D_R] float32 spanning magnitudes, lengths."""
    kq, kk, km = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(kq, (b, s_q, h, d_v + D_R), jnp.float32).astype(dtype)
    lat = jax.random.normal(kk, (b, n, d_v + D_R), jnp.float32)
    lat = lat * 10.0 ** jax.random.uniform(km, (b, n, 1), minval=-1.0, maxval=1.0)    # per-token magnitudes
    return q, lat, jnp.asarray(seqlens, jnp.int32)


def _pack(lat, kv_format, scale=None):
    """(uint8 cache, kv_scale or None)."""
    if kv_format == "fp8_blockscale":
        return quantize_latent(lat, kv_format), None
    return quantize_latent(lat, kv_format, scale)


def _want(q, kv, sl, kv_format, kv_scale, table=None, **kw):
    """The reference on the dequantized cache (in q's dtype), as a float cache: (out, lse)."""
    deq = dequantize_latent(kv, kv_format, kv_scale, q.dtype)
    return fm.mla_decode(q, deq, sl, table, implementation="xla", return_lse=True, **kw)


def _check(got, want, tol=1e-2):
    out, lse = got
    ref, ref_lse = want
    assert rel_err(out, ref) < tol
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(ref_lse)[finite], rtol=2e-3, atol=2e-3)


def _garbage_pages(kv, kv_format, page_size, seqlens, seed):
    """Contiguous bytes [B, N, W] -> (pages [B * N / page_size + 2, page_size, W] shuffled, table): spare
    pages and every token past its sequence's length hold 0xFF (e4m3 NaN) c_kv bytes and, blockscale,
    infinite scales and NaN k_pe."""
    b, n, w = kv.shape
    fmt = latent_format(kv_format, D_V, D_R)
    junk = np.full((w,), 0xFF, np.uint8)
    if fmt.scale_offset is not None:
        junk[fmt.scale_offset:fmt.rope_offset] = np.tile(np.array([0, 0, 0x80, 0x7F], np.uint8), fmt.num_scales)
    per_seq = n // page_size
    num_pages = b * per_seq + 2
    perm = np.random.default_rng(seed).permutation(num_pages)[: b * per_seq].reshape(b, per_seq)
    data = np.array(kv)
    data[np.arange(n)[None, :] >= np.asarray(seqlens)[:, None]] = junk
    pages = np.broadcast_to(junk, (num_pages, page_size, w)).copy()
    pages[perm.reshape(-1)] = data.reshape(b * per_seq, page_size, w)
    return jnp.asarray(pages), jnp.asarray(perm, jnp.int32)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("kv_format", FORMATS)
def test_contiguous(kv_format, num_splits):
    """One query per sequence; a full, a ragged and an empty sequence (out 0, lse -inf)."""
    q, lat, sl = _inputs(1, 3, 1, 4, 96, [96, 37, 0])
    kv, scale = _pack(lat, kv_format)
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=num_splits, kv_format=kv_format, kv_scale=scale,
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, kv_format, scale, head_dim_v=D_V))
    assert got[0].dtype == jnp.bfloat16 and got[0].shape == (3, 1, 4, D_V)


@pytest.mark.parametrize("kv_format", FORMATS)
def test_paged_garbage_in_unused_pages(kv_format):
    """S_q 2, pages of 32 in shuffled order; spare pages and tokens past each length hold NaN bytes and
    infinite scales: neither the kernel nor the xla path lets them into the output."""
    q, lat, sl = _inputs(2, 2, 2, 4, 128, [128, 45])
    kv, scale = _pack(lat, kv_format, scale=jnp.float32(0.05))
    want = _want(q, kv, sl, kv_format, scale, head_dim_v=D_V)
    pages, table = _garbage_pages(kv, kv_format, 32, sl, seed=3)
    for impl, splits in (("interpret", 2), ("interpret", None), ("xla", None)):
        got = fm.mla_decode(q, pages, sl, table, head_dim_v=D_V, num_splits=splits, kv_format=kv_format,
                            kv_scale=scale, implementation=impl, return_lse=True)
        _check(got, want)


def test_many_splits_use_the_combine_kernel():
    splits = decode_ops.MAX_SPLITS_MERGED_IN_KERNEL + 4
    plan = decode_ops.plan_decode((2, 1, 4, D), jnp.bfloat16, D_V, True, (2, 96, 260), None, splits, 132,
                                  kv_format="fp8_blockscale")
    assert plan.combine_grid is not None and plan.constexprs["KV_FORMAT"] == 1
    q, lat, sl = _inputs(3, 2, 1, 4, 96, [96, 50])
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=splits, kv_format="fp8_blockscale",
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V))


def test_wide_row_tiles():
    """S_q * H = 40 rows: 64-row tiles with the wide-tile options (unmasked tiles, then masked ones)."""
    s_q, h = 10, 4
    plan = decode_ops.plan_decode((2, s_q, h, D), jnp.bfloat16, D_V, True, (2, 160, 260), None, 3, 132,
                                  kv_format="fp8_blockscale")
    assert plan.constexprs["BLOCK_M"] == 64 and plan.constexprs["SPLIT_MASKED"]
    q, lat, sl = _inputs(4, 2, s_q, h, 160, [160, 75])
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, num_splits=3, kv_format="fp8_blockscale",
                        implementation="interpret", return_lse=True)
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V))


@pytest.mark.parametrize("kv_format", FORMATS)
def test_stacked_cache(kv_format):
    """A layer-stacked cache [L, B, N, W] read at a layer; pertensor with one scale per layer."""
    layers = 3
    q, lat, sl = _inputs(5, 2, 1, 4, 64, [64, 21])
    lat = jnp.stack([lat * (i + 1) for i in range(layers)])
    scales = jnp.asarray([0.01, 0.02, 0.04], jnp.float32) if kv_format == "fp8_pertensor" else None
    kv = jnp.stack([_pack(lat[i], kv_format, None if scales is None else scales[i])[0] for i in range(layers)])
    for layer in (0, 2):
        one = None if scales is None else scales[layer]
        for impl in ("interpret", "xla"):
            got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, layer=layer, num_splits=2, kv_format=kv_format,
                                kv_scale=scales, implementation=impl, return_lse=True)
            _check(got, _want(q, kv[layer], sl, kv_format, one, head_dim_v=D_V))


def test_fp8_native_conversion_in_the_interpreter(monkeypatch):
    """FP8_NATIVE=True (the GPU's float8e4nv conversion) runs in the interpreter for finite bytes; the
    garbage of unused pages is masked before any conversion."""
    monkeypatch.setitem(decode_ops.FP8_NATIVE, "interpret", True)
    jax.clear_caches()          # traces made with the bit-arithmetic decode must not be reused
    try:
        for kv_format in FORMATS:
            q, lat, sl = _inputs(6, 2, 1, 4, 64, [64, 33])
            kv, scale = _pack(lat, kv_format)
            want = _want(q, kv, sl, kv_format, scale, head_dim_v=D_V)
            pages, table = _garbage_pages(kv, kv_format, 16, sl, seed=4)
            got = fm.mla_decode(q, pages, sl, table, head_dim_v=D_V, num_splits=2, kv_format=kv_format,
                                kv_scale=scale, implementation="interpret", return_lse=True)
            _check(got, want)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.float16, 1e-2)])
def test_float32_and_float16_queries(dtype, tol):
    """Tiles are dequantized to q's dtype: exact in float32."""
    q, lat, sl = _inputs(7, 2, 1, 4, 64, [64, 10], dtype=dtype)
    kv, _ = _pack(lat, "fp8_blockscale")
    got = fm.mla_decode(q, kv, sl, head_dim_v=D_V, kv_format="fp8_blockscale", implementation="interpret",
                        return_lse=True)
    assert got[0].dtype == dtype
    _check(got, _want(q, kv, sl, "fp8_blockscale", None, head_dim_v=D_V), tol)


def test_deepseek_dims_paged():
    """The real 512 + 64 latent (656-byte tokens), H 16, pages of 64."""
    q, lat, sl = _inputs(8, 2, 1, 16, 128, [128, 70], d_v=512)
    kv = quantize_latent(lat, "fp8_blockscale")
    assert kv.shape[-1] == 656
    want = _want(q, kv, sl, "fp8_blockscale", None, softmax_scale=192 ** -0.5)
    pages, table = _garbage_pages_512(kv, sl)
    got = fm.mla_decode(q, pages, sl, table, kv_format="fp8_blockscale", softmax_scale=192 ** -0.5,
                        implementation="interpret", return_lse=True)
    _check(got, want)


def _garbage_pages_512(kv, sl):
    """As _garbage_pages, for 656-byte tokens: pages of 64, NaN bytes past each length and in a spare page."""
    b, n, w = kv.shape
    data = np.array(kv)
    data[np.arange(n)[None, :] >= np.asarray(sl)[:, None]] = 0xFF
    pages = np.full((b * n // 64 + 1, 64, w), 0xFF, np.uint8)
    pages[1:] = data.reshape(-1, 64, w)
    return jnp.asarray(pages), jnp.arange(1, b * n // 64 + 1, dtype=jnp.int32).reshape(b, n // 64)


@pytest.mark.parametrize("implementation", ["xla", "interpret"])
def test_vmap(implementation):
    """vmap folds members into the batch; pertensor members with their own scales run one by one."""
    q, lat, sl = _inputs(9, 2, 1, 4, 32, [32, 9])
    qs = jnp.stack([q, -q])
    kv_b = quantize_latent(lat, "fp8_blockscale")
    f = jax.vmap(lambda q: fm.mla_decode(q, kv_b, sl, head_dim_v=D_V, kv_format="fp8_blockscale",
                                         implementation=implementation))
    got = f(qs)
    for i in range(2):
        assert rel_err(got[i], _want(qs[i], kv_b, sl, "fp8_blockscale", None, head_dim_v=D_V)[0]) < 1e-2
    packed = [quantize_latent(lat * (i + 1), "fp8_pertensor") for i in range(2)]
    kvs, scales = jnp.stack([p[0] for p in packed]), jnp.stack([p[1] for p in packed])
    got = jax.vmap(lambda kv, s: fm.mla_decode(q, kv, sl, head_dim_v=D_V, kv_format="fp8_pertensor", kv_scale=s,
                                               implementation=implementation))(kvs, scales)
    for i in range(2):
        assert rel_err(got[i], _want(q, kvs[i], sl, "fp8_pertensor", scales[i], head_dim_v=D_V)[0]) < 1e-2


def test_decode_errors():
    q, lat, sl = _inputs(10, 2, 1, 4, 32, [32, 9])
    kv, scale = _pack(lat, "fp8_pertensor")
    kvb, _ = _pack(lat, "fp8_blockscale")
    call = lambda **kw: fm.mla_decode(**{"q": q, "kv_cache": kv, "cache_seqlens": sl, "head_dim_v": D_V,  # noqa: E731
                                         "kv_format": "fp8_pertensor", "kv_scale": scale, **kw})
    with pytest.raises(ValueError, match="kv_format"):
        call(kv_format="fp8")
    with pytest.raises(TypeError, match="kv_format"):
        call(kv_format=1)
    with pytest.raises(TypeError, match="kv_cache must be uint8"):
        call(kv_cache=lat.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"kv_cache must be \[B, N, 192\]"):
        call(kv_cache=kvb)
    with pytest.raises(ValueError, match="needs kv_scale"):
        call(kv_scale=None)
    with pytest.raises(ValueError, match="kv_scale is only"):
        call(kv_cache=kvb, kv_format="fp8_blockscale")
    with pytest.raises(ValueError, match="kv_scale must be a scalar"):
        call(kv_scale=jnp.ones((2,), jnp.float32))
    with pytest.raises(TypeError, match="kv_scale"):
        call(kv_scale="1.0")
    with pytest.raises(ValueError, match="head_dim_v=64"):
        call(kv_cache=kvb, kv_format="fp8_blockscale", kv_scale=None, head_dim_v=64)
    with pytest.raises(TypeError, match="kv_cache is uint8, raw bytes: pass kv_format"):
        call(kv_format=None, kv_scale=None)


# ---- LatentCache and the Flax layer -------------------------------------------------------------------


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("page_size", [None, 16])
def test_cache_append_decode(kv_format, page_size):
    """Two appends (a ragged prompt, then one token) in a jitted, donated step equal quantize_latent of
    the same latents; decode equals the reference on the dequantized cache."""
    q, lat, _ = _inputs(11, 2, 1, 4, 24, [0, 0])
    scale = 0.02 if kv_format == "fp8_pertensor" else None
    cache = LatentCache.create(2, 48, dim=D, page_size=page_size, kv_format=kv_format, kv_scale=scale)
    assert cache.dim == D and cache.kv.dtype == jnp.uint8 and cache.kv.shape[-1] == cache.format.bytes_per_token
    step = jax.jit(lambda c, x, n: c.append(x, num_new=n), donate_argnums=0)
    cache = step(cache, lat[:, :20], jnp.asarray([20, 13], jnp.int32))
    cache = step(cache, lat[:, 20:21], jnp.asarray([1, 1], jnp.int32))
    np.testing.assert_array_equal(cache.seqlens, [21, 14])
    rows = jnp.concatenate([lat[:, :13], lat[:, 20:21]], axis=1)
    want_bytes, _ = _pack(rows[1:], kv_format, scale)
    view = cache.kv if page_size is None else fm.reference.gather_pages(cache.kv, cache.block_table)
    np.testing.assert_array_equal(view[1:, :14], want_bytes)
    for impl in ("interpret", "xla"):
        got = cache.decode(q, head_dim_v=D_V, implementation=impl, return_lse=True)
        _check(got, _want(q, view, cache.seqlens, kv_format, cache.kv_scale, head_dim_v=D_V))


@pytest.mark.parametrize("kv_format", FORMATS)
def test_stacked_cache_equals_separate_caches(kv_format):
    layers = 2
    q, lat, _ = _inputs(12, 2, 1, 4, 16, [0, 0])
    scales = [0.01, 0.05]
    kw = dict(page_size=16, kv_format=kv_format)
    scale_of = (lambda i: scales[i]) if kv_format == "fp8_pertensor" else (lambda i: None)    # noqa: E731
    stacked = LatentCache.create(2, 32, dim=D, num_layers=layers, kv_scale=scale_of(0) and jnp.asarray(scales), **kw)
    singles = [LatentCache.create(2, 32, dim=D, kv_scale=scale_of(i), **kw) for i in range(layers)]
    for i in range(layers):
        stacked = stacked.append(lat * (i + 1), layer=i)
        singles[i] = singles[i].append(lat * (i + 1))
    for i in range(layers):
        np.testing.assert_array_equal(stacked.kv[i], singles[i].kv)
        got = stacked.decode(q, layer=i, head_dim_v=D_V, implementation="interpret")
        want = singles[i].decode(q, head_dim_v=D_V, implementation="xla")
        assert rel_err(got, want) < 1e-2


def test_cache_errors():
    with pytest.raises(ValueError, match="kv_format"):
        LatentCache.create(1, 16, kv_format="int8")
    with pytest.raises(TypeError, match="kv_format"):
        LatentCache.create(1, 16, kv_format=8)
    with pytest.raises(ValueError, match="kv_scale is only"):
        LatentCache.create(1, 16, kv_format="fp8_blockscale", kv_scale=1.0)
    with pytest.raises(ValueError, match="kv_scale is only"):
        LatentCache.create(1, 16, kv_scale=1.0)
    with pytest.raises(ValueError, match="do not fit"):
        LatentCache.create(1, 16, dim=96, kv_format="fp8_blockscale")
    with pytest.raises(ValueError, match=r"kv_scale must be a scalar or \[L\]"):
        LatentCache.create(1, 16, num_layers=2, kv_format="fp8_pertensor", kv_scale=jnp.ones(3))
    cache = LatentCache.create(1, 16, kv_format="fp8_blockscale")
    assert cache.kv.shape == (1, 16, 656) and cache.dim == 576 and cache.kv_scale is None


@pytest.mark.parametrize("kv_format", FORMATS)
def test_flax_layer_with_an_fp8_cache(kv_format):
    """Prefill (cache_empty) then one decode step through the Flax layer: the FP8 cache's output is close
    to the bfloat16 cache's, and its prefill attends to the latents as the cache stores them."""
    from flashmla_jax.flax import MLAConfig, init_params, mla_attention

    config = MLAConfig(hidden_size=64, num_heads=2, kv_lora_rank=D_V, qk_nope_head_dim=32, qk_rope_head_dim=D_R,
                       v_head_dim=32)
    params = init_params(config, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 64), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (2, 9))
    outs = {}
    for fmt in (None, kv_format):
        cache = LatentCache.create(2, 16, dim=D, dtype=jnp.bfloat16, kv_format=fmt,
                                   kv_scale=0.01 if fmt == "fp8_pertensor" else None)
        kw = dict(config=config, dtype=jnp.bfloat16, implementation="xla")
        y0, cache = mla_attention(params, x[:, :8], pos[:, :8], cache, cache_empty=True, **kw)
        y1, cache = mla_attention(params, x[:, 8:], pos[:, 8:], cache, implementation="interpret",
                                  config=config, dtype=jnp.bfloat16)
        outs[fmt] = (y0, y1)
    assert rel_err(outs[kv_format][0], outs[None][0]) < 0.1
    assert rel_err(outs[kv_format][1], outs[None][1]) < 0.1


# ---- the quantization error, measured ----------------------------------------------------------------


def _quantization_error(q, lat, kv_format):
    """rel err of decode over the FP8 cache of `lat` against decode over its bfloat16 cache (xla)."""
    sl = jnp.full((lat.shape[0],), lat.shape[1], jnp.int32)
    kv, scale = _pack(lat, kv_format)
    kw = dict(softmax_scale=192 ** -0.5, implementation="xla", head_dim_v=lat.shape[-1] - D_R)
    fp8 = fm.mla_decode(q, kv, sl, kv_format=kv_format, kv_scale=scale, **kw)
    bf16 = fm.mla_decode(q, lat.astype(jnp.bfloat16), sl, **kw)
    return rel_err(fp8, bf16)


# Bounds a little above what was measured (README, "FP8 latent cache"); printed with -s.
QUANT_BOUNDS = {"unit": 0.05, "spread": 0.08, "flax": 0.035}


@pytest.mark.parametrize("kv_format", FORMATS)
@pytest.mark.parametrize("latents", ["unit", "spread"])
def test_quantization_error_random_latents(kv_format, latents):
    """DeepSeek widths, B 2, N 1024, H 16: queries N(0, 1), latents N(0, 1) ("unit") or with per-token
    magnitudes 0.1 .. 10 ("spread")."""
    q, lat, _ = _inputs(13, 2, 1, 16, 1024, [0, 0], d_v=512)
    if latents == "unit":
        lat = jax.random.normal(jax.random.PRNGKey(14), lat.shape, jnp.float32)
    err = _quantization_error(q, lat, kv_format)
    print(f"quantization error, random latents ({latents}), {kv_format}: {err:.4f}")
    assert err < QUANT_BOUNDS[latents]


@pytest.mark.parametrize("kv_format", FORMATS)
def test_quantization_error_flax_latents(kv_format):
    """Latents from the Flax layer (project_latent of random hidden states: RMS-normed c_kv, RoPE'd k_pe)
    and its absorbed queries, DeepSeek-V2-Lite widths."""
    from flashmla_jax.flax import MLAConfig, absorb_query, init_params, project_latent, project_queries, split_wkv_b

    config = MLAConfig(hidden_size=512, num_heads=16)
    params = init_params(config, jax.random.PRNGKey(2))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 1024, 512), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(1024, dtype=jnp.int32), (2, 1024))
    lat = project_latent(params, x, pos, config)
    q_nope, q_pe = project_queries(params, x[:, -1:], pos[:, -1:], config)
    w_uk, _ = split_wkv_b(params["wkv_b"], config.qk_nope_head_dim)
    q = absorb_query(q_nope, q_pe, w_uk).astype(jnp.bfloat16)
    err = _quantization_error(q, lat, kv_format)
    print(f"quantization error, Flax-layer latents, {kv_format}: {err:.4f}")
    assert err < QUANT_BOUNDS["flax"]


# ---- tier 3: the GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kv_format, implementation", [("fp8_blockscale", "triton"), ("fp8_pertensor", "triton"),
                                                       ("fp8_blockscale", "gluon"), ("fp8_pertensor", "gluon")])
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_fp8_d1(kv_format, implementation, paged):
    """D1-like: B 128, N 4096, H 16, S_q 1 (and H 128 for the compute-bound tiles), the kernels (the tl ones under
    "triton", the Gluon kernel's in-place dequantization under "gluon") vs xla on the dequantized cache, with
    garbage (NaN codes) in unused pages when paged."""
    for b, h, s_q in ((128, 16, 1), (32, 128, 2)):
        n = 4096
        kq, kk, kl = jax.random.split(jax.random.PRNGKey(b + h), 3)
        q = jax.random.normal(kq, (b, s_q, h, 576), jnp.float32).astype(jnp.bfloat16)
        lat = jax.random.normal(kk, (b, n, 576), jnp.float32)
        sl = jax.random.randint(kl, (b,), 1, n + 1).astype(jnp.int32)
        kv, scale = _pack(lat, kv_format)
        table = None
        if paged:
            perm = np.random.default_rng(0).permutation(b * n // 64 + 4)
            pages = np.full((b * n // 64 + 4, 64, kv.shape[-1]), 0xFF, np.uint8)
            pages[perm[: b * n // 64]] = np.asarray(kv).reshape(-1, 64, kv.shape[-1])
            kv, table = jnp.asarray(pages), jnp.asarray(perm[: b * n // 64].reshape(b, n // 64), jnp.int32)
        kw = dict(softmax_scale=192 ** -0.5, kv_format=kv_format, kv_scale=scale, return_lse=True)
        out, lse = fm.mla_decode(q, kv, sl, table, implementation=implementation, **kw)
        ref, ref_lse = fm.mla_decode(q, kv, sl, table, implementation="xla", **kw)
        assert rel_err(out, ref) < 1e-2, (b, h, s_q)
        np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("kv_format, dtype", [("fp8_blockscale", jnp.bfloat16), ("fp8_pertensor", jnp.float16),
                                           ("fp8_pertensor", jnp.bfloat16)])
@pytest.mark.parametrize("h", [64, 8])
def test_gpu_gluon_fp8_rows(num_splits, kv_format, dtype, h):
    """The Gluon kernels' FP8 paths on a stacked cache at a traced layer, causal S_q 2 with 64 heads (one 128-row
    tile of kernels/gluon_decode.py) or 8 (16 rows: kernels/gluon_narrow_decode.py), against xla: NaN codes past
    each length are ignored (the TMA's zero fill), an empty sequence gives 0 and -inf, and a NaN code or a NaN
    scale (blockscale; pertensor: a NaN rope code) in a used token makes its sequence's rows NaN and no other."""
    b, s_q, n = 4, 2, 1024
    kq, kk = jax.random.split(jax.random.PRNGKey(31 + num_splits))
    q = jax.random.normal(kq, (b, s_q, h, 576), jnp.float32).astype(dtype)
    kv, kv_scale = _pack(jax.random.normal(kk, (2, b, n, 576), jnp.float32), kv_format)
    sl = jnp.asarray([1000, 77, 1024, 0], jnp.int32)
    kv = jnp.where(jnp.arange(n)[None, None, :, None] < sl[None, :, None, None], kv, jnp.uint8(0xFF))
    kw = dict(softmax_scale=192 ** -0.5, kv_format=kv_format, kv_scale=kv_scale, return_lse=True,
              num_splits=num_splits)
    decode = jax.jit(lambda kv, layer: fm.mla_decode(q, kv, sl, layer=layer, implementation="gluon", **kw))
    out, lse = decode(kv, jnp.int32(1))
    _check((out, lse), fm.mla_decode(q, kv[1], sl, implementation="xla", **kw))
    assert np.all(np.asarray(out[3], np.float32) == 0) and np.all(np.isneginf(np.asarray(lse[3])))
    if kv_format == "fp8_blockscale":
        nan_scale = jnp.asarray(np.frombuffer(np.float32(np.nan).tobytes(), np.uint8))
        poisoned = kv.at[1, 0, 5, 100].set(0x7F).at[1, 2, 1000, 512:516].set(nan_scale)
    else:
        poisoned = kv.at[1, 0, 5, 100].set(0x7F).at[1, 2, 1000, 540].set(0xFF)
    got, got_lse = decode(poisoned, jnp.int32(1))
    rows = np.isnan(np.asarray(got, np.float32)).all(-1) & np.isnan(np.asarray(got_lse))
    np.testing.assert_array_equal(rows.reshape(b, -1).all(-1), [True, False, True, False])
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(out[1]))


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("h", [64, 16])
def test_gpu_gluon_blockscale_magnitudes_across_blocks(num_splits, h):
    """Blockscale latents whose magnitude jumps by up to 2^32 from one 64-token block to the next (values; the
    scores come mostly from the rope, so every block weighs in), some blocks' nope part far below the rope,
    against xla row by row on both Gluon kernels: 16 rows (the narrow kernel keeps a block's fp16 values over a
    power of two of the block and O in the units of the block before, so a wrong change of units in any block
    shows) and 64 (bf16 tiles)."""
    b, n = 4, 1024
    kq, kk, ku, kr = jax.random.split(jax.random.PRNGKey(7 + num_splits), 4)
    q = jax.random.normal(kq, (b, 1, h, 576), jnp.float32)
    q = q.at[..., :512].multiply(2.0 ** -24).astype(jnp.bfloat16)
    lat = jax.random.normal(kk, (b, n, 576), jnp.float32)
    block_power = jax.random.randint(ku, (b, n // 64, 1), -16, 17).repeat(64, axis=1)
    token_power = jax.random.randint(kr, (b, n, 1), -3, 4)
    lat = lat.at[..., :512].multiply(2.0 ** (block_power + token_power).astype(jnp.float32))
    kv, _ = _pack(lat, "fp8_blockscale")
    sl = jnp.asarray([1000, 130, 1024, 64], jnp.int32)
    kw = dict(softmax_scale=192 ** -0.5, kv_format="fp8_blockscale", return_lse=True, num_splits=num_splits)
    out, lse = fm.mla_decode(q, kv, sl, implementation="gluon", **kw)
    ref, ref_lse = fm.mla_decode(q, kv, sl, implementation="xla", **kw)
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    row_err = np.linalg.norm(out - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert np.all(row_err < 1e-2), row_err.max()
    np.testing.assert_allclose(lse, ref_lse, rtol=2e-3, atol=2e-3)
