"""Inversion suite nodes (docs/methods.md §3-4): DDIM Invert, Null-Text Optimize, Reconstruction PSNR, and
the suite's node list. The guider, the file nodes, the in-guider samplers and the model fingerprint live in
inversion_guider.py, inversion_io.py, inversion_passes.py and fingerprint.py.
"""
from __future__ import annotations

import logging
import statistics

import torch

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..samplers import family as fam
from ..samplers.inversion import INPUT_SCALINGS, Inversion, check_schedule, psnr
from ..samplers.null_text import NullTextConfig
from . import fingerprint
from .common import (
    EditLabError,
    EditLabNode,
    Progress,
    check_choice,
    latent_samples,
    model_family,
    model_sampling,
    refuse_no_uncond,
)
from .inversion_common import (
    INVERSION_CATEGORY,
    InversionType,
    check_family,
    conditioning_tensors,
    source_conditioning,
)
from .inversion_guider import InversionGuiderNode
from .inversion_io import LoadInversion, SaveInversion
from .inversion_passes import InversionPass, NullTextPass

log = logging.getLogger("editlab")


class DDIMInvert(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabDDIMInvert",
            display_name="DDIM Invert",
            category=INVERSION_CATEGORY,
            description="DDIM inversion (Song et al. 2021; the pivot of null-text inversion, Mokady et al. 2023): "
                        "runs the sampling schedule backwards from the image latent with the source prompt and "
                        "keeps the whole trajectory (off the GPU). The step evaluates eps on the current latent at "
                        "the next level's timestep, as the reference does. Outputs the INVERSION, the noise latent "
                        "x_T to start editing from (with DisableNoise) and the SIGMAS to sample with. On flow models "
                        "(SD3.x, Flux) it is the first-order inversion of the flow ODE, x' = x + (sigma' - sigma) v; "
                        "the top level is capped at 1 - 2^-10 so that x_T can be sampled with DisableNoise.",
            inputs=[
                io.Model.Input("model", tooltip="The model to invert with (edit with the same one)."),
                io.Conditioning.Input("positive", tooltip="The source prompt: a description of the input image."),
                io.Latent.Input("latent", tooltip="The VAE-encoded input image."),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip="Inversion steps (paper: 50)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="ddim_uniform gives the DDIM timesteps (981 ... 1 for 50 steps on SD1.x)."),
                io.Float.Input("guidance", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG scale while inverting; 1 (no guidance) is the reference pivot."),
                io.Combo.Input("input_scaling", options=list(INPUT_SCALINGS), default="reference",
                               tooltip="reference: the UNet sees the current latent in its own DDPM scaling at the next "
                                       "timestep (Mokady / PnP next_step). k-space: the k-space latent at the next "
                                       "sigma (exact for a point-mass model, slightly different on real ones)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Unconditional prompt, needed only when guidance != 1."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A custom schedule (descending, ending at 0); overrides steps and scheduler."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="Trajectory, schedule, source conditioning, model fingerprint."),
                io.Latent.Output(display_name="noise", tooltip="x_T: start sampling here with DisableNoise."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to sample with (must match)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, guidance, input_scaling, negative=None,
                sigmas=None) -> io.NodeOutput:
        family = model_family(model)
        check_choice(input_scaling, INPUT_SCALINGS, "input_scaling")
        fam.inversion_input_scale(family, input_scaling, 0.0, 0.5)  # refuses 'k-space' on flow, before any work
        samples = latent_samples(latent, "latent")
        emb, pooled = conditioning_tensors(positive, "positive")
        if emb.shape[0] not in (1, samples.shape[0]):
            raise EditLabError(f"the source conditioning has batch {emb.shape[0]} but the latent has {samples.shape[0]}; "
                               "use one prompt, or one per image")
        if guidance != 1.0:
            refuse_no_uncond("DDIM Invert", model.model, model_sampling(model),
                             f"guidance {guidance} (real CFG while inverting) does not apply; set guidance 1")
        if guidance != 1.0 and negative is None:
            raise EditLabError("guidance != 1 needs a negative (unconditional) conditioning: connect one, or set guidance 1")
        if sigmas is None:
            if steps < 1:
                raise EditLabError(f"steps must be at least 1, got {steps}")
            check_choice(scheduler, comfy.samplers.SCHEDULER_NAMES, "scheduler")
            sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
            schedule_name = scheduler
        else:
            schedule_name = "custom"
        sigmas = check_schedule(_cap_flow_start(family, sigmas.float().cpu()))
        progress = Progress(len(sigmas) - 1)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative if negative is not None else positive)
        guider.set_cfg(guidance)
        pass_ = InversionPass(input_scaling, progress, family)
        x_t = guider.sample(torch.zeros_like(samples), samples, pass_, sigmas, disable_pbar=True, seed=0)
        inv = Inversion(sigmas=sigmas, trajectory=pass_.trajectory, source_embedding=emb.detach().float().cpu(),
                        source_pooled=None if pooled is None else pooled.detach().float().cpu(),
                        model_id=fingerprint.model_identity(model), guidance=float(guidance), scaling=input_scaling,
                        meta={"steps": len(sigmas) - 1, "scheduler": schedule_name, "family": family.name})
        out = {"samples": x_t.to(comfy.model_management.intermediate_device()).float()}
        return io.NodeOutput(inv, out, sigmas.clone())


def _cap_flow_start(family: fam.ModelFamily, sigmas: torch.Tensor) -> torch.Tensor:
    """On flow, the top level capped at ``family.FLOW_SIGMA_CAP`` (levels not below it dropped): a sampler with
    noise disabled starts from ``(1 - sigma0) * latent``, which carries nothing at sigma0 = 1."""
    top = fam.cap_start(family, float(sigmas[0]))
    if top == float(sigmas[0]):
        return sigmas
    rest = sigmas[1:][sigmas[1:] < top]
    return torch.cat([sigmas.new_tensor([top]), rest])


class NullTextOptimize(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabNullTextOptimize",
            display_name="Null-Text Optimize",
            category=INVERSION_CATEGORY,
            description="Null-text inversion (Mokady et al., CVPR 2023): optimises one unconditional embedding "
                        "per step so that CFG sampling at 'guidance' retraces the DDIM pivot. Adam in fp32 "
                        "whatever the model's dtype; early stop per step; progress bar per step; cancel works "
                        "at any inner iteration. Sample the result with Inversion Guider in 'null-text' mode.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                InversionType.Input("inversion", tooltip="From DDIM Invert."),
                io.Conditioning.Input("negative", tooltip="The empty-prompt conditioning: the starting null embedding."),
                io.Float.Input("guidance", default=7.5, min=1.0, max=30.0, step=0.1,
                               tooltip="The CFG scale you will edit with (paper: 7.5)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Adam iterations per step at most (paper: 10)."),
                io.Float.Input("early_stop", default=1e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="Stop a step's optimisation when the loss < early_stop + i * early_stop_slope (paper: 1e-5)."),
                io.Float.Input("early_stop_slope", default=2e-5, min=0.0, max=1.0, step=1e-6,
                               tooltip="Per-step growth of the early-stop threshold (paper: 2e-5)."),
                io.Float.Input("learning_rate", default=1e-2, min=1e-6, max=1.0, step=1e-4,
                               tooltip="Adam learning rate at step 0, decayed as lr * (1 - i/100) (paper: 1e-2). "
                                       "Faster: 5e-2 with inner_steps 4 matched the paper's reconstruction with "
                                       "40% of the backward passes on the benchmark's weights; check it on yours "
                                       "with Reconstruction PSNR."),
                io.Boolean.Input("check_model", default=True,
                                 tooltip="Refuse an inversion made with another model (weights or LoRA differ)."),
                io.Boolean.Input("secant", default=False, optional=True,
                                 tooltip="EditLab's faster optimiser (off = the paper). Each forward also measures "
                                         "how far the last Adam update should have gone (a secant of the loss's "
                                         "own residual, no extra model pass) and adds the missing or excess part "
                                         "to the next update: a lower loss for the same inner steps. The console "
                                         "line after the run gives the median measured factor: near 1 the "
                                         "learning rate fits this model, 3 or more means it is too small."),
            ],
            outputs=[InversionType.Output(display_name="inversion", tooltip="The inversion with one null embedding per step.")],
        )

    @classmethod
    def execute(cls, model, inversion, negative, guidance, inner_steps, early_stop, early_stop_slope, learning_rate,
                check_model, secant=False) -> io.NodeOutput:
        family = model_family(model)
        refuse_no_uncond("Null-Text Optimize", model.model, model_sampling(model),
                         "null-text inversion (it optimises the unconditional embedding) does not apply")
        inv: Inversion = inversion
        check_family(inv, model, family)
        fingerprint.check_model(inv, model, check_model)
        emb, _ = conditioning_tensors(negative, "negative")
        if emb.shape[-1] != inv.source_embedding.shape[-1]:
            raise EditLabError(f"negative embedding width {emb.shape[-1]} does not match the source's "
                               f"{inv.source_embedding.shape[-1]}; encode it with the same CLIP")
        config = NullTextConfig(guidance=guidance, inner_steps=inner_steps, epsilon=early_stop,
                                epsilon_slope=early_stop_slope, lr=learning_rate, secant=bool(secant))
        progress = Progress(inv.steps)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(source_conditioning(inv), negative)
        guider.set_cfg(guidance)
        pass_ = NullTextPass(inv, config, progress, family)
        x_t = inv.noise
        guider.sample(torch.zeros_like(x_t), torch.zeros_like(x_t), pass_, inv.sigmas, disable_pbar=True, seed=0)
        stats = pass_.stats
        median = round(statistics.median(stats.secant_factors), 4) if stats.secant_factors else None
        out = inv.with_nulls(pass_.nulls, null_text={
            "guidance": guidance, "forwards": stats.forwards, "backwards": stats.backwards,
            "final_losses": [round(v, 8) for v in stats.losses[-3:]],
            "iterations": list(stats.iterations), "fp16_loss_scale": stats.loss_scale,
            "skipped_updates": stats.skipped_updates, "secant": bool(secant),
            "secant_factor_median": median})
        early = sum(1 for it in stats.iterations if it < inner_steps)
        log.info("EditLab null-text: %d UNet forwards, %d backwards, %d of %d steps stopped early%s.",
                 stats.forwards, stats.backwards, early, len(stats.iterations),
                 f", secant factor median {median}" if secant else "")
        return io.NodeOutput(out)


class ReconstructionPSNR(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabReconstructionPSNR",
            display_name="Reconstruction PSNR",
            category=INVERSION_CATEGORY,
            description="How good is an inversion? PSNR (dB) of a reconstruction against the original: images on "
                        "[0, 1] (peak 1), or latents (peak = the original latent's value range). Higher is better; "
                        "'direct' reconstructs to float precision (very high or inf).",
            inputs=[
                io.Image.Input("reconstruction", optional=True, tooltip="Decoded reconstruction."),
                io.Image.Input("original", optional=True, tooltip="The input image."),
                io.Latent.Input("reconstruction_latent", optional=True, tooltip="Reconstructed latent (instead of images)."),
                io.Latent.Input("original_latent", optional=True, tooltip="The original latent."),
                io.Int.Input("row", default=0, min=0, max=63, tooltip="Which batch row of the reconstruction to compare (the source row is 0)."),
            ],
            outputs=[io.Float.Output(display_name="psnr", tooltip="PSNR in dB (higher is better; 1000 stands for identical)."), io.String.Output(display_name="report", tooltip="The PSNR with what was compared, as text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, row, reconstruction=None, original=None, reconstruction_latent=None, original_latent=None) -> io.NodeOutput:
        if reconstruction is not None and original is not None:
            a, b, what, rng = reconstruction, original, "image", 1.0
        elif reconstruction_latent is not None and original_latent is not None:
            a, b = latent_samples(reconstruction_latent, "reconstruction"), latent_samples(original_latent, "original")
            what, rng = "latent", None
        else:
            raise EditLabError("connect both images (reconstruction + original) or both latents")
        if row >= a.shape[0]:
            raise EditLabError(f"row {row} does not exist (the reconstruction has {a.shape[0]} rows)")
        a = a[row:row + 1]
        b = b[:1] if b.shape[0] != 1 and row >= b.shape[0] else b[min(row, b.shape[0] - 1):][:1]
        value = psnr(a, b, rng)
        report = f"{what} PSNR of row {row}: {value:.2f} dB"
        return io.NodeOutput(value if value != float("inf") else 1000.0, report, ui={"text": [report]})


NODES = [DDIMInvert, NullTextOptimize, InversionGuiderNode, SaveInversion, LoadInversion, ReconstructionPSNR]
