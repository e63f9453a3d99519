"""Calling a node the way ComfyUI's executor does, for the engine-tier tests (ComfyUI imported lazily)."""
from __future__ import annotations

import torch


def node_cls(node_id: str):
    """The node class ComfyUI registered under ``node_id``."""
    import nodes
    return nodes.NODE_CLASS_MAPPINGS[node_id]


def call(node_id: str, **kwargs):
    """Run a (schema-style) node's ``execute`` under inference mode, as the executor does; its outputs."""
    with torch.inference_mode():
        return node_cls(node_id).execute(**kwargs).result
