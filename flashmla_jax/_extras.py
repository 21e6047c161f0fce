"""The optional dependencies, the pyproject extra that installs each, and the error that names it.

`import flashmla_jax` needs only jax and numpy; each of these modules is imported where it is used, and a missing
one raises ModuleNotFoundError (an ImportError) with the pip command that installs it.
"""
from __future__ import annotations

import importlib
import importlib.util

# module -> the extra of pyproject.toml that installs it
EXTRA_OF = {
    "flax": "flax",                 # flashmla_jax.flax, examples/generate.py
    "safetensors": "checkpoint",    # flashmla_jax.checkpoint
    "jax_triton": "gpu",            # implementation="triton"
    "triton": "test",               # implementation="interpret" (Triton's interpreter), compile checks
    "torch": "test",                # the interpreter's tensors
    "tqdm": "bench",                # the benchmarks' progress bars
    "matplotlib": "bench",          # the benchmarks' plots
}
# What each Triton runner imports (ops/_registry.py's TritonRunner).
RUNNER_MODULES = {"triton": ("jax_triton", "triton"), "interpret": ("triton", "torch")}


def install_hint(module: str) -> str:
    """"pip install 'flashmla_jax[extra]'" for a module of EXTRA_OF."""
    return f"pip install 'flashmla_jax[{EXTRA_OF[module.partition('.')[0]]}]'"


def missing(*modules: str) -> tuple[str, ...]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    gone = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):      # a parent package missing, or a module blocked in sys.modules
            found = False
        if not found:
            gone.append(name)
    return tuple(gone)


def missing_error(module: str, needed_by: str) -> ModuleNotFoundError:
    """The error for `needed_by` (a module, an example, an implementation) without `module`."""
    top = module.partition(".")[0]
    return ModuleNotFoundError(f"{needed_by} needs {top}, which is not installed: {install_hint(top)}", name=top)


def require(module: str, needed_by: str):
    """`importlib.import_module(module)`, or `missing_error` when it (or its package) is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise missing_error(module, needed_by) from e


def runner_missing(runner: str) -> str | None:
    """Why a Triton runner ("triton": jax-triton; "interpret": Triton's interpreter) cannot run for want of a
    module ("needs ..., not installed here: pip install ..."); None when everything it imports is there."""
    gone = missing(*RUNNER_MODULES[runner])
    if not gone:
        return None
    extras = " ".join(dict.fromkeys(install_hint(m) for m in gone))
    return f"needs {' and '.join(gone)}, not installed here: {extras}"
