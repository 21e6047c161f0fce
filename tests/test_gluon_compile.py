"""The Hopper Gluon decode kernel compiled for sm_90 on this machine (Triton's interpreter cannot run Gluon):
every class it serves compiles, and the compiler's facts are what the design needs — tensor-core products
(HGMMA) and TMA copies in the SASS, no spills, shared memory within the 227 KB an sm_90 program may take, and
the 12 warps of its three partitions (4 launched, 4 + 1 added; the 1-warp producer is padded to a warpgroup)."""
import jax.numpy as jnp
import pytest

from flashmla_jax.kernels import _compile
from flashmla_jax.kernels import gluon_decode
from flashmla_jax.ops import decode as decode_ops

SMS = 132
POINTERS = dict(q_ptr=None, kv_ptr=None, o_ptr=None, seqlens_ptr="i32", table_ptr="i32", layer_ptr="i32",
                kv_scale_ptr="fp32", splits_ptr="i32", count_ptr="i32", lse_ptr="fp32", o_part_ptr="fp32",
                lse_part_ptr="fp32")
CLASSES = {   # name: (B, S_q, H, N, options)
    "16 rows (D1)": (128, 1, 16, 4096, {}),
    "16 rows paged, split (D1-paged)": (64, 1, 16, 4096, dict(paged=True)),
    "one long sequence, many splits (D3)": (1, 1, 16, 65536, {}),
    "128 heads (D5), stacked": (128, 1, 128, 4096, dict(layers=4)),
    "MTP S_q 2 (D6), fp16": (64, 2, 128, 8192, dict(dtype="fp16")),
    "chunked prefill (C1), not causal": (1, 1024, 16, 16384, dict(causal=False)),
}


def compile_decode(b, s_q, h, n, paged=False, layers=0, causal=True, dtype="bf16"):
    jdtype = jnp.float16 if dtype == "fp16" else jnp.bfloat16
    kv_shape = (b * n // 64, 64, 576) if paged else (b, n, 576)
    table = (b, n // 64) if paged else None
    plan = decode_ops.plan_decode((b, s_q, h, 576), jdtype, 512, causal, kv_shape, table, None, SMS,
                                  tiles=decode_ops.DecodeTiles.with_defaults(64, 64, 4, 1), num_layers=layers)
    pointers = {k: v or dtype for k, v in POINTERS.items()}
    compiled = _compile.compile_for_hopper(gluon_decode.mla_decode_gluon_kernel, pointers, plan.constexprs,
                                           num_warps=4, scalar_types=dict(scale="fp32"))
    return _compile.facts(compiled), plan


@pytest.mark.parametrize("name", list(CLASSES))
def test_gluon_decode_compiles_for_hopper(name):
    b, s_q, h, n, options = CLASSES[name]
    facts, plan = compile_decode(b, s_q, h, n, **options)
    assert facts.stack == 0, f"{facts.stack} bytes of spills"
    assert facts.shared <= _compile.SHARED_MEMORY_LIMIT
    assert facts.num_warps == 12
    assert facts.count("HGMMA") > 0 and facts.count("UTMALDG") > 0 and facts.count("UTMASTG") > 0
    # Descriptors built on the device, 128 B each: query and key pairs, the output, a partial's, a paged tail pair.
    descriptors = 5 + (plan.num_splits > 1) + 2 * bool(options.get("paged"))
    assert facts.global_scratch == 128 * descriptors
