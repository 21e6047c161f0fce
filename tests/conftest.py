"""Shared test fixtures: GPU gating and the relative-error measure every comparison uses."""
import numpy as np
import pytest

from flashmla_jax._backend import has_cuda_gpu


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests need a CUDA GPU with jax-triton; elsewhere they are skipped."""
    if has_cuda_gpu():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf, so it never passes a bound."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not (np.all(np.isfinite(out)) and np.all(np.isfinite(ref))):
        return float("inf")
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
