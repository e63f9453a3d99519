"""What the inversion suite's nodes share: the INVERSION socket type, conditioning helpers and the
model-family check (docs/methods.md §3-4)."""
from __future__ import annotations

from typing import Optional

import torch

import comfy.conds
from comfy_api.latest import io

from ..samplers.inversion import Inversion
from .common import CATEGORY, EditLabError, is_k_space, model_sampling

INVERSION_CATEGORY = f"{CATEGORY}/Inversion"
InversionType = io.Custom("EDITLAB_INVERSION")


def refuse_flow_model(model, node: str) -> None:
    """The suite's maths is k-space (x = x0 + sigma eps, docs/methods.md §3-4); a flow-matching model
    (SD3, Flux: x = (1 - sigma) x0 + sigma eps, §11) would be inverted and replayed silently wrong.
    Called first, before any work."""
    ms = model_sampling(model)
    if not is_k_space(ms):
        kinds = "/".join(c.__name__ for c in type(ms).__mro__[1:] if c.__module__.startswith("comfy."))
        raise EditLabError(
            f"{node}: the model ({type(model.model).__name__}, model sampling {kinds or type(ms).__name__}) is a "
            "flow-matching model (e.g. SD3, Flux), which the inversion suite does not support yet; it inverts "
            "eps / v-prediction models (SD1.x, SD2.x, SDXL). Use one of those (without a ModelSamplingSD3 / "
            "ModelSamplingFlux patch)")


def conditioning_tensors(cond: list, what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The cross-attention embedding and pooled output of a single-entry CONDITIONING."""
    if not isinstance(cond, list) or not cond or not torch.is_tensor(cond[0][0]):
        raise EditLabError(f"{what}: expected a CONDITIONING (from CLIP Text Encode)")
    if len(cond) > 1:
        raise EditLabError(f"{what}: combined conditionings ({len(cond)} entries) are not supported for inversion; "
                           "use a single CLIP Text Encode")
    emb, extra = cond[0][0], cond[0][1]
    if not torch.isfinite(emb).all():
        raise EditLabError(f"{what}: the conditioning contains NaN or inf")
    pooled = extra.get("pooled_output")
    return emb, pooled


def source_conditioning(inv: Inversion) -> list:
    extra = {} if inv.source_pooled is None else {"pooled_output": inv.source_pooled}
    return [[inv.source_embedding, extra]]


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
