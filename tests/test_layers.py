"""The house plan holds: the layers of pyproject.toml's import-linter contracts, no import cycles (imports
inside functions included), and what must stay light stays light."""

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

HEAVY = ["jax", "orbax", "flax", "optax", "apache_beam", "sklearn", "prefect", "tensorflow", "lm_eval"]


def test_the_import_contracts_hold():
    """`lint-imports`: every module in its layer, importing only downward, and no cycles."""
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in out.stdout


def test_every_module_is_in_a_layer():
    """A new module goes into a layer: none of palm/, flows/, tasks/ escapes the contract."""
    import tomllib

    layers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]["layers"]
    named = {name.strip() for layer in layers for name in layer.split("|")}
    for path in sorted([*(ROOT / "palm").rglob("*.py"), *(ROOT / "flows").glob("*.py"), *(ROOT / "tasks").glob("*.py")]):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        if module == "palm":  # the root package: the version, nothing else
            continue
        assert any(module == n or module.startswith(n + ".") for n in named), f"{module} is in no layer"


CHECK = """
import sys
{body}
heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r}))
assert not heavy, heavy
print('ok')
"""


def _light(body: str, env: dict[str, str] | None = None) -> None:
    out = subprocess.run([sys.executable, "-c", CHECK.format(body=body, heavy=HEAVY)], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout[-2000:] + out.stderr[-2000:]


def test_validating_a_spec_loads_no_engine():
    """Validating a spec, its workflow graph included, reads the stage table's declarations only."""
    _light("from palm.dag.workflow import load_spec\n"
           "for name in ('tiny', 'tiny-coder', 'tiny-scaling', 'palm-540b'):\n"
           "    load_spec(f'specs/{name}.yaml')\n"
           "from palm.dag.table import STAGES\n"
           "from palm.spec.schema import spec_schema\n"
           "spec_schema()")


def test_reading_a_gs_path_loads_no_engine(gcs_emulator):
    """The first gs:// access talks to the bucket through gcsfs, and loads no JAX or Orbax for it."""
    _light("from palm.base import storage\n"
           "storage.check_root('gs://bucket/layers-check')\n"
           "storage.write_text_atomic('gs://bucket/layers-check/note.txt', 'light')\n"
           "assert storage.read_text('gs://bucket/layers-check/note.txt') == 'light'\n"
           "from palm.spec.loading import read_spec")  # the emulator's address is in this process's environment
