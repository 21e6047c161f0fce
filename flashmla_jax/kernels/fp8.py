"""Device-side reading of the FP8 latent caches (flashmla_jax/fp8.py has the byte layouts): e4m3 bytes to
float32, and loaders of one key tile of a "fp8_blockscale" or "fp8_pertensor" cache, dequantized.

The caches reach a kernel as uint8 pointers (raw bytes): jax-triton and Triton's interpreter both take
uint8 arrays as they are. Float32 scales and bfloat16 k_pe are read through pointer casts,
`(byte_ptr + offset).to(tl.pointer_type(tl.float32))`: a 656-byte token keeps its scales 4-byte and its
k_pe 2-byte aligned (656, 512 and 528 are multiples of 16).

Two ways to decode e4m3, chosen by the constexpr FP8_NATIVE:
- True: bitcast the uint8 tile to tl.float8e4nv and convert (`.to(tl.float32)`); on Hopper this is the
  hardware conversion. For the GPU.
- False: bit arithmetic on the byte (sign, 4-bit exponent with bias 7, 3-bit mantissa, subnormals at
  exponent 0, 0x7F / 0xFF are NaN). Exact for all 256 patterns; for the interpreter and as a reference.

What Triton 3.6's interpreter does with float8 (checked on all 256 patterns against ml_dtypes'
float8_e4m3fn): the bitcast to tl.float8e4nv and `.to(tl.float32)` run, and give every finite value
exactly (subnormals, ±0 included), but 0x7F / 0xFF decode to ±480 instead of NaN (its converter has
no NaN case for e4m3fn). Caches written by `quantize_latent` never hold those bytes (it saturates at
±448), and the loaders' masks keep bytes of unused tokens out, so either path reads our caches the same;
the bit-arithmetic path is the one that matches float8_e4m3fn everywhere. Also seen in the interpreter:
pointer casts from uint8 to float32 / bfloat16 pointers load correctly. Its own `.to(tl.bfloat16)` from float32
truncates, but interpreted launches (ops/_launch.py) patch that cast to round to nearest even as the GPU does,
so interpreted bfloat16 tiles equal `dequantize_latent(..., dtype=bfloat16)` exactly, as float32 tiles do.

How the decode kernel's tile step uses them (kv_rows, tokens, hi as in `_attend_tile`; kv_ptr a uint8
pointer, already offset to the layer):

    k_v, k_r = load_blockscale_tile(kv_ptr, kv_rows, tokens < hi, D_V, D_R, q_v.dtype, FP8_NATIVE, MASKED)
    k_v, k_r = load_pertensor_tile(kv_ptr, kv_rows, tokens < hi, kv_scale, D_V, D_R, q_v.dtype, FP8_NATIVE,
                                   MASKED)                       # kv_scale = tl.load(scale_ptr), once

in place of the two `tl.load`s; the products and `p.to(k_v.dtype)` stay as they are. FP8_NATIVE=True is the
GPU path (checked against the reference on the H100 by tests/test_fp8.py's GPU tests); its speed is
below the bf16 kernel's (benchmarks/NOTES.md).
"""
import triton
import triton.language as tl

BLOCKSCALE_GROUP = tl.constexpr(128)   # c_kv values per float32 scale in "fp8_blockscale"


@triton.jit
def e4m3_to_float32(bits, FP8_NATIVE: tl.constexpr):
    """float8_e4m3fn bytes (uint8, any shape) as float32 values of the same shape.

    FP8_NATIVE: the float8e4nv conversion (GPU); else exact bit arithmetic (interpreter-safe, NaN for
    0x7F / 0xFF)."""
    if FP8_NATIVE:
        out = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        b = bits.to(tl.uint32)
        sign = b >> 7
        exp = (b >> 3) & 15
        man = b & 7
        # A normal e4m3 value 2^(exp-7) (1 + man/8) is the float32 with exponent exp - 7 + 127 and the
        # mantissa's 3 bits on top of float32's 23.
        normal = ((sign << 31) | ((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
        # Exponent 0: man * 2^-9, the sign or-ed in (a negation, 0 - x in Triton, would lose -0.0).
        sub = ((man.to(tl.float32) * 0.001953125).to(tl.uint32, bitcast=True) | (sign << 31)).to(tl.float32,
                                                                                                  bitcast=True)
        out = tl.where(exp == 0, sub, normal)
        nan = ((sign << 31) | 0x7FC00000).to(tl.float32, bitcast=True)   # a quiet NaN with the byte's sign
        out = tl.where((b & 127) == 127, nan, out)
    return out


@triton.jit
def load_blockscale_tile(kv_ptr, rows, valid, D_V: tl.constexpr, D_R: tl.constexpr, OUT_DTYPE: tl.constexpr,
                         FP8_NATIVE: tl.constexpr, MASKED: tl.constexpr):
    """Tokens `rows` of an "fp8_blockscale" cache, dequantized: (k_v [BLOCK_N, D_V], k_r [BLOCK_N, D_R]),
    both OUT_DTYPE.

    kv_ptr: uint8 pointer to token 0 (tokens are D_V + 4 D_V/128 + 2 D_R bytes apart: 656).
    rows [BLOCK_N] int: token indices (b * N_MAX + t contiguous, page * PAGE_SIZE + slot paged); int64
    when they may pass 2^31 / 656. valid [BLOCK_N] bool: with MASKED, tokens not valid are not read and
    give zeros (whatever their bytes: NaN patterns, infinite scales); without MASKED it is ignored.
    k_v = e4m3 * scale[token, column // 128], computed in float32, then cast; k_r is the stored bfloat16
    k_pe, cast. D_V / 128 must be a power of two (512 gives 4)."""
    NUM_SCALES: tl.constexpr = D_V // BLOCKSCALE_GROUP
    tl.static_assert(NUM_SCALES * BLOCKSCALE_GROUP == D_V and (NUM_SCALES & (NUM_SCALES - 1)) == 0,
                     "fp8_blockscale: D_V must be 128 times a power of two")
    TOKEN_BYTES: tl.constexpr = D_V + 4 * NUM_SCALES + 2 * D_R
    tok = kv_ptr + rows[:, None] * TOKEN_BYTES                                # [BLOCK_N, 1] uint8 pointers
    scale_ptr = (tok + D_V).to(tl.pointer_type(tl.float32))
    rope_ptr = (tok + D_V + 4 * NUM_SCALES).to(tl.pointer_type(tl.bfloat16))
    offs_v = tl.arange(0, D_V)[None, :]
    offs_s = tl.arange(0, NUM_SCALES)[None, :]
    offs_r = tl.arange(0, D_R)[None, :]
    if MASKED:
        keep = valid[:, None]
        codes = tl.load(tok + offs_v, mask=keep, other=0)
        scales = tl.load(scale_ptr + offs_s, mask=keep, other=0.0)
        k_r = tl.load(rope_ptr + offs_r, mask=keep, other=0.0)
    else:
        codes = tl.load(tok + offs_v)
        scales = tl.load(scale_ptr + offs_s)
        k_r = tl.load(rope_ptr + offs_r)
    block_n: tl.constexpr = codes.shape[0]
    # One scale per 128 columns: broadcast over a [BLOCK_N, NUM_SCALES, 128] view instead of loading a
    # [BLOCK_N, D_V] tile of repeated scales.
    vals = tl.reshape(e4m3_to_float32(codes, FP8_NATIVE), (block_n, NUM_SCALES, BLOCKSCALE_GROUP))
    k_v = tl.reshape(vals * scales[:, :, None], (block_n, D_V))
    return k_v.to(OUT_DTYPE), k_r.to(OUT_DTYPE)


@triton.jit
def load_pertensor_tile(kv_ptr, rows, valid, scale, D_V: tl.constexpr, D_R: tl.constexpr,
                        OUT_DTYPE: tl.constexpr, FP8_NATIVE: tl.constexpr, MASKED: tl.constexpr):
    """Tokens `rows` of an "fp8_pertensor" cache, dequantized: (k_v [BLOCK_N, D_V], k_r [BLOCK_N, D_R]),
    both OUT_DTYPE, = e4m3 * scale computed in float32.

    kv_ptr: uint8 pointer to token 0 (tokens D_V + D_R = 576 bytes apart); rows, valid, MASKED as in
    load_blockscale_tile; scale: the cache's float32 scale (a scalar the caller loaded once). Pass 1.0
    to get the raw e4m3 values, e.g. to fold the scale into the query and the output instead."""
    TOKEN_BYTES: tl.constexpr = D_V + D_R
    tok = kv_ptr + rows[:, None] * TOKEN_BYTES
    offs_v = tl.arange(0, D_V)[None, :]
    offs_r = tl.arange(0, D_R)[None, :]
    if MASKED:
        keep = valid[:, None]
        codes_v = tl.load(tok + offs_v, mask=keep, other=0)
        codes_r = tl.load(tok + D_V + offs_r, mask=keep, other=0)
    else:
        codes_v = tl.load(tok + offs_v)
        codes_r = tl.load(tok + D_V + offs_r)
    k_v = e4m3_to_float32(codes_v, FP8_NATIVE) * scale
    k_r = e4m3_to_float32(codes_r, FP8_NATIVE) * scale
    return k_v.to(OUT_DTYPE), k_r.to(OUT_DTYPE)
