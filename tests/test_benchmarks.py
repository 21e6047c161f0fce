"""benchmarks/common.py, the module every benchmark shares: one row type, a printed table that leaves out the
columns a CPU cannot fill, ratios that say what they compare, bar plots."""
import dataclasses
import importlib
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def bench(monkeypatch):
    """(common, benchmark) imported as the scripts import them (their folder on sys.path)."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    return importlib.import_module("common"), importlib.import_module("benchmark")


def test_every_row_table_holds_one_row_type(bench):
    common, _ = bench
    tables = (common.DECODE_ROWS, common.PREFILL_ROWS, common.SPARSE_ROWS, common.INDEXER_ROWS,
              common.MULTI_GPU_ROWS)
    rows = [r for table in tables for r in table]
    assert all(type(r) is common.Row for r in rows)
    assert len({r.name for r in rows}) == len(rows)
    d1 = next(r for r in common.DECODE_ROWS if r.name == "D1")
    dp = next(r for r in common.MULTI_GPU_ROWS if r.name == "X-DP-D1")
    assert dataclasses.replace(dp, name="D1", layout="", devices=()) == d1        # X-DP-D1 is D1, sharded
    assert d1.reduced(batch=4, context=1024) == dataclasses.replace(d1, batch=4, context=1024)
    with pytest.raises(SystemExit, match="unknown rows"):
        common.select_rows(common.DECODE_ROWS, ["D9"])


def test_table_leaves_out_columns_without_values(bench, capsys):
    common, _ = bench
    results = [dict(row="D1", implementation="xla", ms=2.5, gpu_ms=None, tb_s=0.00137, speedup_vs_jnp=1.2),
               dict(row="D1", implementation="jnp", ms=3.0, gpu_ms=None, tb_s=0.0011, speedup_vs_jnp=None)]
    common.print_table(results, [("row", "row"), ("implementation", "impl")],
                       [("ms", "ms", ".4f"), ("gpu_ms", "gpu ms", ".4f"), ("tb_s", "TB/s", ".2f"),
                        ("speedup_vs_jnp", "vs jnp", ".2f")],
                       dict(gpu_ms="gpu ms: never printed here", speedup_vs_jnp="vs jnp: jnp's ms / this one's"))
    out = capsys.readouterr().out
    assert "gpu ms" not in out and "nan" not in out          # the GPU column is left out, with its note
    assert "0.00137" in out and " 0.00 " not in out          # a small rate keeps its digits
    assert "vs jnp: jnp's ms / this one's" in out
    lines = out.strip().splitlines()
    assert len({len(line) for line in lines[:2]}) == 1       # header and first row aligned


def test_fp8_ratio_says_what_it_compares(bench, capsys):
    _, benchmark = bench
    rows = [r for r in benchmark.ROWS if r.name in ("D1", "D1-fp8")]
    results = [dict(row="D1", implementation="jnp", ms=2.0), dict(row="D1-fp8", implementation="jnp", ms=8.0)]
    benchmark.print_fp8_speedups(results, rows, gpu=False)
    out = capsys.readouterr().out
    assert "bf16 ms / fp8 ms" in out and "jnp 2 / 8 ms = 0.25x" in out
    assert "dequantize the whole FP8 cache" in out           # on a CPU: why the ratio is not the kernels'


def test_plot_bars_draws_only_the_values_it_has(bench, tmp_path):
    pytest.importorskip("matplotlib")
    common, _ = bench
    values = {("D1", "triton"): 80.0, ("D1", "xla"): 20.0, ("D1-fp8", "xla"): 10.0, ("D1-fp8", "triton"): None}
    path = tmp_path / "plot.png"
    common.plot_bars([common.BarPanel("decode", "% of ceiling", values, reference=100),
                      common.BarPanel("empty", "nothing", {("D1", "xla"): None})], str(path))
    assert path.stat().st_size > 1000


def test_merged_rows_replace_whole_rows_in_place(bench, tmp_path, monkeypatch):
    """--merge: a row measured again replaces every implementation of it where it stood; the rows kept from the
    old JSON carry the ceilings of their own run."""
    common, _ = bench
    monkeypatch.setattr(common, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(common, "device_slug", lambda: "gpu")
    old = dict(read_bandwidth_tb_s=4.5, matmul_tflop_s=700.0,
               results=[dict(row=r, implementation=i, gpu_ms=1.0) for r in ("D1", "D2", "D3") for i in ("a", "b")])
    common.write_json("decode", old, str(tmp_path))
    fresh = dict(read_bandwidth_tb_s=4.6, matmul_tflop_s=710.0,
                 results=[dict(row="D2", implementation="a", gpu_ms=0.5), dict(row="D9", implementation="a", gpu_ms=2.0)])
    merged = common.merged_rows("decode", fresh)
    assert [(r["row"], r["implementation"], r["gpu_ms"]) for r in merged["results"]] == [
        ("D1", "a", 1.0), ("D1", "b", 1.0), ("D2", "a", 0.5), ("D3", "a", 1.0), ("D3", "b", 1.0), ("D9", "a", 2.0)]
    assert all(r["run_ceilings"] == dict(read_bandwidth_tb_s=4.5, matmul_tflop_s=700.0)
               for r in merged["results"] if r["row"] in ("D1", "D3"))
    assert all("run_ceilings" not in r for r in merged["results"] if r["row"] in ("D2", "D9"))
    assert merged["read_bandwidth_tb_s"] == 4.6


def test_every_model_compile_way_is_accepted_by_xla(monkeypatch):
    """benchmark_model.py's --compile ways: each way's options are DebugOptions XLA parses (a misspelt name or
    enum value fails here, not on the GPU), and unrolled is a bool."""
    import jax
    import jax.numpy as jnp

    monkeypatch.syspath_prepend(BENCHMARKS)
    model = importlib.import_module("benchmark_model")
    for name, (options, unrolled) in model.COMPILE_WAYS.items():
        assert isinstance(unrolled, bool), name
        jax.jit(lambda x: x * 2, compiler_options=dict(options) or None).lower(jnp.ones(3)).compile()


def test_block_cost_line(monkeypatch):
    """decode_block_cost.py's fit: the fixed part and the part per block of points on a known line."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    block_cost = importlib.import_module("decode_block_cost")
    fixed, per_block = block_cost.line([8, 16, 32, 64], [0.017 + 0.00185 * x for x in (8, 16, 32, 64)])
    assert fixed == pytest.approx(17.0) and per_block == pytest.approx(1.85)
    with pytest.raises(SystemExit, match="CUDA GPU"):
        block_cost.main([])
