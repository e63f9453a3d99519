"""No EditLab node mutates its inputs (house rule; ComfyUI caches and shares node outputs between nodes).

For every node with a socket input, each input is snapshotted deeply before the node runs and again after it
ran and after its output was used (a GUIDER, SAMPLER or patched MODEL does its work while sampling): every
tensor of a model's state dict is hashed, a ModelPatcher's patches, object patches and model_options
(transformer_options, patches, wrappers ...) are walked, and so are conditioning lists and their dicts,
LATENT dicts, images, masks and EditLab's own records (INVERSION, SUBJECT, P2P edit). See
tests/support/model_checks.py for what a snapshot holds.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest
import torch
from model_checks import diff, snapshot
from engine_calls import call, node_cls

# Fast settings for every widget of that name (64 px inputs, a handful of model calls per node).
FAST = {"steps": 2, "inner_steps": 1, "max_runs": 2, "tile_size": 16, "prompt_reps": 2, "cfg": 5.0}
# Socket types that carry data a node could mutate; every node taking one has a case below.
DATA_TYPES = {"MODEL", "CONDITIONING", "LATENT", "CLIP", "VAE", "IMAGE", "MASK", "SIGMAS", "SAMPLER",
              "EDITLAB_INVERSION", "EDITLAB_P2P_EDIT", "SUBJECT", "SUBJECT_ENCODER"}


def with_defaults(node_id: str, given: dict) -> dict:
    """``given`` plus every widget the node declares, at its FAST value or its default."""
    from comfy_api.latest import io
    kw = dict(given)
    for spec in node_cls(node_id).define_schema().inputs:
        if spec.id not in kw and isinstance(spec, io.WidgetInput) and spec.default is not None:
            kw[spec.id] = FAST.get(spec.id, spec.default)
        elif spec.id not in kw and isinstance(spec, io.Combo.Input) and spec.options:
            kw[spec.id] = spec.options[0]  # a combo without a default shows its first option
    return kw


def sample(model, positive, negative, latent, sigmas, sampler=None, guider=None, noise=None):
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    guider = guider or cs.CFGGuider().get_guider(model, positive, negative, 5.0)[0]
    with torch.inference_mode():
        return cs.SamplerCustomAdvanced().sample(noise or cs.Noise_RandomNoise(0), guider,
                                                 sampler or comfy.samplers.sampler_object("euler"),
                                                 sigmas, latent)[0]["samples"]


@pytest.fixture(scope="module")
def ctx(engine, sd15) -> dict[str, Any]:
    """Every kind of input, made once (the nodes that make INVERSION / P2P edit / SUBJECT are tested too)."""
    import comfy_extras.nodes_custom_sampler as cs
    import folder_paths
    import nodes
    import random_models
    from editlab.headless.examples_subject import SUBJECT_FOLDER
    from random_subject_encoder import write_subject_encoder_folder

    model, clip, vae = sd15
    with torch.inference_mode():
        image, mask = nodes.LoadImage().load_image("editlab_photo.png")
        (latent,) = nodes.VAEEncode().encode(vae, image)
        pos = nodes.CLIPTextEncode().encode(clip, "a red boat")[0]
        neg = nodes.CLIPTextEncode().encode(clip, "")[0]
        sigmas = cs.BasicScheduler().get_sigmas(model, "normal", 2, 0.6)[0]
    c = dict(model=model, clip=clip, vae=vae, image=image, mask=mask, latent=latent, pos=pos, neg=neg,
             sigmas=sigmas, sampler=call("EditLabReverseSDESampler", mode="stochastic", seed=0, repeat=1)[0])
    c["inv"], c["inv_noise"], c["inv_sigmas"] = call("EditLabDDIMInvert", **with_defaults(
        "EditLabDDIMInvert", dict(model=model, positive=pos, latent=latent)))
    (c["tuned"],) = call("EditLabNullTextOptimize", **with_defaults(
        "EditLabNullTextOptimize", dict(model=model, inversion=c["inv"], negative=neg)))
    c["pair"], c["edit"] = call("EditLabPromptPairEncode", **with_defaults(
        "EditLabPromptPairEncode", dict(clip=clip, blend_words="cat")))
    base = engine.root / "models" / "blip_diffusion"
    if not (base / SUBJECT_FOLDER).exists():
        write_subject_encoder_folder(base / SUBJECT_FOLDER, seed=0, width=768)
    folder_paths.add_model_folder_path("blip_diffusion", str(base), is_default=True)
    (c["encoder"],) = call("EditLabSubjectEncoderLoader", folder=SUBJECT_FOLDER)
    g = torch.Generator().manual_seed(0)
    c["subjects"] = [call("EditLabSubjectEncode", subject_encoder=c["encoder"],
                          image=torch.rand(1, 64, 64, 3, generator=g), class_word="dog")[0] for _ in range(3)]
    # An SDXL-family InstructPix2Pix model (tiny, in memory) with its three conditioning levels.
    ip2p = random_models.tiny_sdxl_model(seed=random_models.weight_seed(3), in_channels=8)
    image_latent = torch.randn(1, 4, 8, 8, generator=g)
    text, empty, pooled = torch.randn(1, 77, 2048, generator=g), torch.randn(1, 77, 2048, generator=g), \
        torch.randn(1, 1280, generator=g)
    c["ip2p"] = (ip2p, [[text, {"pooled_output": pooled, "concat_latent_image": image_latent}]],
                 [[empty, {"pooled_output": pooled, "concat_latent_image": image_latent}]],
                 [[empty, {"pooled_output": pooled, "concat_latent_image": torch.zeros_like(image_latent)}]])
    _write_metric_models(engine.root / "models" / "editlab_metrics")
    return c


def _write_metric_models(folder) -> None:
    """Random scorer models (CLIP, two ViTs, LPIPS backbone, Inception) under the metric nodes' default names."""
    import folder_paths
    import random_metric_models as rmm
    from editlab.metrics.names import DEFAULT_NAMES
    if not folder.exists():
        rmm.write_default_set(folder)
    if not (folder / DEFAULT_NAMES["inception"]).exists():
        rmm.write_inception(folder / DEFAULT_NAMES["inception"])
    folder_paths.add_model_folder_path("editlab_metrics", str(folder), is_default=True)


# Each case: (sockets and non-default widgets from ctx, how to use the outputs afterwards or None).
Case = tuple[Callable[[dict], dict], Callable[[dict, dict, tuple], Any] | None]


def _use_sampler(c, kw, out):
    noised, sigmas = call("EditLabSDEPerturb", model=c["model"], latent=c["latent"], t0=0.5, steps=2,
                          scheduler="normal", seed=0)
    import comfy_extras.nodes_custom_sampler as cs
    sample(c["model"], c["pos"], c["neg"], noised, sigmas, sampler=out[0], noise=cs.Noise_EmptyNoise())


def _use_inversion_guider(c, kw, out):
    import comfy_extras.nodes_custom_sampler as cs
    sample(kw["model"], None, None, c["inv_noise"], c["inv_sigmas"], guider=out[0], noise=cs.Noise_EmptyNoise())


def _use_dual_guider(c, kw, out):
    from comfy_extras.nodes_custom_sampler import BasicScheduler
    sigmas = BasicScheduler().get_sigmas(kw["model"], "normal", 2, 1.0)[0]
    sample(kw["model"], None, None, {"samples": torch.zeros(1, 4, 8, 8)}, sigmas, guider=out[0])


def _use_controlled_model(c, kw, out):
    (batch,) = call("EditLabP2PLatentBatch", latent={"samples": torch.zeros(1, 4, 8, 8)}, edit=kw["edit"])
    samples = sample(out[0], c["pair"], c["neg"], batch, c["sigmas"])
    call("EditLabAttentionMaps", model=out[0], samples={"samples": samples}, tile_size=16)


def _use_trained_model(c, kw, out):
    sample(out[0], c["pos"], c["neg"], {"samples": torch.zeros(1, 4, 8, 8)}, c["sigmas"])


def _maps_inputs(c) -> dict:
    """A controlled model that has sampled (so it holds maps), and what it sampled."""
    (controlled,) = call("EditLabAttentionController", **with_defaults(
        "EditLabAttentionController", dict(model=c["model"], edit=c["edit"])))
    (batch,) = call("EditLabP2PLatentBatch", latent={"samples": torch.zeros(1, 4, 8, 8)}, edit=c["edit"])
    return dict(model=controlled, samples={"samples": sample(controlled, c["pair"], c["neg"], batch, c["sigmas"])})


CASES: dict[str, Case] = {
    "EditLabSDEPerturb": (lambda c: dict(model=c["model"], latent=c["latent"]), None),
    "EditLabKnownRegionSampler": (
        lambda c: dict(sampler=c["sampler"], mask=c["mask"], guide=c["latent"], known_noise="fresh",
                       replace_on="both"), _use_sampler),
    "EditLabSDEditT0Search": (
        lambda c: dict(model=c["model"], positive=c["pos"], negative=c["neg"], sampler=c["sampler"],
                       guide=c["latent"], vae=c["vae"], t0_min=0.3, t0_max=0.7), None),
    "EditLabDDIMInvert": (lambda c: dict(model=c["model"], positive=c["pos"], latent=c["latent"]), None),
    "EditLabDDIMInvert[guided, own sigmas]": (
        lambda c: dict(model=c["model"], positive=c["pos"], latent=c["latent"], negative=c["neg"],
                       sigmas=c["inv_sigmas"], guidance=2.0), None),
    "EditLabNullTextOptimize": (
        lambda c: dict(model=c["model"], inversion=c["inv"], negative=c["neg"], secant=True), None),
    "EditLabInversionGuider": (
        lambda c: dict(model=c["model"], inversion=c["tuned"], positive=c["pos"], negative=c["neg"]),
        _use_inversion_guider),
    "EditLabSaveInversion": (lambda c: dict(inversion=c["tuned"], filename_prefix="mutation"), None),
    "EditLabLoadInversion": (lambda c: dict(model=c["model"], inversion=call(
        "EditLabSaveInversion", inversion=c["inv"], filename_prefix="mutation_load", source_prompt="")[0]), None),
    "EditLabReconstructionPSNR": (
        lambda c: dict(reconstruction=c["image"] * 0.9, original=c["image"]), None),
    "EditLabReconstructionPSNR[latents]": (
        lambda c: dict(reconstruction_latent=c["inv_noise"], original_latent=c["latent"]), None),
    "EditLabInstructPix2PixEncode": (lambda c: dict(clip=c["clip"], vae=c["vae"], image=c["image"]), None),
    "EditLabDualCFGCombiner": (
        lambda c: dict(model=c["ip2p"][0], both=c["ip2p"][1], base_only=c["ip2p"][2], neither=c["ip2p"][3],
                       schedule="linear", rescale=0.5), _use_dual_guider),
    "EditLabPromptPairEncode": (
        lambda c: dict(clip=c["clip"], mode="refine", target="a photo of a big cat riding a red bicycle",
                       reweight_words="red", blend_words="cat"), None),
    "EditLabP2PLatentBatch": (lambda c: dict(latent={"samples": torch.zeros(1, 4, 8, 8)}, edit=c["edit"]), None),
    "EditLabAttentionController": (
        lambda c: dict(model=c["model"], edit=c["edit"], start_blend=0.0), _use_controlled_model),
    "EditLabAttentionMaps": (_maps_inputs, None),
    "EditLabSubjectEncode": (lambda c: dict(subject_encoder=c["encoder"], image=c["image"][..., :3]), None),
    "EditLabSubjectPrompt": (lambda c: dict(clip=c["clip"], subject=c["subjects"][0]), None),
    "EditLabSubjectMix": (
        lambda c: dict(subject_a=c["subjects"][0], subject_b=c["subjects"][1], subject_c=c["subjects"][2],
                       weight_c=0.2), None),
    "EditLabSubjectEditPair": (
        lambda c: dict(clip=c["clip"], subject=c["subjects"][0], subject_word="dog", target_class="cat"), None),
    "EditLabRareTokenIdentifier": (lambda c: dict(clip=c["clip"]), None),
    "EditLabEditMetrics": (
        lambda c: dict(source=c["image"], edited=c["image"] * 0.9, mask=c["mask"], lpips_net="squeeze",
                       target_prompt="a red boat"), None),
    "EditLabSubjectMetrics": (
        lambda c: dict(generated=c["image"], references=c["image"].flip(1), prompt="a dog"), None),
    "EditLabCLIPScore": (lambda c: dict(image=c["image"], text="a dog", reference_image=c["image"].flip(2)), None),
    "EditLabDirectionalCLIP": (
        lambda c: dict(source=c["image"], edited=c["image"] * 0.9, caption_before="a boat",
                       caption_after="a red boat"), None),
    "EditLabSweepMetric": (
        lambda c: dict(images=c["image"], metric="clip_i", reference=c["image"].flip(1), x_values=""), None),
    "EditLabKID": (lambda c: dict(real=torch.cat([c["image"], c["image"].flip(1)]),
                                  generated=torch.cat([c["image"] * 0.9, c["image"].flip(2)]), subsets=3), None),
    "EditLabClassPriorImages": (
        lambda c: dict(model=c["model"], positive=c["pos"], negative=c["neg"], count=2, width=64, height=64,
                       chunk_size=2), None),
    "EditLabDreamBoothTrain": (
        lambda c: dict(model=c["model"], instance_latents=c["latent"], instance_conditioning=c["pos"],
                       class_latents={"samples": c["latent"]["samples"].flip(-1)}, class_conditioning=c["neg"],
                       rank=2, gradient_checkpointing=False), _use_trained_model),
}

import flow_mutation_cases  # noqa: E402  (FlowEdit / RF-Inversion need a flow model: built on first use)

CASES.update(flow_mutation_cases.cases(call, with_defaults, sample))

import guidance_mutation_cases  # noqa: E402  (gradient guidance: guided runs with the context's random CLIP)

CASES.update(guidance_mutation_cases.cases(call, with_defaults, sample))


def test_every_node_with_a_data_input_has_a_case(engine):
    from editlab.nodes import node_list
    covered = {name.split("[")[0] for name in CASES}
    missing = []
    for cls in node_list():
        schema = cls.define_schema()
        if any(spec.get_io_type() in DATA_TYPES for spec in schema.inputs) and schema.node_id not in covered:
            missing.append(schema.node_id)
    assert not missing, f"add a mutation case for {missing}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_node_leaves_every_input_untouched(ctx, case):
    node_id = case.split("[")[0]
    build, use = CASES[case]
    kw = with_defaults(node_id, build(ctx))
    before = {k: snapshot(v) for k, v in kw.items()}
    out = call(node_id, **kw)
    after_call = {k: snapshot(v) for k, v in kw.items()}
    changed = diff(before, after_call)
    assert not changed, f"{node_id} mutated its inputs while running:\n" + "\n".join(changed[:20])
    if use is not None:
        use(ctx, kw, out)
        changed = diff(before, {k: snapshot(v) for k, v in kw.items()})
        assert not changed, f"{node_id}'s output mutated the node's inputs when used:\n" + "\n".join(changed[:20])


def test_snapshots_see_the_mutations_a_node_could_make(ctx):
    """The check itself can fail: each kind of in-place change shows in the snapshot diff."""
    def shows(make, mutate) -> bool:
        obj = make()
        before = snapshot(obj)
        assert not diff(before, snapshot(obj))
        mutate(obj)
        return bool(diff(before, snapshot(obj)))

    model = lambda: ctx["model"].clone()  # noqa: E731
    cond = lambda: [[ctx["pos"][0][0].clone(), dict(ctx["pos"][0][1])]]  # noqa: E731
    latent = lambda: {"samples": ctx["latent"]["samples"].clone()}  # noqa: E731
    key = "diffusion_model." + next(iter(ctx["model"].model.diffusion_model.state_dict()))
    assert shows(model, lambda m: m.model_options.setdefault("transformer_options", {}).setdefault(
        "patches", {}).setdefault("attn2_patch", []).append(print))
    assert shows(model, lambda m: m.set_model_unet_function_wrapper(lambda f, a: f(a["input"], a["timestep"])))
    assert shows(model, lambda m: m.add_wrapper_with_key("outer_sample", "x", print))
    assert shows(model, lambda m: m.add_patches({key: (torch.zeros(1),)}, 1.0))
    assert shows(model, lambda m: m.add_object_patch("model_sampling", object()))
    assert shows(cond, lambda c: c[0][1].__setitem__("extra", 1))
    assert shows(cond, lambda c: c[0][0].mul_(1.0 + 1e-6))
    assert shows(latent, lambda x: x.__setitem__("noise_mask", torch.ones(1)))
    assert shows(latent, lambda x: x["samples"].add_(1e-7))
    inv = lambda: dataclasses.replace(ctx["inv"], meta=dict(ctx["inv"].meta),  # noqa: E731
                                      trajectory=ctx["inv"].trajectory.clone())
    assert shows(inv, lambda i: i.meta.__setitem__("mutated", True))
    assert shows(inv, lambda i: i.trajectory[0].add_(1e-6))
    # A weight changed in place in the shared model (restored at once: the model is the session's).
    base = snapshot(ctx["model"])
    param = dict(ctx["model"].model.named_parameters())[key]
    with torch.inference_mode():  # the session model's weights are inference tensors
        saved = param.detach().clone()
        try:
            param.view(-1)[0] += 1.0
            assert diff(base, snapshot(ctx["model"]))
        finally:
            param.copy_(saved)
    assert not diff(base, snapshot(ctx["model"]))
