"""What the inversion suite's nodes share: the INVERSION socket type, conditioning helpers and the
model-family check (docs/methods.md §3-4)."""
from __future__ import annotations

from typing import Optional

import torch

from comfy_api.latest import io

from ..samplers.family import ModelFamily
from ..samplers.inversion import Inversion
from .common import CATEGORY, EditLabError, model_sampling, model_type_name

INVERSION_CATEGORY = f"{CATEGORY}/Inversion"
InversionType = io.Custom("EDITLAB_INVERSION")


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


def check_family(inv: Inversion, model, family: ModelFamily) -> None:
    """An inversion made under one parametrisation is refused under another (e.g. a ModelSamplingSD3 patch added)."""
    made = inv.meta.get("family")
    if made is not None and made != family.name:
        raise EditLabError(
            f"the inversion was made with a {made} model, but this model ({model_type_name(model.model, model_sampling(model))}) "
            f"is {family.name}: invert again with this model (or remove the model-sampling patch)")
