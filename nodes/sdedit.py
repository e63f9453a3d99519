"""SDEdit and GLIDE-style inpainting nodes (docs/methods.md §1-2).

- ``EditLabSDEPerturb``: guide LATENT -> x(t0) = x0 + sigma(t0) z (flow models: (1 - sigma) x0 + sigma z)
  and the SIGMAS tail, for any sampler run with noise disabled.
- ``EditLabReverseSDESampler``: the reverse VE-SDE Euler–Maruyama SAMPLER (stochastic, seeded, or
  deterministic), with SDEdit's repeat-K.
- ``EditLabKnownRegionSampler``: wraps *any* SAMPLER so that only the masked region is regenerated,
  re-noising the known region with the same draw (SDEdit) or a fresh draw each step (GLIDE/RePaint),
  on x_t and/or on the x0 prediction.
- ``EditLabSDEditT0Search``: bisection for the largest t0 within a faithfulness budget.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

import comfy.model_management
import comfy.samplers
from comfy_api.latest import io

from ..samplers import family as fam
from ..samplers.sdedit import (
    KNOWN_NOISE,
    REPLACE_ON,
    REVERSE_MODES,
    KnownRegion,
    latent_distance,
    sample_reverse_sde,
    search_t0,
    seeded_noise,
    with_known_region,
)
from .common import (
    CATEGORY,
    EditLabError,
    EditLabNode,
    Progress,
    cancel_callback,
    check_choice,
    family_of,
    latent_mask,
    latent_samples,
    model_family,
    model_sampling,
    noise_for,
    noise_latent,
    sdedit_sigmas,
    to_latent_space,
    to_model_space,
)

SDEDIT_CATEGORY = f"{CATEGORY}/SDEdit"
SEED_MAX = 0xFFFFFFFFFFFFFFFF
MASK_CONVENTIONS = ("1 = regenerate (ComfyUI)", "1 = keep (GLIDE)")


def _t0_input(default: float = 0.5) -> io.Float.Input:
    return io.Float.Input(
        "t0", default=default, min=0.01, max=1.0, step=0.01,
        tooltip="How far into the noise schedule to perturb the guide (fraction of the model's timesteps: "
                "sigma(t0) = sigma(timestep t0 * 999) on SD1.x). Larger = more realistic, less faithful. "
                "Paper range for stroke guides: 0.3-0.6; 1.0 = ignore the guide.",
    )


def _scheduler_input() -> io.Combo.Input:
    return io.Combo.Input(
        "scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
        tooltip="Noise schedule whose tail (from sigma(t0) down to 0) is sampled.",
    )


def perturbed_latent(model, latent: dict, t0: float, steps: int, scheduler: str, seed: int) -> tuple[dict, torch.Tensor]:
    """The SDEdit perturbation as a LATENT ready for a sampler with noise disabled, and its SIGMAS tail.

    ``x(t0)`` is the model's own ``noise_scaling(sigma0, z, x0)`` in model space (``x0 + sigma0 z``, or
    ``(1 - sigma0) x0 + sigma0 z`` on flow, docs/methods.md §1, §11), with ``z`` the draw ComfyUI's
    RandomNoise makes for the same seed. A sampler with noise disabled starts from
    ``noise_scaling(sigma0, 0, latent)`` (``(1 - sigma0) * latent`` on flow), so the latent handed over is
    the model's ``inverse_noise_scaling(sigma0, x(t0))`` (identity on k-space), returned unscaled
    (ComfyUI scales it back in before sampling). On flow sigma0 is capped below 1 (``family.cap_start``).
    """
    samples = latent_samples(latent, "guide latent")
    if "noise_mask" in latent:
        raise EditLabError(
            "the guide LATENT carries a noise_mask. SDE Perturb pre-noises the latent, so ComfyUI's native "
            "mask re-insertion would paste the noisy guide back. Remove the mask from the latent and connect "
            "it to 'EditLab Known-Region Sampler' (with this guide latent on its 'guide' input) instead."
        )
    sigmas = sdedit_sigmas(model, t0, steps, scheduler)  # decides the family first (refuses unknown ones)
    ms = model_sampling(model)
    x0 = to_model_space(model, samples.float())
    z = noise_for(latent, seed).to(x0.dtype)
    x = ms.inverse_noise_scaling(sigmas[:1].to(x0), noise_latent(ms, x0, z, float(sigmas[0])))
    out = {k: v for k, v in latent.items() if k != "samples"}
    out["samples"] = to_latent_space(model, x)
    return out, sigmas


class SDEPerturb(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSDEPerturb",
            display_name="SDE Perturb (SDEdit)",
            category=SDEDIT_CATEGORY,
            description="SDEdit step 1 (Meng et al. 2022): noise a guide latent (stroke painting, photo) to "
                        "sigma(t0) and output the SIGMAS tail from sigma(t0) to 0. Feed both to "
                        "SamplerCustomAdvanced with DisableNoise and any sampler (EditLab Reverse SDE Sampler "
                        "is the paper's).",
            inputs=[
                io.Model.Input("model", tooltip="The model whose noise schedule defines sigma(t0)."),
                io.Latent.Input("latent", tooltip="The guide: a VAE-encoded stroke painting or photo."),
                _t0_input(),
                io.Int.Input("steps", default=20, min=1, max=10000,
                             tooltip="Denoising steps actually run, from sigma(t0) down to 0."),
                _scheduler_input(),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the perturbation noise (the same draw RandomNoise makes for this seed)."),
            ],
            outputs=[
                io.Latent.Output(display_name="noised", tooltip="x(t0) = guide + sigma(t0) * noise (flow models: (1 - sigma) * guide + sigma * noise; sample it with noise disabled)."),
                io.Sigmas.Output(display_name="sigmas", tooltip="The schedule tail from sigma(t0) to 0."),
            ],
        )

    @classmethod
    def execute(cls, model, latent, t0, steps, scheduler, seed) -> io.NodeOutput:
        noised, sigmas = perturbed_latent(model, latent, t0, steps, scheduler, seed)
        return io.NodeOutput(noised, sigmas)


class ReverseSDESampler(comfy.samplers.KSAMPLER):
    """ComfyUI SAMPLER around :func:`sample_reverse_sde`, told the model family it samples (docs/methods.md §11).

    With ``repeat`` rounds the host's progress callback is told the whole run's length
    (``repeat * steps``), so the progress bar and the previews count every round.
    """

    def __init__(self, sampler_function, repeat: int = 1):
        super().__init__(sampler_function)
        self.repeat = int(repeat)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        family = family_of(model_wrap.inner_model, model_wrap.inner_model.model_sampling)
        if callback is not None and self.repeat > 1:
            host, rounds = callback, self.repeat

            def callback(step, x0, x, total_steps):
                return host(step, x0, x, total_steps * rounds)

        # A per-run sampler with the family bound: this SAMPLER object (a cached node output) is not mutated.
        run = comfy.samplers.KSAMPLER(functools.partial(self.sampler_function, family=family))
        return run.sample(model_wrap, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)


class ReverseSDESamplerNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabReverseSDESampler",
            display_name="Reverse SDE Sampler (SDEdit)",
            category=SDEDIT_CATEGORY,
            description="SDEdit step 2: the reverse VE-SDE solved with Euler–Maruyama (Meng et al. 2022), as a "
                        "SAMPLER for SamplerCustomAdvanced. 'deterministic' drops the noise and halves the drift "
                        "(probability flow). repeat > 1 re-perturbs the result to the first sigma and samples "
                        "again, K times (the paper's K). On flow models (SD3.x, Flux) the stochastic step is the "
                        "exact Gaussian posterior step of the (1 - sigma) x0 + sigma z marginal, the deterministic "
                        "one the flow ODE's Euler step.",
            inputs=[
                io.Combo.Input("mode", options=list(REVERSE_MODES), default="stochastic",
                               tooltip="stochastic: Euler–Maruyama with fresh noise each step (the paper). "
                                       "deterministic: probability-flow ODE, no noise."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the per-step noise (and of the re-perturbation when repeat > 1)."),
                io.Int.Input("repeat", default=1, min=1, max=20,
                             tooltip="Perturb-and-reverse rounds K (reference examples use K = 3); 1 = plain SDEdit."),
            ],
            outputs=[io.Sampler.Output(tooltip="Use with SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, mode, seed, repeat) -> io.NodeOutput:
        check_choice(mode, REVERSE_MODES, "mode")
        if repeat < 1:
            raise EditLabError(f"repeat must be at least 1, got {repeat}")
        draw_seed = int(seed)

        def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, family=fam.K_SPACE):
            return sample_reverse_sde(model, x, sigmas, extra_args, callback, disable, mode=mode,
                                      noise_source=seeded_noise(draw_seed), repeat=int(repeat), family=family)

        return io.NodeOutput(ReverseSDESampler(fn, int(repeat)))


class _DenoiserProxy:
    """Looks like ComfyUI's guider to a sampler, but evaluates through ``denoise`` (no patching)."""

    def __init__(self, guider, denoise):
        self._guider = guider
        self._denoise = denoise

    def __call__(self, x, sigma, *args, **kwargs):
        return self._denoise(x, sigma, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._guider, name)


class KnownRegionSampler(comfy.samplers.Sampler):
    """Any SAMPLER, regenerating only the masked region (stroke editing, GLIDE-style inpainting)."""

    def __init__(self, inner, mask: Optional[torch.Tensor], guide: Optional[dict], mask_keeps: bool,
                 known_noise: str, replace_on: str, seed: int):
        self.inner = inner
        self.mask = mask
        self.guide = guide
        self.mask_keeps = mask_keeps
        self.known_noise = known_noise
        self.replace_on = replace_on
        self.seed = seed

    def max_denoise(self, model_wrap, sigmas):
        return self.inner.max_denoise(model_wrap, sigmas)

    def _guide(self, model_wrap, noise, latent_image, device):
        if self.guide is not None:
            g = latent_samples(self.guide, "guide latent")
            if tuple(g.shape) != tuple(latent_image.shape):
                raise EditLabError(
                    f"guide latent {tuple(g.shape)} and sampled latent {tuple(latent_image.shape)} differ; "
                    "connect the latent the sampled one was made from"
                )
            return model_wrap.inner_model.process_latent_in(g.to(device, latent_image.dtype))
        if not torch.any(noise):
            raise EditLabError(
                "the sampled latent was pre-noised (noise is disabled), so the clean guide is unknown: connect "
                "the clean latent (e.g. the VAE Encode output fed to SDE Perturb) to the 'guide' input"
            )
        return latent_image

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False):
        if latent_image is None:
            raise EditLabError("the Known-Region sampler needs a latent to keep regions of")
        ms = model_wrap.inner_model.model_sampling
        family = family_of(model_wrap.inner_model, ms)  # before any work: refuses an unknown parametrisation
        device = latent_image.device
        if self.mask is not None:
            mask = latent_mask(self.mask, latent_image).to(device, latent_image.dtype)
            if self.mask_keeps:
                mask = 1.0 - mask
        elif denoise_mask is not None:
            mask = denoise_mask[:, :1].to(device, latent_image.dtype)
        else:
            raise EditLabError("no mask: connect a MASK to the Known-Region sampler or set a noise mask on the latent")
        guide = self._guide(model_wrap, noise, latent_image, device)
        x_init = ms.noise_scaling(sigmas[0], noise.to(device), latent_image, self.max_denoise(model_wrap, sigmas))
        # The draw that explains the start: (x - guide) / sigma, or (x - (1 - sigma) guide) / sigma on flow.
        sigma0 = float(sigmas[0])
        fixed = fam.noise_from_denoised(family, x_init, guide, sigma0) if sigma0 > 0 else torch.zeros_like(guide)
        known = KnownRegion(guide=guide, mask=mask, noise=fixed, known_noise=self.known_noise, replace_on=self.replace_on,
                            family=family)
        known.check(latent_image)
        proxy = _DenoiserProxy(model_wrap, with_known_region(model_wrap, known, seeded_noise(self.seed)))
        # This wrapper owns the known region now; ComfyUI's fixed-noise re-insertion is switched off.
        samples = self.inner.sample(proxy, sigmas, extra_args, callback, noise, latent_image, None, disable_pbar)
        if float(sigmas[-1]) == 0.0:
            samples = ms.inverse_noise_scaling(sigmas[-1], known.finish(samples))
        return samples


class KnownRegionSamplerNode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabKnownRegionSampler",
            display_name="Known-Region Sampler (masked SDEdit / GLIDE inpaint)",
            category=SDEDIT_CATEGORY,
            description="Wraps any SAMPLER so that only the masked region is regenerated (Meng et al. 2022 "
                        "stroke editing; Nichol et al. 2022 GLIDE-style inpainting with models not trained for "
                        "inpainting). Unlike ComfyUI's noise mask (one fixed noise draw), the known region can be "
                        "re-noised with a fresh draw every step and written back on x_t, on the x0 prediction, "
                        "or both. The final result keeps the guide exactly outside the mask.",
            inputs=[
                io.Sampler.Input("sampler", tooltip="Any sampler: EditLab Reverse SDE Sampler, or KSamplerSelect's."),
                io.Combo.Input("mask_convention", options=list(MASK_CONVENTIONS),
                               default="1 = regenerate (ComfyUI)",
                               tooltip="How to read the mask: ComfyUI masks (LoadImage alpha) mark the region to "
                                       "regenerate with 1; GLIDE marks the region to keep with 1."),
                io.Combo.Input("known_noise", options=list(KNOWN_NOISE), default="same",
                               tooltip="same: re-noise the known region with the draw that started sampling "
                                       "(SDEdit). fresh: a new draw every step (GLIDE / RePaint), usually "
                                       "better seams."),
                io.Combo.Input("replace_on", options=list(REPLACE_ON), default="x_t",
                               tooltip="Where the known region is written back: the running sample x_t "
                                       "(SDEdit, diffusers), the x0 prediction (GLIDE), or both (ComfyUI's "
                                       "noise mask)."),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Seed of the fresh known-region draws (known_noise = fresh)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region mask at image or latent size. If absent, the latent's noise mask is used."),
                io.Latent.Input("guide", optional=True,
                                tooltip="The clean latent to keep. Needed when the sampled latent was pre-noised "
                                        "by SDE Perturb; otherwise the sampled latent itself is the guide."),
            ],
            outputs=[io.Sampler.Output(tooltip="Use with SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, sampler, mask_convention, known_noise, replace_on, seed, mask=None, guide=None) -> io.NodeOutput:
        if not hasattr(sampler, "sample"):
            raise EditLabError("'sampler' must be a SAMPLER (e.g. from KSamplerSelect)")
        keeps = check_choice(mask_convention, MASK_CONVENTIONS, "mask_convention") == MASK_CONVENTIONS[1]
        check_choice(known_noise, KNOWN_NOISE, "known_noise")
        check_choice(replace_on, REPLACE_ON, "replace_on")
        if guide is not None:
            samples = latent_samples(guide, "guide latent")
            if mask is not None:
                latent_mask(mask, samples)  # refuse a wrong-size mask now, before any sampling work
        return io.NodeOutput(KnownRegionSampler(sampler, mask, guide, keeps, known_noise, replace_on, int(seed)))


class SDEditT0Search(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSDEditT0Search",
            display_name="SDEdit t0 Search",
            category=SDEDIT_CATEGORY,
            description="Finds the largest t0 (most realistic result) whose output stays within a faithfulness "
                        "budget of the guide, by bisection with a fixed seed (SDEdit §4: realism vs "
                        "faithfulness). Distance: mean squared error against the guide, in pixel space "
                        "([0,1] RGB) when a VAE is connected, else on the latent. Each trial is one full "
                        "SDE Perturb + sampling run.",
            inputs=[
                io.Model.Input("model", tooltip="The model every trial samples with (its noise schedule defines sigma(t0))."),
                io.Conditioning.Input("positive", tooltip="What the result should look like."),
                io.Conditioning.Input("negative", tooltip="Unconditional / negative prompt."),
                io.Sampler.Input("sampler", tooltip="The reverse sampler used for every trial."),
                io.Latent.Input("guide", tooltip="The guide latent (stroke painting or photo)."),
                io.Float.Input("budget", default=0.02, min=1e-6, max=100.0, step=0.001,
                               tooltip="Largest allowed mean squared error to the guide (pixel MSE on [0,1] "
                                       "with a VAE: 0.01 ~ PSNR 20 dB; latent MSE without)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="Classifier-free guidance scale."),
                io.Int.Input("steps", default=20, min=1, max=10000, tooltip="Steps of each trial."),
                _scheduler_input(),
                io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                             tooltip="Fixed seed shared by all trials (monotone faithfulness needs it fixed)."),
                io.Int.Input("max_runs", default=8, min=2, max=16, tooltip="Sampler runs at most (each is a full sampling)."),
                io.Float.Input("t0_min", default=0.05, min=0.01, max=1.0, step=0.01, tooltip="Smallest t0 considered."),
                io.Float.Input("t0_max", default=1.0, min=0.01, max=1.0, step=0.01, tooltip="Largest t0 considered."),
                io.Vae.Input("vae", optional=True, tooltip="Measure the distance in pixel space (decodes each trial)."),
            ],
            outputs=[
                io.Latent.Output(display_name="result", tooltip="The output at the chosen t0."),
                io.Float.Output(display_name="t0", tooltip="The chosen t0."),
                io.Float.Output(display_name="distance", tooltip="Its distance to the guide (same units as budget)."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, sampler, guide, budget, cfg, steps, scheduler, seed,
                max_runs, t0_min, t0_max, vae=None) -> io.NodeOutput:
        g = latent_samples(guide, "guide latent")
        if t0_min >= t0_max:
            raise EditLabError(f"t0_min ({t0_min}) must be smaller than t0_max ({t0_max})")
        # Refuse what every trial would refuse, before the first trial (and before decoding the guide).
        model_family(model)
        check_choice(scheduler, comfy.samplers.SCHEDULER_NAMES, "scheduler")
        progress = Progress(max_runs)
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        reference = g.float()
        decoded_reference = vae.decode(reference).float() if vae is not None else None

        def run(t0: float):
            noised, sigmas = perturbed_latent(model, guide, t0, steps, scheduler, seed)
            x = noised["samples"]
            out = guider.sample(torch.zeros_like(x), x, sampler, sigmas, callback=cancel_callback(),
                                disable_pbar=True, seed=seed)
            out = out.to(comfy.model_management.intermediate_device())
            if vae is not None:
                dist = float(latent_distance(vae.decode(out).float(), decoded_reference).mean())
            else:
                dist = float(latent_distance(out, reference).mean())
            return out, dist

        found = search_t0(run, budget, lo=t0_min, hi=t0_max, max_runs=max_runs, on_trial=lambda *_: progress.step())
        result = {k: v for k, v in guide.items() if k not in ("samples", "noise_mask")}
        result["samples"] = found.result
        return io.NodeOutput(result, found.t0, found.distance)


NODES = [SDEPerturb, ReverseSDESamplerNode, KnownRegionSamplerNode, SDEditT0Search]
