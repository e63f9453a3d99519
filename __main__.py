"""``python -m editlab run WORKFLOW.json --comfyui PATH``: the headless runner's CLI (see headless/runner.py).

Works as ``python -m editlab`` from the folder holding the pack (``ComfyUI/custom_nodes``), as
``python -m editlab`` from inside the pack (through ``editlab.py``), and as ``python path/to/__main__.py``.
"""
from __future__ import annotations

import importlib.util
import os
import sys


def _runner():
    if __package__:
        from .headless import runner
        return runner
    # Run as a plain script: the pack folder is on sys.path, where its `nodes/` package would shadow
    # ComfyUI's `nodes` module; import the pack under a stable name instead, so relative imports work.
    root = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != os.path.realpath(root)]
    spec = importlib.util.spec_from_file_location("editlab", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["editlab"] = module
    spec.loader.exec_module(module)
    from editlab.headless import runner  # type: ignore[import-not-found]
    return runner


if __name__ == "__main__":
    sys.exit(_runner().main())
