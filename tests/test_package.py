"""The package as a user installs it: license, metadata, typing marker, the extras the README names, and the
install hint a missing optional dependency raises (each simulated in a fresh Python by blocking the module in
sys.modules, which makes its import fail as if it were not installed)."""
import os
import re
import sys

import pytest

import flashmla_jax
from _util import run_python

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")       # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_license_changelog_and_typing_marker_ship():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert f.read().startswith("MIT License")
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        assert f"## [{flashmla_jax.__version__}]" in f.read()
    assert os.path.isfile(os.path.join(os.path.dirname(flashmla_jax.__file__), "py.typed"))
    project = _pyproject()
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["flashmla_jax"]
    meta = project["project"]
    assert meta["version"] == flashmla_jax.__version__
    assert meta["license"] == "MIT" and meta["license-files"] == ["LICENSE"]
    assert meta["readme"] == {"file": "README.md", "content-type": "text/markdown"}
    assert "Typing :: Typed" in meta["classifiers"]
    assert not any(c.startswith("License ::") for c in meta["classifiers"])   # PEP 639: the expression says it


def test_readme_table_names_every_extra():
    with open(os.path.join(ROOT, "README.md")) as f:
        table = f.read().split("| extra | installs | enables |")[1].split("\n\n")[0]
    rows = re.findall(r"^\| `(\w+)` \|", table, flags=re.M)
    assert sorted(rows) == sorted(_pyproject()["project"]["optional-dependencies"])


def _blocked(module: str, body: str) -> str:
    """Code for run_python: `module` made unimportable, then `body`, whose ImportError or ValueError is printed
    as 'ERROR <type>: <message>'."""
    indented = "\n".join("    " + line for line in body.strip().splitlines())
    return (f"import sys\nsys.modules[{module!r}] = None\ntry:\n{indented}\n"
            "except (ImportError, ValueError) as e:\n    print(f'ERROR {type(e).__name__}: {e}')\n")


GENERATE = os.path.join(ROOT, "examples", "generate.py")


@pytest.mark.parametrize("module, body, extra", [
    ("flax", f"import runpy\nsys.argv = ['generate.py']\nrunpy.run_path({GENERATE!r}, run_name='__main__')", "flax"),
    ("flax", "import flashmla_jax.flax", "flax"),
    ("triton", """
import jax.numpy as jnp
import flashmla_jax as fm
q = jnp.ones((1, 1, 16, 576), jnp.float32)
fm.mla_decode(q, jnp.ones((1, 64, 576), jnp.float32), jnp.array([3], jnp.int32), implementation="interpret")
""", "test"),
    ("torch", """
import jax.numpy as jnp
import flashmla_jax as fm
q = jnp.ones((1, 16, 2, 64), jnp.float32)
fm.mla_prefill(q, q, q, implementation="interpret")
""", "test"),
    ("triton", """
import jax.numpy as jnp
import flashmla_jax as fm
q = jnp.ones((1, 1, 16, 128), jnp.float32)
fm.indexer_scores(q, jnp.ones((1, 1, 16)), jnp.ones((1, 64, 128)), jnp.array([3], jnp.int32),
                  implementation="interpret")
""", "test"),
])
def test_missing_extra_names_its_install_command(module, body, extra):
    out = run_python(_blocked(module, body))
    assert out.startswith("ERROR"), out
    assert module in out and f"pip install 'flashmla_jax[{extra}]'" in out, out


def test_checkpoint_without_safetensors_names_its_extra(tmp_path):
    numpy_st = pytest.importorskip("safetensors.numpy")
    import numpy as np

    numpy_st.save_file({"a": np.ones((2, 2), np.float32)}, str(tmp_path / "x.safetensors"))
    body = f"from flashmla_jax import checkpoint\ncheckpoint.SafetensorsStateDict({str(tmp_path / 'x.safetensors')!r})['a']"
    out = run_python(_blocked("safetensors", body))
    assert out.startswith("ERROR ModuleNotFoundError") and "pip install 'flashmla_jax[checkpoint]'" in out, out


def test_xla_needs_no_extra():
    """The core runs with every optional module blocked."""
    blocks = "".join(f"sys.modules[{m!r}] = None\n" for m in ("triton", "torch", "flax", "jax_triton", "safetensors"))
    out = run_python("import sys\n" + blocks + """
import jax.numpy as jnp
import flashmla_jax as fm
q = jnp.ones((1, 1, 16, 576), jnp.float32)
print(fm.mla_decode(q, jnp.ones((1, 64, 576), jnp.float32), jnp.array([3], jnp.int32)).shape)
""")
    assert out.strip() == "(1, 1, 16, 512)"
    assert sys.modules.get("flashmla_jax") is not None
