"""Honesty checks for tests that use more than one model, and deep snapshots of node inputs.

* :func:`effective_weights` / :func:`assert_models_differ`: a test that says "another model" must compare
  two models whose weights really differ (the random builder once ignored its seed, so every such test
  compared identical weights without noticing).
* :func:`snapshot`: a deep, comparable picture of any node input (MODEL, CLIP, VAE, CONDITIONING, LATENT,
  IMAGE, EditLab records ...), to prove that a node leaves its inputs untouched.

Only torch is imported at module level; ComfyUI objects are recognised by their attributes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import uuid
from typing import Any

import torch

# --------------------------------------------------------------------------
# Effective weights
# --------------------------------------------------------------------------


def _is_patcher(obj: Any) -> bool:
    return hasattr(obj, "model") and hasattr(obj, "patches") and hasattr(obj, "model_options")


def _pristine_state(patcher: Any) -> dict[str, torch.Tensor]:
    """The model's weights without any weight patch: ComfyUI patches loaded weights in place and keeps
    the originals in ``backup`` (shared by clones), so a loaded, patched model reads them from there."""
    sd = dict(patcher.model.state_dict())
    for key, saved in getattr(patcher, "backup", {}).items():
        if key in sd:
            sd[key] = saved.weight
    return sd


def effective_weights(obj: Any) -> dict[str, torch.Tensor]:
    """The weights a model computes with, as ``{key: tensor}``.

    Accepts a ModelPatcher (its weight patches, e.g. a LoRA, applied on top of the pristine weights), a
    CLIP or VAE (their ``patcher`` / first-stage model), an ``nn.Module`` or a dict of tensors.
    """
    if isinstance(obj, dict):
        return obj
    if isinstance(obj, torch.nn.Module):
        return dict(obj.state_dict())
    if _is_patcher(obj):
        sd = _pristine_state(obj)
        if obj.patches:
            import comfy.lora

            for key, patches in obj.patches.items():
                if key in sd:
                    sd[key] = comfy.lora.calculate_weight(patches, sd[key].detach().float().clone(), key)
        return sd
    if hasattr(obj, "patcher") and hasattr(obj, "cond_stage_model"):  # CLIP
        return effective_weights(obj.patcher)
    if hasattr(obj, "first_stage_model"):  # VAE
        return effective_weights(obj.first_stage_model)
    raise TypeError(f"don't know the weights of a {type(obj).__name__}")


# Deterministic by design, whatever the seed: the noise schedule's buffers and CLIP's position ids.
_NOT_RANDOM = ("model_sampling.", "position_ids")


def _constant(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return flat.numel() < 2 or bool((flat == flat[0]).all())


def assert_models_differ(a: Any, b: Any, *, every_random_tensor: bool = False) -> int:
    """Assert that two models' weights differ; return how many shared tensors differ.

    Tensors are compared key by key where both models hold the key with the same shape (so a 4- and an
    8-channel UNet compare on everything but their first convolution). ``every_random_tensor=True`` is
    for independently seeded random models: then no non-constant shared tensor may be equal (except the
    noise schedule's buffers and position ids, which no seed touches).
    """
    wa, wb = effective_weights(a), effective_weights(b)
    shared = [k for k in wa if k in wb and wa[k].shape == wb[k].shape and wa[k].is_floating_point()]
    assert shared, "the two models share no weight of the same shape: nothing to compare"
    equal = [k for k in shared if torch.equal(wa[k].float(), wb[k].float())]
    differ = len(shared) - len(equal)
    assert differ, f"the two models are identical: all {len(shared)} shared weights are equal (e.g. {shared[:3]})"
    if every_random_tensor:
        same_random = [k for k in equal if not _constant(wa[k]) and not any(s in k for s in _NOT_RANDOM)]
        assert not same_random, (f"{len(same_random)} random weights are identical in both models "
                                 f"(e.g. {same_random[:3]}): were they seeded alike?")
    return differ


# --------------------------------------------------------------------------
# Deep snapshots
# --------------------------------------------------------------------------

_PACK_ROOT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def _is_ours(obj: Any) -> bool:
    """An object of this pack, whatever module name ComfyUI's loader gave the pack."""
    module = sys.modules.get(type(obj).__module__)
    path = getattr(module, "__file__", None) or ""
    return os.path.realpath(path).startswith(_PACK_ROOT + os.sep) and "/tests/" not in path


def tensor_digest(t: torch.Tensor) -> tuple:
    """dtype, shape, device and a hash of the exact bytes (cheaper to keep than a copy of a model)."""
    t = t.detach()
    data = t.cpu().contiguous()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
    return ("tensor", str(t.dtype), tuple(t.shape), t.device.type, hashlib.blake2b(raw, digest_size=16).hexdigest())


def _weights_digest(sd: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tensor_digest(v) for k, v in sd.items()}


# ModelPatcher fields a node must leave alone: its weight patches, object patches, options (transformer
# options, patches, wrappers, sampler functions), wrappers, callbacks, injections, hooks, attachments.
_PATCHER_FIELDS = ("patches", "patches_uuid", "object_patches", "model_options", "weight_wrapper_patches",
                   "wrappers", "callbacks", "injections", "hook_patches", "current_hooks", "forced_hooks",
                   "attachments", "additional_models", "load_device", "offload_device", "hook_mode")


def snapshot_patcher(p: Any, *, weights: bool = True) -> dict:
    out = {f: snapshot(getattr(p, f, None), depth=1) for f in _PATCHER_FIELDS}
    out["model"] = ("obj", type(p.model).__qualname__, id(p.model))
    if hasattr(p.model, "model_sampling"):  # diffusion models (not CLIP, VAE or other managed modules)
        out["model_sampling"] = snapshot(p.get_model_object("model_sampling"), depth=1, expand=True)
    if weights:
        out["weights"] = _weights_digest(_pristine_state(p))
    return out


def snapshot(obj: Any, depth: int = 0, *, expand: bool = False) -> Any:
    """A comparable, deep picture of ``obj``.

    Tensors become a content hash; dicts, lists and tuples are walked; ModelPatcher / CLIP / VAE are
    taken apart (weights hashed, options walked); EditLab's own records (dataclasses and plain objects
    of this pack) are walked field by field; any other object is its type and identity
    (a node that swaps it shows; what happens inside a foreign object is that object's business).
    """
    if depth > 12:
        return ("deep", type(obj).__qualname__, id(obj))
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return obj
    if isinstance(obj, torch.Tensor):
        return tensor_digest(obj)
    if isinstance(obj, dict):
        return ("dict", {repr(k): snapshot(v, depth + 1) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, [snapshot(v, depth + 1) for v in obj])
    if isinstance(obj, uuid.UUID):
        return ("uuid", str(obj))
    if isinstance(obj, (set, frozenset)):
        return ("set", sorted(repr(v) for v in obj))
    if isinstance(obj, torch.nn.Module) and not expand:
        return ("module", type(obj).__qualname__, id(obj), _weights_digest(obj.state_dict()))
    if _is_patcher(obj):
        return ("patcher", snapshot_patcher(obj))
    if hasattr(obj, "patcher") and hasattr(obj, "cond_stage_model"):  # CLIP
        return ("clip", snapshot_patcher(obj.patcher), snapshot(getattr(obj, "layer_idx", None)),
                snapshot(getattr(obj, "tokenizer_options", None), depth + 1),
                snapshot(getattr(obj, "apply_hooks_to_conds", None), depth + 1))
    if hasattr(obj, "first_stage_model") and hasattr(obj, "patcher"):  # VAE
        return ("vae", _weights_digest(obj.first_stage_model.state_dict()), snapshot_patcher(obj.patcher, weights=False))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return ("dataclass", type(obj).__qualname__,
                {f.name: snapshot(getattr(obj, f.name), depth + 1) for f in dataclasses.fields(obj)})
    if expand or _is_ours(obj):
        fields = vars(obj) if hasattr(obj, "__dict__") else {}
        extra = ({k: getattr(obj, k) for k in type(obj).__slots__ if hasattr(obj, k)}
                 if hasattr(type(obj), "__slots__") else {})
        state = {**fields, **extra}
        if isinstance(obj, torch.nn.Module):  # parameters and buffers live outside __dict__
            state = {k: v for k, v in state.items() if not k.startswith("_")}
            state["state_dict"] = dict(obj.state_dict())
        return ("obj", type(obj).__qualname__, id(obj), {k: snapshot(v, depth + 1) for k, v in state.items()})
    return ("obj", type(obj).__qualname__, id(obj))


def diff(before: Any, after: Any, path: str = "") -> list[str]:
    """Where two snapshots differ, as readable paths (empty when equal)."""
    if type(before) is not type(after):
        return [f"{path or '<root>'}: {str(before)[:80]} -> {str(after)[:80]}"]
    if isinstance(before, dict):
        out = [f"{path}[{k}]: added" for k in after if k not in before]
        out += [f"{path}[{k}]: removed" for k in before if k not in after]
        for k in before:
            if k in after:
                out += diff(before[k], after[k], f"{path}[{k}]")
        return out
    if isinstance(before, (list, tuple)):
        if len(before) != len(after):
            return [f"{path}: length {len(before)} -> {len(after)}"]
        out = []
        for i, (x, y) in enumerate(zip(before, after)):
            out += diff(x, y, f"{path}[{i}]" if not (isinstance(x, str) and i == 0) else path)
        return out
    return [] if before == after else [f"{path or '<root>'}: {str(before)[:80]} -> {str(after)[:80]}"]
