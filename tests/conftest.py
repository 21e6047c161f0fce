"""The one GPU gate: `@pytest.mark.gpu` tests need a CUDA GPU with jax-triton and are skipped elsewhere;
`@pytest.mark.no_gpu` tests check what happens without one and are skipped where there is one. Shared
helpers are in tests/_util.py."""
import pytest

from flashmla_jax._backend import has_cuda_gpu


def pytest_collection_modifyitems(config, items):
    gpu = has_cuda_gpu()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the device)" if not gpu else
                            "checks the behaviour without a CUDA GPU")
    for item in items:
        if ("gpu" in item.keywords and not gpu) or ("no_gpu" in item.keywords and gpu):
            item.add_marker(skip)
