"""FP8 formats of the latent cache: the byte layouts, and quantize / dequantize in pure JAX.

A latent token is `[c_kv ; k_pe]`: D_V (512) values of c_kv, then D_R (64) of k_pe, 576 in all. `kv_format`
names how a cache stores it:

- `None`: the cache's own float dtype, `[..., 576]` (1152 bytes a token in bf16).
- `"fp8_blockscale"`: FlashMLA's DeepSeek-V3.2 per-token layout ("V32_FP8Sparse"), 656 bytes a token,
  stored as uint8 `[..., 656]`. Byte offsets within one token (D_V 512, D_R 64):

      [  0, 512)  c_kv[0:512] as float8_e4m3fn, one byte each, in order
      [512, 528)  4 float32 scales, little-endian; scale g covers c_kv[128 g : 128 (g + 1)]
      [528, 656)  k_pe[0:64] as bfloat16, little-endian, not quantized

  c_kv[i] = float(e4m3 byte i) * scale[i // 128]. The token rows are back to back (a token's byte 0 at
  656 * token), so `[num_blocks, page_size, 656]` is a paged cache. FlashMLA builds exactly this (its
  tests/quant.py, `V32_FP8Sparse`: nope part, `.view(float32)` scales, `.view(bfloat16)` rope); the
  "V32_FP8" layout some FlashMLA versions also define groups a page's bytes by part: a different format.
  `dequantize_latent` reads any positive float32 scale, so caches whose scales FlashMLA rounded up to a
  power of two (UE8M0) read the same.
- `"fp8_pertensor"`: all 576 values as float8_e4m3fn, stored as uint8 `[..., 576]`, with one float32
  scale for the whole cache kept beside it (a 0-d array): latent = float(e4m3) * scale. uint8 rather than
  float8_e4m3fn storage because jax-triton and Triton's interpreter (via torch) take it as is.

Quantization, the same for both formats: a group (128 c_kv values of one token, or the whole tensor) gets
scale = max(amax · fl(1/448), 2^-126), where amax is the largest |value| in the group, fl(1/448) is 1/448
rounded to float32, and 2^-126 is float32's smallest normal number. Values are multiplied by fl(1/scale)
in float32, clipped to [-448, 448] (float8_e4m3fn has no inf: an overflow would be NaN) and rounded to
the nearest e4m3 value, ties to even. Multiplications rather than divisions because XLA rewrites a
division into one (on the CPU a float32 `x / y` gave x · fl(1/y), which differs from x / y in the last
bit): written so, every backend computes the same bits (within a scale ulp of amax / 448, as FlashMLA's
own quantizer divides). float32 subnormal inputs may be flushed to zero (XLA's CPU backend does).

**All-zero groups**: scale 2^-126 and all-zero bytes, so they dequantize to exact zeros (never 0/0). The
same floor keeps a group whose amax / 448 would underflow (|values| below about 5e-36) finite, its values
quantized with absolute error below 2^-126. Inputs must be finite: a NaN or inf turns its group (the whole
tensor, per tensor) into NaN and zeros.

Everything here is pure `jax.numpy` with static shapes: it runs under `jax.jit`, inside `lax.scan`, and in
a donated, jitted cache-append step (the kv_format string is static: a Python value, not traced).

The lightning indexer's key cache (DeepSeek Sparse Attention) has an FP8 layout of its own, "fp8_paged"
(DeepGEMM's paged layout, one scale per token): the last section.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from flashmla_jax import _checks
from flashmla_jax._checks import FP8_FORMATS, INDEX_FORMATS

__all__ = ["LatentFormat", "LATENT_FORMATS", "FP8_FORMATS", "E4M3_MAX", "INV_E4M3_MAX", "SCALE_FLOOR",
           "latent_format", "bytes_per_token", "quantize_latent", "dequantize_latent",
           "INDEX_KEY_DIM", "INDEX_FORMATS", "index_page_bytes", "quantize_index_tokens", "quantize_index_keys",
           "dequantize_index_keys", "write_index_keys"]

E4M3_MAX = 448.0          # largest finite float8_e4m3fn
INV_E4M3_MAX = np.float32(1.0 / 448.0)   # scale = amax · this (what XLA makes of amax / 448 anyway)
SCALE_FLOOR = 2.0 ** -126  # the smallest scale: all-zero (and underflowing) groups get it
BLOCKSCALE_GROUP = 128    # c_kv values per float32 scale in "fp8_blockscale"


@dataclasses.dataclass(frozen=True)
class LatentFormat:
    """How one latent token `[c_kv (d_v) ; k_pe (d_r)]` is laid out in an FP8 cache.

    All offsets are in bytes from the token's first byte; a cache is `[..., bytes_per_token]` of
    `storage_dtype` with tokens back to back.
      name            the kv_format string
      d_v, d_r        c_kv and k_pe widths (512, 64)
      bytes_per_token 656 (blockscale) / 576 (pertensor)
      storage_dtype   uint8 (the raw bytes)
      group_size      c_kv values per float32 scale stored in the token (128), or None: one scale per cache
      c_kv_offset     where the d_v float8_e4m3fn c_kv bytes start (0)
      scale_offset    where the token's float32 scales start (blockscale: d_v), or None
      rope_offset     where k_pe starts (blockscale: d_v + 4 * d_v / 128, as bfloat16; pertensor: d_v, as e4m3)
      rope_dtype      how k_pe is stored: bfloat16 (blockscale) or float8_e4m3fn (pertensor)
    """
    name: str
    d_v: int
    d_r: int
    bytes_per_token: int
    storage_dtype: np.dtype
    group_size: int | None
    c_kv_offset: int
    scale_offset: int | None
    rope_offset: int
    rope_dtype: np.dtype

    @property
    def num_scales(self) -> int:
        """float32 scales per token: d_v / group_size (4), or 0 with a per-cache scale."""
        return 0 if self.group_size is None else self.d_v // self.group_size

    @property
    def per_tensor_scale(self) -> bool:
        """True when the format needs one float32 scale per cache beside the bytes."""
        return self.group_size is None


def latent_format(kv_format: str, d_v: int = 512, d_r: int = 64) -> LatentFormat:
    """The LatentFormat of kv_format for latents of d_v c_kv values and d_r k_pe values.

    "fp8_blockscale" needs d_v a positive multiple of 128 and d_r even (so that every float32 scale and
    bfloat16 k_pe value of every token stays aligned to its size); "fp8_pertensor" any d_v ≥ 1, d_r ≥ 0.
    Raises TypeError for a kv_format that is not a string or widths that are not ints, ValueError for an
    unknown kv_format or widths the format cannot take."""
    _checks.kv_format("kv_format", kv_format, required=True)
    d_v, d_r = _checks.integer("d_v", d_v, lo=0), _checks.integer("d_r", d_r, lo=0)
    if kv_format == "fp8_blockscale":
        if d_v == 0 or d_v % BLOCKSCALE_GROUP:
            raise ValueError(f"fp8_blockscale needs d_v (the c_kv width) a positive multiple of "
                             f"{BLOCKSCALE_GROUP}, not {d_v}")
        if d_r % 2:
            raise ValueError(f"fp8_blockscale needs d_r (the k_pe width) even, not {d_r}")
        scales = d_v // BLOCKSCALE_GROUP
        return LatentFormat(name=kv_format, d_v=d_v, d_r=d_r, bytes_per_token=d_v + 4 * scales + 2 * d_r,
                            storage_dtype=np.dtype(np.uint8), group_size=BLOCKSCALE_GROUP, c_kv_offset=0,
                            scale_offset=d_v, rope_offset=d_v + 4 * scales, rope_dtype=np.dtype(jnp.bfloat16))
    if d_v == 0:
        raise ValueError("fp8_pertensor needs d_v (the c_kv width) ≥ 1")
    return LatentFormat(name=kv_format, d_v=d_v, d_r=d_r, bytes_per_token=d_v + d_r,
                        storage_dtype=np.dtype(np.uint8), group_size=None, c_kv_offset=0, scale_offset=None,
                        rope_offset=d_v, rope_dtype=np.dtype(jnp.float8_e4m3fn))


# The formats at DeepSeek's widths (d_v 512, d_r 64): 656 and 576 bytes a token.
LATENT_FORMATS: Mapping[str, LatentFormat] = types.MappingProxyType({f: latent_format(f) for f in FP8_FORMATS})


def bytes_per_token(kv_format: str | None, dtype=jnp.bfloat16, d_v: int = 512, d_r: int = 64) -> int:
    """Cache bytes per latent token: 656 / 576 for the FP8 formats, (d_v + d_r) * itemsize of dtype
    (1152 for bfloat16) for kv_format None."""
    if kv_format is None:
        return (d_v + d_r) * np.dtype(dtype).itemsize
    return latent_format(kv_format, d_v, d_r).bytes_per_token


def _check_latent(latent, name: str = "latent", last_axis: str = "d_v + d_r") -> jax.Array:
    if not hasattr(latent, "shape") or not hasattr(latent, "dtype"):
        raise TypeError(f"{name} must be an array [..., {last_axis}], not {type(latent).__name__}")
    if not jnp.issubdtype(latent.dtype, jnp.floating) or jnp.dtype(latent.dtype).itemsize < 2:
        raise TypeError(f"{name} must be a float array (bfloat16, float16 or float32), not {latent.dtype}")
    if latent.ndim < 1:
        raise ValueError(f"{name} must have a last axis of {last_axis} values, not be 0-d")
    return jnp.asarray(latent)


def _check_scale(scale) -> jax.Array:
    """A per-tensor scale as a float32 0-d array (a Python float, a NumPy or JAX scalar or 1-element array)."""
    scale = _checks.float_scale("scale", scale)
    if scale.size != 1:
        raise ValueError(f"scale must hold one value (one scale per cache), not shape {tuple(scale.shape)}")
    return jnp.reshape(scale, ())


def _scale_of(amax: jax.Array) -> jax.Array:
    # The floor keeps 0 · inf (an all-zero group) and an underflowed amax / 448 out of x · (1 / scale).
    return jnp.maximum(amax.astype(jnp.float32) * INV_E4M3_MAX, jnp.float32(SCALE_FLOOR))


def _to_e4m3_bytes(x: jax.Array, scale: jax.Array) -> jax.Array:
    """float32 x · fl(1 / scale) as float8_e4m3fn bytes (uint8, same shape): clipped to ±448, then
    rounded to nearest even (XLA's convert, checked against ml_dtypes in the tests)."""
    y = jnp.clip(x * (1.0 / scale), -E4M3_MAX, E4M3_MAX)
    return jax.lax.bitcast_convert_type(y.astype(jnp.float8_e4m3fn), jnp.uint8)


def _from_e4m3_bytes(b: jax.Array) -> jax.Array:
    """uint8 bytes [...] of float8_e4m3fn as float32 [...] (exact; 0x7F / 0xFF are NaN)."""
    return jax.lax.bitcast_convert_type(b, jnp.float8_e4m3fn).astype(jnp.float32)


# The 256 e4m3 values by byte, float32 (0x7F / 0xFF NaN).
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(jnp.float8_e4m3fn).astype(np.float32)


def e4m3_values_by_lookup(b: jax.Array) -> jax.Array:
    """uint8 bytes [...] of float8_e4m3fn as float32 [...], by a table lookup. For bytes made in the same
    program: on a GPU, XLA may drop a float32 -> e4m3 -> float32 round trip of converts as excess precision
    (seen on the H200: the indexer's FP8 queries came out unrounded), but not a lookup."""
    return jnp.asarray(_E4M3_VALUES)[b.astype(jnp.int32)]


def _le_bytes(words: jax.Array, nbytes: int) -> jax.Array:
    """Unsigned words [...] as little-endian bytes [..., nbytes] (uint8), whatever the host's byte order."""
    w = words.astype(jnp.uint32)
    return jnp.stack([((w >> (8 * i)) & 0xFF).astype(jnp.uint8) for i in range(nbytes)], axis=-1)


def _from_le_bytes(b: jax.Array, dtype) -> jax.Array:
    """Little-endian bytes [..., nbytes] (uint8) as words [...] of the unsigned dtype (uint16, uint32)."""
    w = jnp.zeros(b.shape[:-1], jnp.uint32)
    for i in range(b.shape[-1]):
        w = w | (b[..., i].astype(jnp.uint32) << (8 * i))
    return w.astype(dtype)


def quantize_latent(latent, kv_format: str, scale=None, *, d_r: int = 64):
    """Packs latents into an FP8 cache format (layouts and rounding: the module docstring).

    latent [..., d_v + d_r] (bfloat16, float16 or float32; 576 for DeepSeek), with d_r k_pe values last.
      "fp8_blockscale": returns packed uint8 [..., 656] (d_v + 4 d_v/128 + 2 d_r), one float32 scale per
        128 c_kv values of each token; k_pe is rounded to bfloat16 (exact for a bfloat16 latent). `scale`
        must be None: every token carries its own scales, so appends need nothing from the cache.
      "fp8_pertensor": returns (packed uint8 [..., d_v + d_r], scale float32 []). With scale=None the scale
        is computed from this latent: max(amax · fl(1/448), 2^-126) over all its values. With a given scale (a
        float32 scalar; e.g. the cache's, fixed when it was created), that scale is used and returned as a
        0-d float32 array: this is how an append quantizes new tokens into an existing cache. Values
        beyond ±448 · scale saturate there. The scale must be a positive, finite, normal float32 (not
        checked: it may be traced).
    Raises TypeError for a non-float latent, a non-string kv_format, a non-int d_r or a scale of the wrong
    type; ValueError for an unknown kv_format, a last axis the format cannot split (blockscale: d_v a
    multiple of 128), or a blockscale scale.
    """
    _checks.kv_format("kv_format", kv_format, required=True)
    d_r = _checks.integer("d_r", d_r, lo=0)
    latent = _check_latent(latent)
    width = latent.shape[-1]
    if width <= d_r:
        raise ValueError(f"latent's last axis ({width}) must be d_v + d_r with d_v ≥ 1 and d_r = {d_r}")
    fmt = latent_format(kv_format, width - d_r, d_r)
    x = latent.astype(jnp.float32)
    if fmt.per_tensor_scale:
        scale = _scale_of(jnp.max(jnp.abs(x))) if scale is None else _check_scale(scale)
        return _to_e4m3_bytes(x, scale), scale
    if scale is not None:
        raise ValueError("scale must be None for fp8_blockscale: each token carries its own scales")
    lead = x.shape[:-1]
    groups = x[..., :fmt.d_v].reshape(*lead, fmt.num_scales, fmt.group_size)
    scales = _scale_of(jnp.max(jnp.abs(groups), axis=-1))                       # [..., d_v / 128]
    c_kv = _to_e4m3_bytes(groups, scales[..., None]).reshape(*lead, fmt.d_v)
    scale_bytes = _le_bytes(jax.lax.bitcast_convert_type(scales, jnp.uint32), 4).reshape(*lead, 4 * fmt.num_scales)
    k_pe = latent[..., fmt.d_v:].astype(jnp.bfloat16)
    rope_bytes = _le_bytes(jax.lax.bitcast_convert_type(k_pe, jnp.uint16), 2).reshape(*lead, 2 * fmt.d_r)
    return jnp.concatenate([c_kv, scale_bytes, rope_bytes], axis=-1)


def dequantize_latent(packed, kv_format: str, scale=None, dtype=jnp.bfloat16, *, d_r: int = 64) -> jax.Array:
    """Unpacks an FP8 cache into latents [..., d_v + d_r] of `dtype` (576 wide for DeepSeek).

    packed uint8 [..., bytes_per_token] (656 for "fp8_blockscale", 576 for "fp8_pertensor"; d_v is derived
    from it and d_r). c_kv = float(e4m3) * scale is computed in float32, then cast to dtype (rounded to
    nearest even); blockscale k_pe is the stored bfloat16 cast to dtype. "fp8_pertensor" needs `scale`
    (the float32 scale quantize_latent returned); "fp8_blockscale" reads its scales from the bytes and
    takes scale=None. Bytes 0x7F / 0xFF (e4m3 NaN) give NaN; a blockscale token holding NaN or infinite
    scales gives NaN / inf in its c_kv.
    Raises TypeError for a non-uint8 packed, a non-float dtype, a non-string kv_format or a non-int d_r;
    ValueError for an unknown kv_format, a last axis no d_v fits, or a missing / extra scale.
    """
    _checks.kv_format("kv_format", kv_format, required=True)
    d_r = _checks.integer("d_r", d_r, lo=0)
    if not hasattr(packed, "dtype") or not hasattr(packed, "shape"):
        raise TypeError(f"packed must be a uint8 array [..., bytes_per_token], not {type(packed).__name__}")
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8 (the raw bytes; bitcast a float8_e4m3fn array with "
                        f"jax.lax.bitcast_convert_type(x, jnp.uint8)), not {packed.dtype}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"dtype must be a float dtype, not {dtype}")
    if packed.ndim < 1:
        raise ValueError("packed must have a last axis of bytes_per_token bytes, not be 0-d")
    packed = jnp.asarray(packed)
    width = packed.shape[-1]
    if kv_format == "fp8_blockscale":
        # width = d_v + 4 d_v / 128 + 2 d_r = 33 d_v / 32 + 2 d_r
        d_v = (width - 2 * d_r) * 32 // 33 if width > 2 * d_r else 0
        if d_v <= 0 or d_v % BLOCKSCALE_GROUP or d_v * 33 // 32 + 2 * d_r != width:
            raise ValueError(f"packed's last axis ({width} bytes) is not an fp8_blockscale token with d_r = "
                             f"{d_r} (512 / 64 gives 656)")
        fmt = latent_format(kv_format, d_v, d_r)
        if scale is not None:
            raise ValueError("scale must be None for fp8_blockscale: the scales are in the bytes")
        lead = packed.shape[:-1]
        codes = _from_e4m3_bytes(packed[..., :fmt.d_v]).reshape(*lead, fmt.num_scales, fmt.group_size)
        scale_bytes = packed[..., fmt.scale_offset:fmt.rope_offset].reshape(*lead, fmt.num_scales, 4)
        scales = jax.lax.bitcast_convert_type(_from_le_bytes(scale_bytes, jnp.uint32), jnp.float32)
        c_kv = (codes * scales[..., None]).reshape(*lead, fmt.d_v).astype(dtype)
        rope_words = _from_le_bytes(packed[..., fmt.rope_offset:].reshape(*lead, fmt.d_r, 2), jnp.uint16)
        k_pe = jax.lax.bitcast_convert_type(rope_words, jnp.bfloat16).astype(dtype)
        return jnp.concatenate([c_kv, k_pe], axis=-1)
    if width <= d_r:
        raise ValueError(f"packed's last axis ({width}) must be d_v + d_r with d_v ≥ 1 and d_r = {d_r}")
    if scale is None:
        raise ValueError("fp8_pertensor needs scale (the cache's float32 scale that quantize_latent returned)")
    return (_from_e4m3_bytes(packed) * _check_scale(scale)).astype(dtype)


# ---------------------------------------------------------------- the lightning indexer's key cache
#
# The indexer keeps one key of INDEX_KEY_DIM (128) values per token, beside the latent, paged under the same
# block table. Its kv_format:
#
# - None: the keys in a float dtype, [num_blocks, page_size, 128] (bf16: 256 bytes a token).
# - "fp8_paged": DeepGEMM's paged layout (`fp8_paged_mqa_logits`), stored as uint8 [num_blocks, page_size * 132].
#   Page p holds its page_size tokens as
#
#       [0, 128 P)           token i's 128 values as float8_e4m3fn at [128 i, 128 (i + 1)), tokens in order
#       [128 P, 132 P)       token i's float32 scale, little-endian, at [128 P + 4 i, 128 P + 4 (i + 1))
#
#   key[i, j] = float(e4m3 byte) * scale[i]: one scale per token (per 128 values), chosen, rounded and saturated
#   as the latent formats' groups are (the module docstring: max(amax · fl(1/448), 2^-126), round to nearest
#   even, clip to ±448). Every page is 132 P bytes, so with P a multiple of 4 the scales stay 4-byte aligned.
#   A contiguous cache [B, N, 128] is the same layout with one page of N tokens per sequence: [B, N * 132].

INDEX_KEY_DIM = 128
_INDEX_TOKEN_BYTES = INDEX_KEY_DIM + 4      # 128 e4m3 values and one float32 scale


def index_page_bytes(page_size: int, kv_format: str = "fp8_paged") -> int:
    """Bytes of one "fp8_paged" page of `page_size` indexer keys: 132 * page_size (8448 for 64 tokens)."""
    _checks.index_kv_format("kv_format", kv_format, required=True)
    return _checks.integer("page_size", page_size, lo=1) * _INDEX_TOKEN_BYTES


def quantize_index_tokens(x) -> tuple[jax.Array, jax.Array]:
    """Rows of 128 values [..., 128] (float) -> (codes uint8 [..., 128] float8_e4m3fn bytes, scales float32 [...]).

    One scale per row, by the rules of the module docstring: x ≈ float(codes) * scales[..., None]. This is the
    per-token quantization of the "fp8_paged" keys (before they are laid out in pages) and of the indexer's
    queries, one scale per (token, head) as DeepSeek's inference code quantizes them."""
    x = _check_latent(x, "x", str(INDEX_KEY_DIM))
    if x.shape[-1] != INDEX_KEY_DIM:
        raise ValueError(f"x must be [..., {INDEX_KEY_DIM}], got shape {tuple(x.shape)}")
    x = x.astype(jnp.float32)
    scales = _scale_of(jnp.max(jnp.abs(x), axis=-1))
    return _to_e4m3_bytes(x, scales[..., None]), scales


def quantize_index_keys(keys, kv_format: str = "fp8_paged") -> jax.Array:
    """Pages of indexer keys [..., P, 128] (float) -> uint8 [..., P * 132] in the "fp8_paged" layout (above).

    keys [num_blocks, page_size, 128] gives a paged cache [num_blocks, page_size * 132]; a contiguous
    [B, N, 128] gives [B, N * 132] (one page per sequence). Raises TypeError for a non-float input,
    ValueError for an unknown kv_format or a shape that is not [..., P, 128]."""
    _checks.index_kv_format("kv_format", kv_format, required=True)
    keys = _check_latent(keys, "keys", str(INDEX_KEY_DIM))
    if keys.ndim < 2 or keys.shape[-1] != INDEX_KEY_DIM:
        raise ValueError(f"keys must be [..., page_size, {INDEX_KEY_DIM}], got shape {tuple(keys.shape)}")
    codes, scales = quantize_index_tokens(keys)
    lead, p = keys.shape[:-2], keys.shape[-2]
    scale_bytes = _le_bytes(jax.lax.bitcast_convert_type(scales, jnp.uint32), 4)            # [..., P, 4]
    return jnp.concatenate([codes.reshape(*lead, p * INDEX_KEY_DIM), scale_bytes.reshape(*lead, p * 4)], axis=-1)


def dequantize_index_keys(packed, kv_format: str = "fp8_paged", dtype=jnp.float32) -> jax.Array:
    """uint8 pages [..., P * 132] in the "fp8_paged" layout -> keys [..., P, 128] of `dtype` (float32 default).

    float(e4m3) * scale in float32, then cast. Bytes 0x7F / 0xFF (e4m3 NaN) give NaN, a NaN or infinite scale
    NaN / inf in its token. Raises TypeError for a non-uint8 packed or non-float dtype, ValueError for an
    unknown kv_format or a last axis that is not a multiple of 132."""
    _checks.index_kv_format("kv_format", kv_format, required=True)
    if not hasattr(packed, "dtype") or not hasattr(packed, "shape"):
        raise TypeError(f"packed must be a uint8 array [..., page_size * 132], not {type(packed).__name__}")
    if packed.dtype != jnp.uint8:
        raise TypeError(f"packed must be uint8 (the raw bytes), not {packed.dtype}")
    if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
        raise TypeError(f"dtype must be a float dtype, not {dtype}")
    width = packed.shape[-1] if packed.ndim else 0
    if width == 0 or width % _INDEX_TOKEN_BYTES:
        raise ValueError(f"packed's last axis must be page_size * {_INDEX_TOKEN_BYTES} bytes, got shape "
                         f"{tuple(packed.shape)}")
    codes, scales = index_key_codes(packed)
    return (codes * scales[..., None]).astype(dtype)


def index_key_codes(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 pages [..., P * 132] in the "fp8_paged" layout (checked by the caller) -> (the e4m3 values as
    float32 [..., P, 128], exact; the per-token scales float32 [..., P]): key = values * scales[..., None]."""
    packed = jnp.asarray(packed)
    lead, p = packed.shape[:-1], packed.shape[-1] // _INDEX_TOKEN_BYTES
    codes = _from_e4m3_bytes(packed[..., :p * INDEX_KEY_DIM]).reshape(*lead, p, INDEX_KEY_DIM)
    words = _from_le_bytes(packed[..., p * INDEX_KEY_DIM:].reshape(*lead, p, 4), jnp.uint32)
    return codes, jax.lax.bitcast_convert_type(words, jnp.float32)


def write_index_keys(pages, keys, blocks, slots, kv_format: str | None = None) -> jax.Array:
    """Indexer keys of T new tokens written into a paged key cache; returns the updated pages (pure, jit-safe).

    pages: [num_blocks, page_size, 128] float (kv_format None) or uint8 [num_blocks, page_size * 132]
    ("fp8_paged"); keys: [T, 128] float; blocks, slots: [T] int32, token i goes to (blocks[i], slots[i]), as the
    latent cache places it (block_table[b, t // page_size], t % page_size). FP8: quantized token by token as
    `quantize_index_tokens`, its 128 codes and its 4 scale bytes written where the layout keeps them. Indices
    out of range follow `.at[].set`'s rule (dropped); a donated pages buffer is updated in place under jit."""
    keys = _check_latent(keys, "keys", str(INDEX_KEY_DIM))
    if keys.ndim != 2 or keys.shape[-1] != INDEX_KEY_DIM:
        raise ValueError(f"keys must be [T, {INDEX_KEY_DIM}], got shape {tuple(keys.shape)}")
    if kv_format is None:
        return pages.at[blocks, slots].set(keys.astype(pages.dtype), mode="drop")
    _checks.index_kv_format("kv_format", kv_format, required=True)
    if pages.dtype != jnp.uint8 or pages.ndim != 2 or pages.shape[1] % _INDEX_TOKEN_BYTES:
        raise ValueError(f"pages must be uint8 [num_blocks, page_size * {_INDEX_TOKEN_BYTES}] for {kv_format!r}, "
                         f"got {pages.dtype} {tuple(pages.shape)}")
    page_size = pages.shape[1] // _INDEX_TOKEN_BYTES
    codes, scales = quantize_index_tokens(keys)
    scale_bytes = _le_bytes(jax.lax.bitcast_convert_type(scales, jnp.uint32), 4)              # [T, 4]
    code_cols = slots[:, None] * INDEX_KEY_DIM + jnp.arange(INDEX_KEY_DIM)[None, :]
    scale_cols = page_size * INDEX_KEY_DIM + slots[:, None] * 4 + jnp.arange(4)[None, :]
    pages = pages.at[blocks[:, None], code_cols].set(codes, mode="drop")
    return pages.at[blocks[:, None], scale_cols].set(scale_bytes, mode="drop")
