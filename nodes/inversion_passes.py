"""The samplers DDIM Invert and Null-Text Optimize hand to ComfyUI's own guider (docs/methods.md §3-4).

Inversion and null-text optimisation run *inside* ``CFGGuider.sample`` with a custom ``Sampler`` object
(one that walks the schedule upwards, one that optimises), so model loading, conditioning processing,
LoRA patches and model wrappers all apply exactly as when sampling. Gradients for null-text run outside
inference mode through zero-copy, non-inference views of the weights (no second copy, no weight
gradients), restored on exit.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.samplers

from ..samplers import family as fam
from ..samplers.inversion import Inversion, ddim_invert
from ..samplers.null_text import NullTextConfig, NullTextStats, optimize_null_text
from .common import EditLabError, Progress
from .gradients import autograd_weights, with_cross_attn


def compute_dtype(base_model) -> torch.dtype:
    """The dtype a ComfyUI model computes in: its manual-cast dtype if set (weights stored lower), else its own."""
    return getattr(base_model, "manual_cast_dtype", None) or base_model.get_dtype()


class InversionPass(comfy.samplers.Sampler):
    """Walks the schedule upwards (DDIM inversion) with the guider's CFG-combined prediction.

    Returns x_T as the latent a sampler with noise disabled starts from: ComfyUI's samplers begin at
    ``noise_scaling(sigma0, 0, latent)`` (``(1 - sigma0) * latent`` on flow), so x_T goes out through the
    model's own ``inverse_noise_scaling(sigma0, x_T)`` (identity on k-space; docs/methods.md §11).
    """

    def __init__(self, scaling: str, progress: Progress, family: fam.ModelFamily = fam.K_SPACE):
        self.scaling = scaling
        self.progress = progress
        self.family = family
        self.trajectory: Optional[torch.Tensor] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        def denoise(x, s):
            return model_wrap(x, s, model_options=extra_args["model_options"], seed=extra_args.get("seed"))

        self.trajectory = ddim_invert(denoise, latent_image.float(), sigmas.float().cpu(), scaling=self.scaling,
                                      on_step=lambda *_: self.progress.step(), family=self.family)
        x_t = self.trajectory[0].to(latent_image)
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[:1].to(x_t), x_t)


class NullTextPass(comfy.samplers.Sampler):
    """Runs null-text optimisation with the guider's processed conds and loaded model."""

    def __init__(self, inv: Inversion, config: NullTextConfig, progress: Progress,
                 family: fam.ModelFamily = fam.K_SPACE):
        self.family = family
        self.inv = inv
        self.config = config
        self.progress = progress
        self.nulls: Optional[torch.Tensor] = None
        self.stats: Optional[NullTextStats] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        model = model_wrap.inner_model
        options = extra_args["model_options"]
        pos, neg = model_wrap.conds["positive"], model_wrap.conds["negative"]
        device = latent_image.device
        null_init = neg[0]["model_conds"]["c_crossattn"].cond

        def eps_of(conds, z, sigma):
            s = z.new_full((z.shape[0],), sigma)
            return (z - comfy.samplers.calc_cond_batch(model, [conds], z, s, options)[0]) / sigma

        def eps_cond(z, sigma):
            return eps_of(pos, z, sigma)

        def eps_uncond(z, sigma, emb):
            return eps_of(with_cross_attn(neg, emb), z, sigma)

        try:
            with torch.inference_mode(False), autograd_weights(model.diffusion_model):
                self.nulls, self.stats = optimize_null_text(
                    eps_cond, eps_uncond, self.inv.trajectory, self.inv.sigmas, null_init, self.config,
                    device=device, check_cancel=Progress.check_cancel, on_step=lambda *_: self.progress.step(),
                    half_precision=compute_dtype(model) == torch.float16, family=self.family)
        except RuntimeError as exc:
            # torch's own error, translated where it is found: it means a ControlNet / adapter without gradients.
            if "Inference tensors cannot be saved for backward" in str(exc):
                raise EditLabError(
                    "null-text optimisation needs gradients through every model in the conditioning; a ControlNet "
                    "or adapter attached to the conditioning cannot provide them. Optimise without it, then add it "
                    "for editing") from exc
            raise
        return latent_image
