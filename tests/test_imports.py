"""The JAX core must import on accelerator hosts that carry no Prefect, Beam or pydantic."""

import subprocess
import sys

from tests.conftest import ROOT

CORE = ["palm.spec.config", "palm.core.model", "palm.core.optimizer", "palm.core.sharding", "palm.core.train",
        "palm.core.checkpoint", "palm.core.lm"]
FORBIDDEN = ["prefect", "apache_beam", "pydantic", "sentencepiece", "gcsfs", "grain"]

BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {FORBIDDEN!r}:
            raise ImportError('blocked on accelerator hosts: ' + name)
sys.meta_path.insert(0, Block())
for module in {CORE!r}:
    __import__(module)
loaded = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})
assert not loaded, loaded
print('ok')
"""


def test_core_imports_without_orchestration_or_data_libraries():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
