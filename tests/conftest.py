"""Shared test setup.

The pack is imported under the stable name ``editlab`` (its folder may have any name), so the pure
tier imports ``editlab.samplers`` / ``editlab.guidance`` / ``editlab.headless`` without ComfyUI.
Engine-tier fixtures live in ``tests/engine/conftest.py`` and need ``COMFYUI_PATH``.
"""
from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUPPORT = os.path.join(ROOT, "tests", "support")


def _import_pack() -> None:
    if "editlab" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "editlab", os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["editlab"] = module
    spec.loader.exec_module(module)


_import_pack()
if SUPPORT not in sys.path:
    sys.path.insert(0, SUPPORT)
