"""``python -m <pack dir> run WORKFLOW.json --comfyui PATH``: the headless runner (see headless/runner.py)."""
from __future__ import annotations

import importlib.util
import os
import sys


def _runner():
    if __package__:
        from .headless import runner
        return runner
    # Run as a plain script: import the pack under a stable name so relative imports work.
    root = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location("editlab", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["editlab"] = module
    spec.loader.exec_module(module)
    from editlab.headless import runner  # type: ignore[import-not-found]
    return runner


if __name__ == "__main__":
    sys.exit(_runner().main())
