"""Which model made an inversion: a fingerprint of every weight and weight patch sampling uses.

An inversion replays only with the model that made it, so DDIM Invert stores ``model_identity(model)`` and
the nodes that use an inversion compare it with their own model's (``check_model``).

What is hashed (SHA-256 of the raw bytes, so *any* change of *any* weight changes the id; a sampled
or statistical summary can miss one changed tensor or one changed entry):
* every tensor of the base model (``model.model``: the diffusion model and its sampling buffers), as
  ComfyUI keeps them unpatched: a loaded, patched model has its originals in ``backup``, so the id
  does not depend on whether the model is loaded;
* every weight patch (LoRA etc.): keys, strengths, offsets and the patch tensors' bytes, so two
  different LoRAs on the same keys at the same strength differ;
* the model class and its model sampling (class, buffers and settings: a shifted or flow sampling
  is another model for an inversion).

Cost: the base weights are hashed once per model object (cached on the module, which ComfyUI changes
only through patches) using one thread per core; patches once per ``patches_uuid`` (ComfyUI draws a
new one whenever patches change); the model sampling once per sampling object. Hashing SD1.5's 1.7 GB takes seconds once; later calls are free.
"""
from __future__ import annotations

import hashlib
import logging
import os
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .common import EditLabError

VERSION = "w2"  # ids are "w2:<hex>"; an id without it was made by an older, sampled fingerprint
log = logging.getLogger("editlab")

_weights_cache: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
_patches_cache: "OrderedDict[Any, str]" = OrderedDict()
_sampling_cache: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_PATCHES_CACHE_SIZE = 64


def _tensor_digest(t: torch.Tensor) -> bytes:
    """SHA-256 of a tensor's dtype, shape and raw bytes (any dtype, any device)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).cpu().numpy())  # hashlib releases the GIL: threads hash in parallel
    return h.digest()


def _hash_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    workers = max(1, min(8, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(lambda kv: _tensor_digest(kv[1]), named))
    h = hashlib.sha256()
    for (name, _), d in zip(named, digests):
        h.update(name.encode() + d)
    return h.hexdigest()


def _pristine_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The base model's tensors without weight patches (ComfyUI patches in place and keeps the originals)."""
    sd = model.model.state_dict()
    for key, saved in getattr(model, "backup", {}).items():
        if key in sd:
            sd[key] = saved.weight
    return sorted(sd.items())


def _weights_digest(model) -> str:
    module = model.model
    digest = _weights_cache.get(module)
    if digest is None:
        digest = _hash_tensors(_pristine_weights(model))
        _weights_cache[module] = digest
    return digest


def _feed(h, obj: Any, depth: int = 0) -> None:
    """Hash a patch's data: tensors by bytes, containers and adapter objects by their contents."""
    if depth > 8:
        h.update(b"<deep>")
    elif torch.is_tensor(obj):
        h.update(_tensor_digest(obj))
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for item in obj:
            _feed(h, item, depth + 1)
    elif isinstance(obj, dict):
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key], depth + 1)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(repr(obj).encode())
    elif callable(obj) or not hasattr(obj, "__dict__"):  # a patch function: by its name
        h.update(getattr(obj, "__qualname__", type(obj).__qualname__).encode())
    else:  # a weight adapter (e.g. LoRAAdapter: .weights, .loaded_keys): by its class and contents
        h.update(type(obj).__qualname__.encode())
        _feed(h, {k: v for k, v in vars(obj).items() if not k.startswith("_")}, depth + 1)


def _patches_digest(model) -> str:
    key = getattr(model, "patches_uuid", None)
    if key is not None and key in _patches_cache:
        _patches_cache.move_to_end(key)
        return _patches_cache[key]
    h = hashlib.sha256()
    for name in sorted(model.patches):
        h.update(name.encode())
        _feed(h, model.patches[name])  # (strength_patch, data, strength_model, offset, function) per patch
    digest = h.hexdigest()
    if key is not None:
        _patches_cache[key] = digest
        while len(_patches_cache) > _PATCHES_CACHE_SIZE:
            _patches_cache.popitem(last=False)
    return digest


def _sampling_digest(ms) -> str:
    """The model sampling: its classes (eps / v / flow, discrete / continuous), buffers and settings
    (cached per object: ComfyUI patches sampling by replacing the object, e.g. ModelSamplingSD3)."""
    try:
        return _sampling_cache[ms]
    except (KeyError, TypeError):
        pass
    h = hashlib.sha256(",".join(c.__name__ for c in type(ms).__mro__).encode())
    if isinstance(ms, torch.nn.Module):
        for name, t in sorted(ms.state_dict().items()):
            h.update(name.encode() + _tensor_digest(t))
    for name, value in sorted(vars(ms).items()):
        if not name.startswith("_") and isinstance(value, (bool, int, float, str)):
            h.update(f"{name}={value!r}".encode())
    digest = h.hexdigest()
    try:
        _sampling_cache[ms] = digest
    except TypeError:  # an object that cannot be weakly referenced: hashed every time (it is small)
        pass
    return digest


def model_identity(model) -> str:
    """A short fingerprint of everything in a MODEL that sampling computes with (see the module doc)."""
    h = hashlib.sha256(type(model.model).__name__.encode())
    h.update(_sampling_digest(model.get_model_object("model_sampling")).encode())
    h.update(_weights_digest(model).encode())
    h.update(_patches_digest(model).encode())
    return f"{VERSION}:{h.hexdigest()[:16]}"


def check_model(inv, model, strict: bool) -> None:
    """Refuse (``strict``) or warn when an inversion was made with another model."""
    stored = inv.model_id
    if not stored:
        return
    if not stored.startswith(f"{VERSION}:"):
        log.warning("EditLab: this inversion's model fingerprint (%s) comes from an older EditLab and cannot be "
                    "compared with this model's; invert again to have the model checked.", stored)
        return
    current = model_identity(model)
    if stored != current:
        msg = (f"this inversion was made with another model (fingerprint {stored}, this model {current}): its "
               "weights, LoRA patches or model sampling differ, and reconstructions will drift. Invert again with "
               "this model")
        if strict:
            raise EditLabError(msg + ", or switch off 'check_model' if you mean it (e.g. an added LoRA).")
        log.warning("EditLab: %s.", msg)
