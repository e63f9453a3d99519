"""Inversion Guider: samples from an INVERSION (docs/methods.md §4): null-text / negative-prompt / direct /
plain CFG replay of the pivot, on the inversion's schedule or a tail of it. Direct and plain work on every
model family; null-text and negative-prompt need an unconditional branch, so they are refused on
guidance-distilled flow models (Flux-dev; docs/methods.md §11)."""
from __future__ import annotations

import torch

import comfy.samplers
from comfy_api.latest import io

from ..samplers.inversion import Inversion, landing_denoised
from .common import EditLabError, EditLabNode, check_choice, model_family, model_sampling, refuse_no_uncond
from . import fingerprint
from .inversion_common import INVERSION_CATEGORY, InversionType, check_family, source_conditioning
from .gradients import with_cross_attn

MODES = ["null-text", "negative-prompt", "direct", "plain"]
MATCH = dict(rtol=1e-4, atol=1e-4)  # a latent that went through process_latent_out and back in


class InversionGuider(comfy.samplers.CFGGuider):
    """Samples from an INVERSION: null-text / negative-prompt / direct / plain CFG replay (rows [source, ...])."""

    def __init__(self, model_patcher, inv: Inversion, mode: str):
        super().__init__(model_patcher)
        self.inversion = inv
        self.mode = check_choice(mode, MODES, "mode")
        if mode == "null-text" and inv.null_embeddings is None:
            raise EditLabError("mode 'null-text' needs an inversion with null embeddings: run Null-Text Optimize "
                               "on it first (or use 'negative-prompt' / 'direct', which need no optimisation)")

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        if self.mode == "negative-prompt":
            conds["source"] = source_conditioning(self.inversion)
        self.inner_set_conds(conds)

    def start_latent(self, latent_image: torch.Tensor, start: int) -> torch.Tensor:
        """The latent a tail of the schedule (first level ``sigmas[start]``) starts from.

        The inversion holds the pivot at every level, so a tail starts where the pivot is at its first
        sigma, not from x_T (which belongs to sigma_max: starting a tail there replays garbage). Each row
        given as DDIM Invert's noise x_T (row r of an edit batch is inversion row r mod batch) is replaced
        by the pivot at that level; a row already at that level is kept; anything else is refused.
        """
        inv = self.inversion
        base = self.model_patcher.model
        ms = self.model_patcher.get_model_object("model_sampling")
        sigma = inv.sigmas[start:start + 1].float()
        # Where a sampler with noise disabled starts from each row: noise_scaling(sigma, 0, latent), i.e. the
        # latent itself on k-space and (1 - sigma) * latent on flow (docs/methods.md §11).
        given = base.process_latent_in(latent_image.detach().float().cpu())
        given = ms.noise_scaling(sigma, torch.zeros_like(given), given)
        out = latent_image.clone()
        x_t, level = inv.trajectory[0], inv.trajectory[start]
        x_t = ms.noise_scaling(sigma, torch.zeros_like(x_t), ms.inverse_noise_scaling(inv.sigmas[:1].float(), x_t))
        for r in range(given.shape[0]):
            j = r % inv.batch
            if torch.allclose(given[r], level[j], **MATCH):
                continue
            if not torch.allclose(given[r], x_t[j], **MATCH):
                raise EditLabError(
                    f"the sampling schedule is a tail of the inversion's: it starts at step {start} of {inv.steps} "
                    f"(sigma {float(inv.sigmas[start]):.4g}), where the guider starts from the inversion's own latent. "
                    f"Latent row {r} is neither DDIM Invert's noise (x_T) nor the inversion's latent at that level; "
                    "connect DDIM Invert's (or Load Inversion's) noise output as the latent")
            out[r] = base.process_latent_out(ms.inverse_noise_scaling(sigma, level[j:j + 1].clone())).to(out)[0]
        return out

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        inv = self.inversion
        start = inv.check_schedule_matches(sigmas)
        if tuple(latent_image.shape[1:]) != tuple(inv.trajectory.shape[2:]):
            raise EditLabError(f"the latent {tuple(latent_image.shape)} does not match the inverted image "
                               f"{tuple(inv.trajectory.shape[1:])}; sample from DDIM Invert's noise latent")
        if latent_image.shape[0] < inv.batch:
            raise EditLabError(f"the latent batch ({latent_image.shape[0]}) is smaller than the inversion's "
                               f"({inv.batch}); rows are [source, target, ...]")
        if start > 0:
            latent_image = self.start_latent(latent_image, start)
        # Moved to the model's device once per run, not once per step.
        device = self.model_patcher.load_device
        self._trajectory = inv.trajectory.to(device)
        self._nulls = None if inv.null_embeddings is None else inv.null_embeddings.to(device)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        inv = self.inversion
        sigma = float(timestep.flatten()[0])
        i = inv.step_index(sigma)
        positive = self.conds.get("positive")
        if self.mode == "null-text":
            negative = with_cross_attn(self.conds["negative"], self._nulls[i].to(x.device))
        elif self.mode == "negative-prompt":
            negative = self.conds["source"]
        else:
            negative = self.conds.get("negative")
        denoised = comfy.samplers.sampling_function(self.inner_model, x, timestep, negative, positive, self.cfg,
                                                    model_options=model_options, seed=seed)
        if self.mode == "direct":
            k = inv.batch
            target = self._trajectory[i + 1].to(x.device, x.dtype)
            denoised = denoised.clone()
            denoised[:k] = landing_denoised(x[:k], target, sigma, float(inv.sigmas[i + 1]))
        return denoised


class InversionGuiderNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabInversionGuider",
            display_name="Inversion Guider",
            category=INVERSION_CATEGORY,
            description="A GUIDER that edits from an INVERSION with any single-evaluation sampler (euler, ddim). "
                        "Latent rows are [source, target, ...] starting from DDIM Invert's noise. Modes: "
                        "null-text (per-step optimised null embeddings as the unconditional branch, all rows; "
                        "Mokady 2023), negative-prompt (the source prompt as the unconditional branch, no "
                        "optimisation; Miyake 2023), direct (the source row is snapped onto the pivot after every "
                        "step, so it reconstructs exactly; Ju et al. 2024), plain (ordinary CFG: the drift baseline). "
                        "A tail of the inversion's SIGMAS (e.g. SplitSigmas' low half) starts from the inversion's "
                        "own latent at its first sigma. Flow models (SD3.x, Flux): every mode where the model has "
                        "an unconditional branch; on guidance-distilled Flux (dev) only direct and plain.",
            inputs=[
                io.Model.Input("model", tooltip="The model (may carry a Prompt-to-Prompt attention controller)."),
                InversionType.Input("inversion", tooltip="From DDIM Invert / Null-Text Optimize / Load Inversion."),
                io.Conditioning.Input("positive", tooltip="Prompts per row: [source, target, ...] (or one prompt for all rows)."),
                io.Conditioning.Input("negative", tooltip="Unconditional prompt (null-text mode replaces its embedding per step)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale (paper: 7.5)."),
                io.Combo.Input("mode", options=MODES, default="null-text",
                               tooltip="How the inversion is honoured while sampling (see the node description)."),
                io.Boolean.Input("check_model", default=True,
                                 tooltip="Refuse an inversion made with another model (weights or LoRA differ)."),
            ],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced + DisableNoise + DDIM Invert's noise and sigmas.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, negative, cfg, mode, check_model) -> io.NodeOutput:
        check_choice(mode, MODES, "mode")
        family = model_family(model)
        if mode in ("null-text", "negative-prompt"):
            refuse_no_uncond(f"Inversion Guider (mode {mode!r})", model.model, model_sampling(model),
                             f"mode {mode!r} (it replaces the unconditional prediction) does not apply")
        inv: Inversion = inversion
        fingerprint.check_model(inv, model, check_model)
        check_family(inv, model, family)
        guider = InversionGuider(model, inv, mode)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)

