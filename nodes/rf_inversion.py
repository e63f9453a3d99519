"""RF-Inversion (Rout et al., ICLR 2025; docs/methods.md §11) on flow-matching models, with no replaced
forward function:

- ``EditLabRFInversionInvert``: the controlled forward ODE (eq. 8, gamma toward a seeded noise sample) run
  inside ComfyUI's own CFGGuider with a custom ``Sampler`` (as DDIM Invert does), producing the pack's
  INVERSION record (Save / Load Inversion store it like any other; ``meta["method"] = "rf-inversion"``);
- ``EditLabRFInversionGuider``: the controlled reverse ODE (Algorithm 2, eta on a window of steps) as a
  GUIDER that blends the denoised prediction toward the source, ``(1 - eta) D + eta y0``; with the euler
  sampler this is the authors' step exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..samplers import family as fam
from ..samplers.inversion import Inversion, check_schedule
from ..samplers.rf_inversion import DEFAULTS, check_gamma, check_window, controlled_denoised, controlled_forward, eta_at
from . import fingerprint
from .common import (
    EditLabError,
    EditLabNode,
    Progress,
    check_choice,
    latent_samples,
    model_sampling,
    noise_for,
    refuse_no_uncond,
)
from .flow_edit import FLOW_CATEGORY, require_flow
from .inversion_common import InversionType, check_family, conditioning_tensors

METHOD = "rf-inversion"


class RFInvertPass(comfy.samplers.Sampler):
    """Runs the controlled forward ODE with the guider's prediction; returns x_T as a DisableNoise start latent."""

    def __init__(self, gamma: float, y1: torch.Tensor, progress: Progress):
        self.gamma, self.y1, self.progress = gamma, y1, progress
        self.trajectory: Optional[torch.Tensor] = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        options, seed = extra_args["model_options"], extra_args.get("seed")

        def velocity(x, sigma):
            s = x.new_full((x.shape[0],), sigma)
            return fam.derivative(x, model_wrap(x, s, model_options=options, seed=seed), sigma)

        y0 = latent_image.float()
        self.trajectory = controlled_forward(velocity, y0, sigmas.float().cpu(), self.gamma, self.y1.to(y0),
                                             on_step=lambda *_: self.progress.step())
        x_t = self.trajectory[0].to(latent_image)
        # ComfyUI's samplers start at noise_scaling(sigma0, 0, latent) = (1 - sigma0) * latent on flow.
        return model_wrap.inner_model.model_sampling.inverse_noise_scaling(sigmas[:1].to(x_t), x_t)


class RFInversionInvert(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabRFInversionInvert",
            display_name="RF-Inversion Invert",
            category=FLOW_CATEGORY,
            description="RF-Inversion's controlled forward ODE (Rout et al., ICLR 2025, eq. 8): inverts the image "
                        "latent to noise while gamma pulls it toward a fixed noise sample (seed), which makes the "
                        "inverted latent more typical and so more editable. Outputs a reusable INVERSION (save it "
                        "with Save Inversion), the noise latent and the SIGMAS for RF-Inversion Guider. Authors: "
                        f"Flux-dev, {DEFAULTS['steps']} steps, gamma {DEFAULTS['gamma']}, an empty source prompt with "
                        "guidance 0 (FluxGuidance 0). Flow models only (SD3.x, Flux).",
            inputs=[
                io.Model.Input("model", tooltip="An SD3.x or Flux model; edit with the same one."),
                io.Conditioning.Input("positive", tooltip="The source prompt. Authors: an empty prompt; on Flux-dev "
                                                          "with guidance 0 (FluxGuidance 0)."),
                io.Latent.Input("latent", tooltip="The VAE-encoded input image."),
                io.Int.Input("steps", default=DEFAULTS["steps"], min=1, max=1000,
                             tooltip=f"Inversion steps; edit with the same schedule (authors: {DEFAULTS['steps']})."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="simple",
                               tooltip="The scheduler (on the model's own shift); 'simple' follows the model's schedule."),
                io.Float.Input("gamma", default=DEFAULTS["gamma"], min=0.0, max=1.0, step=0.05,
                               tooltip="Pull toward the noise sample: 0 = plain ODE inversion (most faithful, least "
                                       f"editable), 1 = ignore the image. Authors: {DEFAULTS['gamma']}."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the noise sample y1 that gamma pulls toward (ComfyUI's RandomNoise draw)."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="A custom schedule (descending, ending at 0); overrides steps and scheduler."),
            ],
            outputs=[
                InversionType.Output(display_name="inversion", tooltip="Trajectory, schedule, source conditioning, model fingerprint."),
                io.Latent.Output(display_name="noise", tooltip="The inverted latent: start RF-Inversion Guider here (Disable Noise)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule to edit with (must match)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, latent, steps, scheduler, gamma, seed, sigmas=None) -> io.NodeOutput:
        family = require_flow(model, "RF-Inversion Invert")
        gamma = check_gamma(gamma)
        samples = latent_samples(latent, "latent")
        emb, pooled = conditioning_tensors(positive, "positive")
        if sigmas is None:
            check_choice(scheduler, comfy.samplers.SCHEDULER_NAMES, "scheduler")
            sigmas = comfy.samplers.calculate_sigmas(model_sampling(model), scheduler, steps)
            schedule_name = scheduler
        else:
            schedule_name = "custom"
        sigmas = sigmas.float().cpu()
        # A pre-noised flow latent cannot be sampled from sigma 1 (the sampler multiplies it by 1 - sigma).
        top = fam.cap_start(family, float(sigmas[0]))
        sigmas = check_schedule(torch.cat([sigmas.new_tensor([top]), sigmas[1:][sigmas[1:] < top]]))
        y1 = noise_for({"samples": samples}, seed).float()
        progress = Progress(len(sigmas) - 1)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        pass_ = RFInvertPass(gamma, y1, progress)
        x_t = guider.sample(torch.zeros_like(samples), samples, pass_, sigmas, disable_pbar=True, seed=0)
        guidance = positive[0][1].get("guidance")
        inv = Inversion(sigmas=sigmas, trajectory=pass_.trajectory, source_embedding=emb.detach().float().cpu(),
                        source_pooled=None if pooled is None else pooled.detach().float().cpu(),
                        model_id=fingerprint.model_identity(model), guidance=1.0, scaling="reference",
                        meta={"steps": len(sigmas) - 1, "scheduler": schedule_name, "family": family.name,
                              "method": METHOD, "gamma": gamma, "seed": int(seed),
                              "flux_guidance": None if guidance is None else float(guidance)})
        out = {"samples": x_t.to(comfy.model_management.intermediate_device()).float()}
        return io.NodeOutput(inv, out, sigmas.clone())


class RFInversionGuider(comfy.samplers.CFGGuider):
    """CFG sampling whose denoised prediction is pulled toward the source on the eta window (Algorithm 2)."""

    def __init__(self, model_patcher, inv: Inversion, eta: float, start: int, stop: int):
        super().__init__(model_patcher)
        check_window(eta, start, stop)
        self.inversion, self.eta, self.start, self.stop = inv, float(eta), int(start), int(stop)

    def sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
        inv = self.inversion
        first = inv.check_schedule_matches(sigmas)
        if tuple(latent_image.shape[1:]) != tuple(inv.trajectory.shape[2:]):
            raise EditLabError(f"the latent {tuple(latent_image.shape)} does not match the inverted image "
                               f"{tuple(inv.trajectory.shape[1:])}; sample from RF-Inversion Invert's noise latent")
        # Every row starts from the inversion's own latent at the schedule's first level (row r: inversion row
        # r mod batch), so a loaded file, a tail of the schedule and a batch of edits all start right.
        base, ms = self.model_patcher.model, model_sampling(self.model_patcher)
        level = inv.sigmas[first:first + 1].float()
        start = base.process_latent_out(ms.inverse_noise_scaling(level, inv.trajectory[first].clone()))
        rows = torch.arange(latent_image.shape[0]) % inv.batch
        latent_image = start[rows].to(latent_image)
        self._y0 = inv.trajectory[-1][rows].to(self.model_patcher.load_device)
        return super().sample(noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed)

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
        denoised = comfy.samplers.sampling_function(self.inner_model, x, timestep, self.conds.get("negative"),
                                                    self.conds.get("positive"), self.cfg, model_options=model_options, seed=seed)
        eta = eta_at(self.inversion.step_index(float(timestep.flatten()[0])), self.eta, self.start, self.stop)
        return controlled_denoised(denoised, self._y0.to(denoised), eta)


class RFInversionGuiderNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabRFInversionGuider",
            display_name="RF-Inversion Guider",
            category=FLOW_CATEGORY,
            description="RF-Inversion's controlled reverse ODE (Rout et al., ICLR 2025, Algorithm 2): samples the "
                        "target prompt from the inversion while eta pulls the prediction toward the source image on "
                        "steps start_step .. stop_step - 1 (0 = the noisiest), which keeps layout and identity; after "
                        "the window the prompt alone decides the details. Use with SamplerCustomAdvanced, the euler "
                        "sampler (the authors' step), Disable Noise, and the inversion's noise and sigmas. Authors "
                        f"(Flux-dev, {DEFAULTS['steps']} steps): eta {DEFAULTS['eta']}, steps {DEFAULTS['start_step']} "
                        f"to {DEFAULTS['stop_step']}, FluxGuidance {DEFAULTS['guidance']}. Nothing changes? Lower eta "
                        "or stop_step. Flow models only.",
            inputs=[
                io.Model.Input("model", tooltip="The model the inversion was made with."),
                InversionType.Input("inversion", tooltip="From RF-Inversion Invert or Load Inversion."),
                io.Conditioning.Input("positive", tooltip="The target prompt (on Flux-dev with FluxGuidance, authors: 3.5)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Real CFG scale (needs negative); 1 = none, as on Flux-dev (guidance-distilled)."),
                io.Float.Input("eta", default=DEFAULTS["eta"], min=0.0, max=1.0, step=0.05,
                               tooltip="Pull toward the source on the window: 1 = reconstruct, 0 = plain sampling. "
                                       f"Authors: {DEFAULTS['eta']} (pipeline default 1.0); lower for larger edits."),
                io.Int.Input("start_step", default=DEFAULTS["start_step"], min=0, max=1000,
                             tooltip="First step of the eta window (0 = the noisiest step). Authors: 0."),
                io.Int.Input("stop_step", default=DEFAULTS["stop_step"], min=0, max=1000,
                             tooltip="The window ends before this step. Authors: 7 of 28 (a quarter); longer = more "
                                     "faithful, shorter = larger edits."),
                io.Conditioning.Input("negative", optional=True, tooltip="Unconditional prompt, needed only when cfg != 1."),
                io.Boolean.Input("check_model", default=True, optional=True,
                                 tooltip="Refuse an inversion made with another model (weights or LoRA differ)."),
            ],
            outputs=[io.Guider.Output(tooltip="Use with SamplerCustomAdvanced + euler + Disable Noise + the inversion's sigmas.")],
        )

    @classmethod
    def execute(cls, model, inversion, positive, cfg, eta, start_step, stop_step, negative=None,
                check_model=True) -> io.NodeOutput:
        family = require_flow(model, "RF-Inversion Guider")
        check_window(eta, start_step, stop_step)
        if cfg != 1.0:
            refuse_no_uncond("RF-Inversion Guider", model.model, model_sampling(model),
                             f"cfg {cfg} (real CFG) does not apply; set cfg 1 and the strength with FluxGuidance")
            if negative is None:
                raise EditLabError(f"cfg {cfg} needs a negative (unconditional) conditioning: connect one, or set cfg 1")
        inv: Inversion = inversion
        fingerprint.check_model(inv, model, check_model)
        check_family(inv, model, family)
        guider = RFInversionGuider(model, inv, eta, start_step, stop_step)
        guider.set_conds(positive, negative if negative is not None else positive)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [RFInversionInvert, RFInversionGuiderNode]
