"""EditLab: text-guided diffusion image editing for ComfyUI.

Registration only. ComfyUI imports this package from ``custom_nodes/`` and awaits
``comfy_entrypoint()``; the node modules (and ComfyUI's own modules) are imported there, lazily, so
importing the package costs nothing and an import failure names its cause.
"""
from __future__ import annotations

__version__ = "0.1.0"

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI's extension entry point (schema-style nodes, ``comfy_api.latest``)."""
    try:
        from .nodes import EditLabExtension
    except ImportError as exc:  # a missing dependency: say which and how to fix it
        missing = getattr(exc, "name", None) or str(exc)
        raise ImportError(
            f"EditLab could not import {missing!r}. Install the pack's requirements into ComfyUI's Python: "
            "pip install -r custom_nodes/<this folder>/requirements.txt (ComfyUI Manager does this on install)."
        ) from exc
    return EditLabExtension()
