"""``python -m editlab ...`` typed inside the pack folder finds this file (the package is the folder itself,
which Python cannot import from within): run the same CLI as ``__main__.py``. ComfyUI never imports it."""
from __future__ import annotations

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "__main__.py"), run_name="__main__")
