"""What nodes that differentiate through the model share (null-text optimisation, DreamBooth training).

ComfyUI runs nodes in ``torch.inference_mode()``; its weights are inference tensors that autograd refuses
to save. ``autograd_weights`` gives autograd zero-copy aliases of them for the duration of a block, and
``with_cross_attn`` swaps the cross-attention embedding of already-processed conds, so a loop can vary the
prompt per step inside ComfyUI's own guider.
"""
from __future__ import annotations

import contextlib

import torch

import comfy.conds


@contextlib.contextmanager
def autograd_weights(module: torch.nn.Module):
    """Make a module usable under autograd although its weights were created in inference mode.

    Each inference-mode parameter/buffer is swapped for a zero-copy alias of the same storage that
    autograd may save (``Tensor.set_`` on the storage), with ``requires_grad=False`` so no weight
    gradient is ever computed; the originals are put back on exit, whatever happens.
    """
    swapped = []
    try:
        with torch.inference_mode(False):
            for mod in module.modules():
                for store in (mod._parameters, mod._buffers):
                    for name, t in list(store.items()):
                        if t is None or not t.is_inference():
                            continue
                        alias = torch.empty(0, dtype=t.dtype, device=t.device)
                        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
                        store[name] = torch.nn.Parameter(alias, requires_grad=False) if store is mod._parameters else alias
                        swapped.append((store, name, t))
        yield
    finally:
        for store, name, t in reversed(swapped):
            store[name] = t


def with_cross_attn(conds: list[dict], emb: torch.Tensor) -> list[dict]:
    """Processed conds with their cross-attention embedding replaced (keeps pooled/extra conds)."""
    out = []
    for c in conds:
        c = c.copy()
        model_conds = c["model_conds"].copy()
        model_conds["c_crossattn"] = comfy.conds.CONDCrossAttn(emb)
        c["model_conds"] = model_conds
        out.append(c)
    return out
