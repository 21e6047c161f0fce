"""The Hopper Gluon decode kernel compiled for sm_90 on this machine (Triton's interpreter cannot run Gluon):
every class it serves compiles, and the compiler's facts are what the design needs — tensor-core products
(HGMMA) and TMA copies in the SASS, no spills, shared memory within the 227 KB an sm_90 program may take, and
the 12 warps of its three partitions (the producer's 4 launched, the two consumer warpgroups added)."""
import os
import re
import sys

import jax.numpy as jnp
import pytest
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from flashmla_jax.kernels import _compile
from flashmla_jax.kernels import gluon_decode
from flashmla_jax.ops import decode as decode_ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import compile_report  # noqa: E402

CLASSES = {   # name: (B, S_q, H, N, options)
    "16 rows (D1)": (128, 1, 16, 4096, {}),
    "16 rows paged, split (D1-paged)": (64, 1, 16, 4096, dict(paged=True)),
    "one long sequence, many splits (D3)": (1, 1, 16, 65536, {}),
    "128 heads (D5), stacked": (128, 1, 128, 4096, dict(layers=4)),
    "MTP S_q 2 (D6), fp16": (64, 2, 128, 8192, dict(dtype=jnp.float16)),
    "chunked prefill (C1), not causal": (1, 1024, 16, 16384, dict(causal=False)),
    "128 heads (D5), fp8_blockscale": (128, 1, 128, 4096, dict(kv_format="fp8_blockscale")),
    "16 rows paged, split, fp8_blockscale": (64, 1, 16, 4096, dict(paged=True, kv_format="fp8_blockscale")),
    "MTP S_q 2 (D6), stacked, fp8_blockscale": (64, 2, 128, 8192, dict(layers=2, kv_format="fp8_blockscale")),
    "16 rows paged, split, fp8_pertensor, fp16": (64, 1, 16, 4096, dict(paged=True, kv_format="fp8_pertensor",
                                                                       dtype=jnp.float16)),
    "128 heads (D5), stacked, fp8_pertensor": (128, 1, 128, 4096, dict(layers=2, kv_format="fp8_pertensor")),
}
# kernels/gluon_narrow_decode.py: the keys as the wgmma M side for at most 32 query rows.
NARROW_CLASSES = {   # name: (B, S_q, H, N, options)
    "16 rows (D1)": (128, 1, 16, 4096, {}),
    "16 rows paged, split (D2-paged)": (64, 1, 16, 16384, dict(paged=True)),
    "one long sequence, many splits (D3)": (1, 1, 16, 65536, {}),
    "32 rows (S_q 2), stacked": (64, 2, 16, 8192, dict(layers=2)),
    "32 rows (S_q 2), paged": (64, 2, 16, 8192, dict(paged=True)),
    "32 heads, fp16, not causal": (8, 1, 32, 4096, dict(dtype=jnp.float16, causal=False)),
    "16 rows (D1), fp8_blockscale": (128, 1, 16, 4096, dict(kv_format="fp8_blockscale")),
    "16 rows paged, split, fp8_blockscale": (64, 1, 16, 4096, dict(paged=True, kv_format="fp8_blockscale")),
    "16 rows, stacked, fp8_pertensor": (128, 1, 16, 4096, dict(layers=2, kv_format="fp8_pertensor")),
    "16 rows paged, fp8_pertensor, fp16": (64, 1, 16, 4096, dict(paged=True, kv_format="fp8_pertensor",
                                                                dtype=jnp.float16)),
}


@pytest.mark.parametrize("name", list(CLASSES))
def test_gluon_decode_compiles_for_hopper(name):
    b, s_q, h, n, options = CLASSES[name]
    options = dict(options)
    compiled, plan = compile_report.compile_gluon_kernel((b, s_q, h, n), options.pop("dtype", jnp.bfloat16), **options)
    facts = _compile.facts(compiled)
    # FP8: the consumer groups also dequantize the blocks they score (kernels/gluon_decode.py's `_slot_scores`), and
    # a few of their values wait on the stack, read once a key block, not in the products or the softmax. The bf16
    # classes spill nothing.
    fp8 = bool(options.get("kv_format"))
    assert facts.stack <= (64 if fp8 else 0), f"{facts.stack} bytes of spills"
    assert facts.shared <= _compile.SHARED_MEMORY_LIMIT
    assert facts.num_warps == 12
    assert facts.count("HGMMA") > 0 and facts.count("UTMALDG") > 0 and facts.count("UTMASTG") > 0
    if fp8:
        # The consumers dequantize: the e4m3 pairs converted by the hardware, 256 codes a thread per block.
        assert facts.count("F2FP.F16.E4M3.UNPACK_B") >= 128
        # ... and never one value at a time on the slow pipe (fp16 -> bf16 compiles to one F2F a value).
        assert facts.count("F2F.BF16.F16") == 0
        # An fp8_pertensor tile is fp16 (a bf16 query rewritten once per program): the unpack is the whole
        # conversion. A blockscale value goes through float32 (code times scale, rounded to bf16 once).
        assert (facts.count("HADD2.F32") == 0) == (options["kv_format"] == "fp8_pertensor")
    # An FP8 cache's producer asks L2 for key blocks ahead of their loads (bulk prefetches); bf16 ones do not.
    assert (facts.count("UBLKPF.L2") > 0) == fp8
    # Descriptors built on the device, 128 B each: query and key pairs, the output, a partial's, a paged tail pair;
    # an fp8_blockscale cache's keys take three (rope, scales, the codes as [group, token, byte]), and so does its
    # tail; an fp8_pertensor cache's two (rope codes, codes).
    paged = bool(options.get("paged"))
    blockscale = options.get("kv_format") == "fp8_blockscale"
    descriptors = 5 + (plan.num_splits > 1) + 2 * paged + (1 + paged) * blockscale
    assert facts.global_scratch == 128 * descriptors


@pytest.mark.parametrize("name", list(NARROW_CLASSES))
def test_gluon_narrow_decode_compiles_for_hopper(name):
    b, s_q, h, n, options = NARROW_CLASSES[name]
    options = dict(options)
    compiled, plan = compile_report.compile_gluon_kernel((b, s_q, h, n), options.pop("dtype", jnp.bfloat16),
                                                         narrow=True, **options)
    facts = _compile.facts(compiled)
    rows = 16 if s_q * h <= 16 else 32
    paged = bool(options.get("paged"))
    kv_format = options.get("kv_format")
    assert decode_ops.uses_narrow_kernel(s_q * h, kv_format)           # a class GluonDecode runs on this kernel
    # 32 rows take 240 registers a consumer thread, which leaves the paged producer 24 and a value that
    # waits on the stack once a block. With an FP8 cache the consumers (232 registers) keep a few values of their
    # loop on the stack, read and written once a block: pertensor 32 bytes (48 paged), blockscale, which also
    # holds its block's scales and power of two, 112 (152 paged); nothing else spills.
    if kv_format:
        spills = {("fp8_pertensor", False): 32, ("fp8_pertensor", True): 48, ("fp8_blockscale", False): 112,
                  ("fp8_blockscale", True): 152}[kv_format, paged]
    else:
        spills = 8 if paged and rows == 32 else 0
    assert facts.stack <= spills, f"{facts.stack} bytes of spills"
    assert facts.shared <= _compile.SHARED_MEMORY_LIMIT
    assert facts.num_warps == 12
    # The products: m64 n16 (or n32) k16 wgmma only, none padded to 64 rows.
    assert set(re.findall(r"HGMMA\.\d+x\d+x\d+", facts.sass)) == {f"HGMMA.64x{rows}x16"}
    assert facts.count("UTMALDG") > 0
    # An HGMMA whose A operand comes from registers names a register before its shared-memory descriptor.
    from_registers = len(re.findall(r"HGMMA\.\S+ R\d+, R\d+, gdesc", facts.sass))
    if kv_format:
        # The codes go from the raw stages straight into both products' A operands in registers, each converted
        # by the hardware e4m3 pair unpack to fp16, twice a block (no float32 round trip, no bf16 pack): every
        # HGMMA of both consumer groups takes A from registers but a blockscale cache's rope products (its bf16
        # values, read from shared memory: 4 a group); blockscale codes take their scales by one fp16 multiply
        # a pair.
        from_shared = 8 if kv_format == "fp8_blockscale" else 0
        assert facts.count("HGMMA") == 136 and from_registers == 136 - from_shared
        assert facts.count("F2FP.F16.E4M3.UNPACK_B") >= 512
        assert facts.count("HADD2.F32") == 0 and facts.count("F2F.BF16.F16") == 0
        assert (facts.count("HMUL2") >= 512) == (kv_format == "fp8_blockscale")
        assert facts.count("UBLKPF.L2") == 0
    else:
        assert from_registers == 0
    # Device-side descriptors, 128 B each: the query pair, and the key descriptors of the cache (a pair; FP8:
    # rope and codes, and a blockscale cache's scales), again for a paged tail.
    keys = 2 if kv_format != "fp8_blockscale" else 3
    assert facts.global_scratch == 128 * (2 + keys * (1 + paged))


SPARSE_CLASSES = {   # name: (B, S_q, H, topk, pool tokens, options)
    "S1: 128 heads, MTP, fp8_blockscale": (128, 2, 128, 2048, 128 * 32768, dict(kv_format="fp8_blockscale")),
    "S3: 64 heads, split, stacked fp8_blockscale": (8, 1, 64, 2048, 1 << 22, dict(kv_format="fp8_blockscale",
                                                                               layers=2)),
    "128 heads, bf16 pool": (64, 1, 128, 2048, 1 << 20, {}),
    "SP: the prefill's max_logits, bf16": (4096, 1, 128, 2048, 32768, dict(with_max=True)),
}


@pytest.mark.parametrize("name", list(SPARSE_CLASSES))
def test_gluon_sparse_decode_compiles_for_hopper(name):
    """kernels/gluon_sparse_decode.py: the gathering producer's cp.async in 16-byte pieces, the slots released by
    the copies' arrivals, an FP8 pool dequantized by the consumer groups (never a value at a time through fp16 ->
    bf16), the dense kernel's products, no spills, shared memory within the limit, 12 warps; device-side
    descriptors only for the query pair and the outputs (the keys are gathered)."""
    b, s_q, h, topk, tokens, options = SPARSE_CLASSES[name]
    options = dict(options)
    kv_format = options.get("kv_format")
    compiled, plan = compile_report.compile_sparse_kernel((b, s_q, h, topk, tokens), jnp.bfloat16, kv_format,
                                                          options.get("with_max", False), gluon=True,
                                                          layers=options.get("layers", 0))
    facts = _compile.facts(compiled)
    assert facts.stack == 0, f"{facts.stack} bytes of spills"
    assert facts.shared <= _compile.SHARED_MEMORY_LIMIT
    assert facts.num_warps == 12
    assert facts.count("HGMMA") > 0 and facts.count("UTMASTG") > 0
    assert set(re.findall(r"(?<![\w.])LDGSTS\S*", facts.sass)) == {"LDGSTS.E.BYPASS.128"}
    # Every block is released to the consumers by its copies' own arrivals (one a producer thread); in q's dtype
    # once for its first four boxes and once for all of it, raw FP8 once (the consumers convert it).
    assert facts.count("ARRIVES.LDGSTSBAR.64.ARVCNT") == (1 if kv_format else 2)
    if kv_format:
        assert facts.count("F2FP.F16.E4M3.UNPACK_B") >= 128 and facts.count("F2F.BF16.F16") == 0
    assert facts.global_scratch == 128 * (3 + (plan.num_splits > 1))


@gluon.jit
def _fp8_traffic_probe(x_ptr):
    """Compiles only if the FP8 producer's shared-memory accesses meet no bank conflicts (the compiler's count)."""
    codes_l: gl.constexpr = gluon_decode._code_layout()
    rope_l: gl.constexpr = gluon_decode._rope_code_layout()
    bytes128: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    bytes64: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=64, element_bitwidth=8, rank=2)
    halves: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    codes = gl.allocate_shared_memory(gl.uint8, [64, 128], bytes128)           # a group's codes, as TMA'd
    group = gl.allocate_shared_memory(gl.bfloat16, [64, 128], halves)          # its values in the tile
    rope_codes = gl.allocate_shared_memory(gl.uint8, [64, 64], bytes64)        # pertensor rope codes
    rope = gl.allocate_shared_memory(gl.bfloat16, [64, 64], halves)
    gl.static_assert(gl.bank_conflicts(gl.full([64, 128], 0, gl.uint8, codes_l).type, codes.type) == 0)
    gl.static_assert(gl.bank_conflicts(gl.full([64, 128], 0, gl.bfloat16, codes_l).type, group.type) == 0)
    gl.static_assert(gl.bank_conflicts(gl.full([64, 64], 0, gl.uint8, rope_l).type, rope_codes.type) == 0)
    gl.static_assert(gl.bank_conflicts(gl.full([64, 64], 0, gl.bfloat16, rope_l).type, rope.type) == 0)


def test_fp8_conversion_meets_no_bank_conflicts():
    """The FP8 producer reads each group's codes and writes its bf16 values (and a pertensor block's rope) in
    layouts that gl.bank_conflicts counts no conflict for: every shared-memory wavefront does full work."""
    _compile.compile_for_hopper(_fp8_traffic_probe, {"x_ptr": "fp32"}, {}, 4)
