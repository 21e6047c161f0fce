"""What every benchmark here shares: the rows of the fixed matrix (DESIGN.md §5), the device's name and the two
measured ceilings, the timers, CUPTI kernel times and their grouping, the JSON files, the printed table and the
bar plots, and the decode tile-config syntax of the profiling tools.

Each benchmark runs as a script (`python benchmarks/x.py`: this folder is then on sys.path) and imports this module
first; it puts the checkout's flashmla_jax ahead of any installed copy.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import statistics
import sys
import time
from typing import Callable, Mapping, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)      # the flashmla_jax of this checkout, installed or not

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from flashmla_jax._extras import require  # noqa: E402
from flashmla_jax.ops.decode import DecodeTiles  # noqa: E402

RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")


# ---------------------------------------------------------------- rows


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the fixed benchmark matrix. Benchmarks read the fields their op has."""
    name: str
    batch: int                  # sequences (1 for a prefill row)
    context: int                # cache tokens per sequence (a ragged row: the longest); prefill: the tokens
    heads: int
    s_q: int = 1                # query tokens per sequence (sparse prefill: all its query tokens)
    ragged: bool = False        # lengths uniform in [1, context]
    paged: bool = False         # a paged cache in a shuffled page order
    page_size: int = 64
    kv_format: str | None = None
    topk: int = 0               # sparse attention and the indexer: keys each query attends to / selects
    prefill: bool = False
    layout: str = ""            # many GPUs: "dp" | "cp" | "tp"
    devices: tuple = ()         # many GPUs: the device counts besides one

    def reduced(self, **caps: int) -> "Row":
        """The row with each named field capped (CPU-friendly sizes)."""
        return dataclasses.replace(self, **{k: min(getattr(self, k), cap) for k, cap in caps.items()})

    @property
    def base_name(self) -> str:
        """The bf16 row of the same shape (this row's name for a bf16 row)."""
        return self.name.removesuffix(FP8_SUFFIXES.get(self.kv_format, ""))


# The name suffix of an FP8 row (beside the bf16 row of the same shape).
FP8_SUFFIXES = {"fp8_blockscale": "-fp8", "fp8_pertensor": "-fp8pt"}


def _fp8_twins(rows: Sequence[Row], names: Sequence[str], kv_format: str) -> list[Row]:
    return [dataclasses.replace(r, name=r.name + FP8_SUFFIXES[kv_format], kv_format=kv_format) for r in rows
            if r.name in names]


_DECODE = [
    Row("D1", 128, 4096, 16),
    Row("D2", 64, 16384, 16),
    Row("D3", 1, 65536, 16),
    Row("D4", 128, 8192, 16, ragged=True),
    Row("D5", 128, 4096, 128),
    Row("D6", 64, 8192, 128, s_q=2),
    Row("C1", 1, 16384, 16, s_q=1024),       # a chunk of 1024 new tokens against a 16K prefix (chunked prefill)
    Row("D1-paged", 128, 4096, 16, paged=True),
    Row("D2-paged", 64, 16384, 16, paged=True),
]
DECODE_ROWS = (_DECODE + _fp8_twins(_DECODE, ("D1", "D2", "D4", "D1-paged", "D5", "D6"), "fp8_blockscale")
               + _fp8_twins(_DECODE, ("D1", "D5"), "fp8_pertensor"))
PREFILL_ROWS = [Row("P1", 1, 8192, 128, prefill=True), Row("P2", 4, 4096, 16, prefill=True)]
SPARSE_ROWS = [Row("S1", 128, 32768, 128, s_q=2, topk=2048, kv_format="fp8_blockscale"),
               Row("S2", 128, 32768, 128, topk=2048, kv_format="fp8_blockscale"),
               Row("S3", 128, 32768, 64, topk=2048, kv_format="fp8_blockscale"),
               Row("SP", 1, 32768, 128, s_q=4096, topk=2048, prefill=True)]
INDEXER_ROWS = [Row("I1", 64, 131072, 64, topk=2048), Row("I1-fp8", 64, 131072, 64, topk=2048, kv_format="fp8_paged")]
_BY_NAME = {r.name: r for r in _DECODE}
MULTI_GPU_ROWS = [
    dataclasses.replace(_BY_NAME["D1"], name="X-DP-D1", layout="dp", devices=(2, 4)),
    dataclasses.replace(_BY_NAME["D1-paged"], name="X-DP-D1-paged", layout="dp", devices=(2, 4)),
    dataclasses.replace(_BY_NAME["D2"], name="X-DP-D2", layout="dp", devices=(2, 4)),
    Row("X-CP-256K", 1, 262144, 16, layout="cp", devices=(2, 4)),
    Row("X-CP-1M", 1, 1048576, 16, layout="cp", devices=(2, 4)),
    dataclasses.replace(_BY_NAME["D5"], name="X-TP-D5", layout="tp", devices=(4,)),
]


def select_rows(rows: Sequence[Row], names: Sequence[str] | None) -> list[Row]:
    """The rows named (all of them for None or an empty list); an unknown name is an error."""
    unknown = set(names or ()) - {r.name for r in rows}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {[r.name for r in rows]}")
    return [r for r in rows if not names or r.name in names]


# ---------------------------------------------------------------- the device and its ceilings


def device_name() -> str:
    d = jax.devices()[0]
    return getattr(d, "device_kind", d.platform)


def device_slug() -> str:
    return re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")


def on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def measure_read_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a streaming read: a float32 sum over a `gib` GiB bf16 array (read once, tiny write)."""
    n = int(gib * 2 ** 30) // 2
    xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.bfloat16) for i in range(2)]
    read = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    return n * 2 / time_call(read, [(x,) for x in xs], repeats=10, calls_per_repeat=5)


def measure_matmul_rate(n: int = 8192) -> float:
    """FLOP/s of an n x n x n bf16 matrix product with float32 accumulation, on random data."""
    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n ** 3 / time_call(mm, [(a, b), (b, a)], repeats=10, calls_per_repeat=5)


# ---------------------------------------------------------------- timers


def time_call(fn: Callable, input_sets: Sequence[tuple], repeats: int = 20, calls_per_repeat: int = 10,
              warmup: int = 3) -> float:
    """Median seconds per call of the jitted `fn`, rotating over `input_sets` (so that inputs larger
    than L2 are read from memory each time).

    Each repeat first enqueues a few milliseconds of unrelated GPU work, then calls_per_repeat + 1
    calls, and times from the end of the first call to the end of the last. The GPU is busy for the
    whole interval (the host has enqueued everything while the blocker ran), so the host's dispatch
    latency is not counted: the steady state of a decode loop. Without a GPU there is no blocker and
    the first call's end starts the clock all the same."""
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    blocker = _gpu_blocker()
    samples = []
    for r in range(repeats):
        if blocker is not None:
            blocker()
        outs = [fn(*input_sets[(r * calls_per_repeat + i) % len(input_sets)]) for i in range(calls_per_repeat + 1)]
        jax.block_until_ready(outs[0])
        t0 = time.perf_counter()
        jax.block_until_ready(outs[-1])
        samples.append((time.perf_counter() - t0) / calls_per_repeat)
    return statistics.median(samples)


@functools.lru_cache(maxsize=1)
def _gpu_blocker() -> Callable | None:
    """A callable that enqueues ~5 ms of GPU work (200 chained 2048^2 bf16 products) and returns at once;
    None without a GPU."""
    if not on_gpu():
        return None
    x = jnp.full((2048, 2048), 1 / 2048, jnp.bfloat16)       # y @ x keeps y at its scale
    chain = jax.jit(lambda x: jax.lax.fori_loop(0, 200, lambda i, y: y @ x, x))
    jax.block_until_ready(chain(x))
    return lambda: chain(x)


def time_call_in_one_dispatch(fn: Callable, input_sets: Sequence[tuple], **kwargs) -> float:
    """Seconds per call of `fn` when all of `input_sets` run inside one jitted dispatch, as in a decode
    loop under jit. On the H100 and H200 hosts one dispatch costs 28-40 us of host time, more than a short
    decode step takes the GPU. Each set must differ (no common subexpressions to merge), so the calls
    read memory and not L2."""
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    return time_call(many, [(list(input_sets),)], **kwargs) / len(input_sets)


def time_synced_dispatch(fn: Callable, input_sets: Sequence[tuple], repeats: int = 10) -> float:
    """Median seconds per call when the calls on all of `input_sets` (distinct inputs, so nothing is merged) run
    in one jitted dispatch, timed from the dispatch to the last output on every device. `time_call`'s
    steady-state clock needs one GPU kept busy by its blocker, which does not hold with several devices
    (it read 1 us for a 4-GPU call); one dispatch per len(input_sets) calls keeps the host's share small."""
    many = jax.jit(lambda sets: [fn(*s) for s in sets])
    jax.block_until_ready(many(input_sets))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(many(input_sets))
        samples.append((time.perf_counter() - t0) / len(input_sets))
    return statistics.median(samples)


def time_serial(fn: Callable, input_sets: Sequence[tuple] = ((),), repeats: int = 3, warmup: int = 0) -> float:
    """Median seconds of one call run alone, waited for before the next (a CPU runs jitted calls side by side,
    which `time_call`'s enqueue-then-wait timing would hide; a sampling loop waits for every step)."""
    for i in range(warmup):
        jax.block_until_ready(fn(*input_sets[i % len(input_sets)]))
    samples = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*input_sets[r % len(input_sets)]))
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


# ---------------------------------------------------------------- CUPTI kernel times


def gpu_kernel_times(run: Callable[[], object]) -> list[tuple[str, float]] | None:
    """[(kernel name, ms)] of every GPU kernel that `run()` launches, from CUPTI; None without a GPU.

    The same CUPTI path as `jax.experimental.mosaic.gpu.profiler.measure`, driven around one call of a
    closure: `measure` runs its function twice on the same arguments, which a step that donates its cache
    cannot do. `run` is called once untimed (warm-up) and once under CUPTI."""
    if not on_gpu():
        return None
    from jax._src.lib import mosaic_gpu as mosaic_gpu_lib

    jax.block_until_ready(run())
    ext = mosaic_gpu_lib._mosaic_gpu_ext
    ext._cupti_init()
    try:
        jax.block_until_ready(run())
    finally:
        timings = ext._cupti_get_timings(True)
    return list(timings or [])


def kernel_groups(kernels: Sequence[tuple[str, float]], groups: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """{group: ms, "other": ms, "total": ms} of `gpu_kernel_times`' list: each kernel counted in the first group
    one of whose markers its lower-cased name contains, else in "other"."""
    split = dict.fromkeys((*groups, "other"), 0.0)
    for name, ms in kernels:
        lower = name.lower()
        split[next((g for g, markers in groups.items() if any(m in lower for m in markers)), "other")] += ms
    split["total"] = sum(ms for _, ms in kernels)
    return split


# ---------------------------------------------------------------- results: JSON, the printed table


def merged_rows(name: str, payload: dict) -> dict:
    """payload with the results of the existing {name}_<device>.json whose rows it does not measure again (runs
    of one benchmark split over several calls; each row keeps the ceilings of its own run: `run_ceilings`)."""
    path = os.path.join(RESULTS_DIR, f"{name}_{device_slug()}.json")
    if not os.path.exists(path):
        return payload
    with open(path) as f:
        old = json.load(f)
    fresh = {}
    for r in payload["results"]:
        fresh.setdefault(r["row"], []).append(r)
    ceilings = dict(read_bandwidth_tb_s=old.get("read_bandwidth_tb_s"), matmul_tflop_s=old.get("matmul_tflop_s"))
    results, placed = [], set()
    for r in old["results"]:            # the old order, a row measured again in its old place
        if r["row"] not in fresh:
            results.append(dict(r, run_ceilings=r.get("run_ceilings", ceilings)))
        elif r["row"] not in placed:
            results += fresh[r["row"]]
            placed.add(r["row"])
    return dict(payload, results=results + [r for row, rows in fresh.items() if row not in placed for r in rows])


def write_json(name: str, payload: dict, out_dir: str = RESULTS_DIR) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}_{device_slug()}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path


def number(value, spec: str = ".3g") -> str:
    """`value` formatted by `spec` (e.g. ".4f"), in 3 significant digits where that would print a nonzero value
    as 0 (a CPU's TB/s and TFLOP/s); "" for None."""
    if value is None:
        return ""
    text = format(value, spec)
    return format(value, ".3g") if value and float(text) == 0 else text


def print_table(results: Sequence[dict], labels: Sequence[tuple[str, str]], columns: Sequence[tuple[str, str, str]],
                notes: Mapping[str, str] | None = None) -> None:
    """One line per result: `labels` (key, title) as left-aligned text, then `columns` (key, title, spec such as
    ".4f") as right-aligned numbers, each column as wide as its widest cell. A column no result has a value for
    (a GPU time on a CPU) is left out, not printed as 0 or nan; a missing value is a blank cell. `notes`
    {column key: text} are printed under the table for the columns shown (what a ratio compares)."""
    shown = [c for c in columns if any(r.get(c[0]) is not None for r in results)]
    text = [[str(r.get(key, "")) for key, _ in labels] + [number(r.get(key), spec) for key, _, spec in shown]
            for r in results]
    titles = [title for _, title in labels] + [title for _, title, _ in shown]
    widths = [max([len(t)] + [len(line[i]) for line in text]) for i, t in enumerate(titles)]
    align = ["<"] * len(labels) + [">"] * len(shown)
    for line in [titles] + text:
        print(" ".join(format(cell, f"{a}{w}") for cell, a, w in zip(line, align, widths)).rstrip())
    for note in dict.fromkeys(note for key, note in (notes or {}).items() if key in {c[0] for c in shown}):
        print(note)


# ---------------------------------------------------------------- plots


@dataclasses.dataclass(frozen=True)
class BarPanel:
    """One grouped bar chart: `values` {(case, series): value}, cases along x in their order of appearance, one
    colour per series; a missing pair is no bar (not a bar at 0)."""
    title: str
    ylabel: str
    values: Mapping[tuple[str, str], float | None]
    reference: float | None = None      # a horizontal line (100% of a ceiling, a 1x speed-up)


def plot_bars(panels: Sequence[BarPanel], path: str) -> None:
    """A PNG of the panels side by side. Each panel is as wide as its bars need, its case labels rotated and
    anchored at their bar groups, the legend beside the bars (never over them)."""
    require("matplotlib", "the benchmarks' plots")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [p for p in panels if any(v is not None for v in p.values.values())]     # an empty panel: left out
    if not panels:
        return
    shapes = []
    for panel in panels:
        cases = list(dict.fromkeys(case for case, _ in panel.values))
        series = list(dict.fromkeys(s for _, s in panel.values))
        shapes.append((cases, series))
    widths = [min(24.0, max(4.0, 0.12 * len(c) * len(s) + 0.35 * len(c))) for c, s in shapes]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 2.5 * len(panels), 5.0), squeeze=False,
                             gridspec_kw=dict(width_ratios=widths))
    for ax, panel, (cases, series) in zip(axes[0], panels, shapes):
        width = 0.8 / max(len(series), 1)
        x = np.arange(len(cases))
        colours = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
        for j, name in enumerate(series):
            have = [(i, panel.values[c, name]) for i, c in enumerate(cases) if panel.values.get((c, name)) is not None]
            if have:
                ax.bar([x[i] + j * width for i, _ in have], [v for _, v in have], width, label=name,
                       color=colours(j % colours.N))
        ax.set_xticks(x + width * (len(series) - 1) / 2)
        ax.set_xticklabels(cases, rotation=45, ha="right", rotation_mode="anchor", fontsize=8)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title, fontsize=10)
        if panel.reference is not None:
            ax.axhline(panel.reference, color="gray", lw=0.5)
        if series:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_pct_of_ceiling(results: list[dict], path: str, title: str) -> None:
    """Each result's % of the binding ceiling, grouped by "row", one bar per "implementation":
    "gpu_pct_of_ceiling" (kernel GPU time) where any result has it, else "pct_of_ceiling" (wall time)."""
    gpu = any(r.get("gpu_pct_of_ceiling") is not None for r in results)
    key = "gpu_pct_of_ceiling" if gpu else "pct_of_ceiling"
    values = {(r["row"], r["implementation"]): r.get(key) for r in results}
    plot_bars([BarPanel(title, "% of the binding ceiling" + (" (kernel GPU time)" if gpu else " (wall time)"),
                        values, reference=100)], path)


def progress(items: Sequence, desc: str):
    """tqdm's progress bar over `items` (the bench extra)."""
    return require("tqdm", "the benchmarks' progress bars").tqdm(items, desc=desc)


# ---------------------------------------------------------------- decode pieces several tools use


def plain_jnp_decode(q: jax.Array, kv: jax.Array, cache_seqlens: jax.Array, softmax_scale: float,
                     head_dim_v: int = 512) -> jax.Array:
    """The absorbed decode a JAX user writes by hand: two einsums and a masked softmax.

    q [B, S_q, H, D], kv [B, N, D] (a paged cache gathered first), cache_seqlens [B] -> [B, S_q, H, head_dim_v].
    Causal as `mla_decode`. Unlike the NaN-safe reference it trusts the cache past each length to hold
    finite numbers (it masks scores, not the cache) and does not guard rows with no visible key: one pass
    over the cache for the scores and one for the output, as fast as plain XLA gets."""
    n, s_q = kv.shape[1], q.shape[1]
    scores = jnp.einsum("bshd,bnd->bshn", q, kv, preferred_element_type=jnp.float32) * softmax_scale
    limit = cache_seqlens[:, None] - s_q + 1 + jnp.arange(s_q)[None, :]                 # [B, S_q]
    scores = jnp.where(jnp.arange(n)[None, None, None, :] < limit[:, :, None, None], scores, -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    return jnp.einsum("bshn,bnd->bshd", p, kv[..., :head_dim_v], preferred_element_type=jnp.float32).astype(q.dtype)


DECODE_OPTIONS = ("unchain_scores", "split_masked", "late_row_sum")
DECODE_CONFIG_HELP = ("semicolon-separated BLOCK_M,BLOCK_N,warps,stages[,unchain,split,late] "
                      "(the last three 0/1, on for 64-row tiles when left out: ops/decode.py's DecodeTiles)")


def parse_decode_configs(text: str) -> list[DecodeTiles]:
    """"64,64,8,2,1,1,1;16,64,8,3" -> tiles for ops/decode.py's plan_decode (`tiles`)."""
    tiles = []
    for config in text.split(";"):
        values = [int(v) for v in config.split(",")]
        options = dict(zip(DECODE_OPTIONS, (bool(v) for v in values[4:])))
        tiles.append(DecodeTiles.with_defaults(*values[:4], **options))
    return tiles
