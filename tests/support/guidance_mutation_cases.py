"""Mutation cases for the gradient-guidance nodes (issue 15) for tests/engine/test_mutation_engine.py.

The CLIP Guidance Loss reads the random CLIP the mutation context writes under the metric nodes' default name.
Each case: (the node's inputs, how its output is used afterwards: a guided sampling run).
"""
from __future__ import annotations

from typing import Callable

import torch


def cases(call: Callable, with_defaults: Callable, sample: Callable) -> dict[str, tuple]:
    def loss(c):
        return call("EditLabCLIPGuidanceLoss", **with_defaults(
            "EditLabCLIPGuidanceLoss", dict(text="a dog", image=c["image"], cutouts=2)))[0]

    def use_guider(c, kw, out):
        import comfy.samplers
        sigmas = comfy.samplers.calculate_sigmas(c["model"].get_model_object("model_sampling"), "karras", 2).cpu()
        sample(c["model"], None, None, {"samples": torch.zeros(1, 4, 8, 8)}, sigmas, guider=out[0])

    def plain_guider(c):
        import comfy.samplers
        g = comfy.samplers.CFGGuider(c["model"])
        g.set_conds(c["pos"], c["neg"])
        g.set_cfg(5.0)
        return g

    return {
        "EditLabCLIPGuidanceLoss": (lambda c: dict(text="a dog", image=c["image"], cutouts=2), None),
        "EditLabGradientGuider": (
            lambda c: dict(model=c["model"], positive=c["pos"], negative=c["neg"], loss=loss(c), vae=c["vae"],
                           scale=10.0, gradient_through="model"), use_guider),
        "EditLabGradientGuidance": (
            lambda c: dict(guider=plain_guider(c), loss=loss(c), vae=c["vae"], scale=10.0), use_guider),
    }
