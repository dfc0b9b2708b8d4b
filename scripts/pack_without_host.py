"""Import one host-free module of this pack (e.g. nodes/grid.py) outside ComfyUI.

nodes/__init__ imports the host, but some modules under nodes/ only need the pack's own vae_core
(grid.py imports ..vae_core.memory). So the pack is imported as a package under an alias (its
__init__ registers no nodes without the host) and nodes/ as a bare package whose __init__ is not run.
Used by scripts/template_thumbnails.py and tests/web/test_js_logic.py.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
ALIAS = "akl_pack_without_host"


def load(module: str) -> ModuleType:
    """`load("nodes.grid")` -> the pack's nodes/grid.py, imported without the host."""
    if ALIAS not in sys.modules:
        spec = importlib.util.spec_from_file_location(ALIAS, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        pack = importlib.util.module_from_spec(spec)
        sys.modules[ALIAS] = pack
        spec.loader.exec_module(pack)
        nodes = types.ModuleType(f"{ALIAS}.nodes")
        nodes.__path__ = [str(ROOT / "nodes")]
        sys.modules[f"{ALIAS}.nodes"] = nodes
    return importlib.import_module(f"{ALIAS}.{module}")
