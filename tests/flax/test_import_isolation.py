"""Importing vae_core, or the node pack in a real host, never imports JAX or Flax (fresh interpreters)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMFY_DIR = ROOT / ".host" / "ComfyUI"

_CHECK = """
import sys
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax') or 'vae_core.flax' in m)
print('JAX-MODULES:' + ','.join(loaded))
"""


def _run(code: str) -> str:
    """Run `code` in a fresh interpreter; the JAX/Flax/vae_core.flax modules it left loaded."""
    proc = subprocess.run([sys.executable, "-c", code + _CHECK], cwd=str(ROOT), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if line.startswith("JAX-MODULES:")][-1]


def test_importing_vae_core_imports_no_jax():
    out = _run(f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport vae_core, vae_core.loading, vae_core.tiling\n")
    assert out == "JAX-MODULES:", out


def test_importing_the_nodes_imports_no_jax():
    if not (COMFY_DIR / "nodes.py").is_file():
        pytest.skip(f"ComfyUI host not installed at {COMFY_DIR} (run scripts/setup.sh)")
    code = f"""
import importlib.util, sys
sys.path.insert(0, {str(COMFY_DIR)!r})
from comfy.cli_args import args
args.cpu = True
import nodes
before = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax'))
assert not before, 'the host itself imported ' + ','.join(before[:3])
spec = importlib.util.spec_from_file_location('pack_under_test', {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
mod = importlib.util.module_from_spec(spec)
sys.modules['pack_under_test'] = mod
spec.loader.exec_module(mod)
assert mod.NODE_CLASS_MAPPINGS, 'the pack registered no nodes'
"""
    out = _run(code)
    assert out == "JAX-MODULES:", out
