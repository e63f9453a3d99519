"""Mutation cases for the flow-only nodes (FlowEdit, RF-Inversion) for tests/engine/test_mutation_engine.py.

They refuse SD1.5, so their inputs come from a tiny random SD3-architecture model (``flow_models``), built
once on first use. Each case: (the node's inputs, how its output is used afterwards).
"""
from __future__ import annotations

import functools
from typing import Any, Callable


@functools.lru_cache(maxsize=1)
def _flow() -> dict[str, Any]:
    import flow_models as fm
    return {"model": fm.tiny_sd3_model(0), "src": fm.sd3_conditioning(1), "tar": fm.sd3_conditioning(2),
            "neg": fm.sd3_conditioning(3), "latent": fm.flow_latent(3)}


def cases(call: Callable, with_defaults: Callable, sample: Callable) -> dict[str, tuple]:
    # ComfyUI is importable only once the engine fixture has booted it: imports stay inside the cases.
    def sigmas(model, steps=2):
        import comfy.samplers
        return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).cpu()

    def inversion():
        f = _flow()
        return call("EditLabRFInversionInvert", **with_defaults(
            "EditLabRFInversionInvert", dict(model=f["model"], positive=f["src"], latent=f["latent"])))

    def use_flowedit_guider(c, kw, out):
        import comfy_extras.nodes_custom_sampler as cs
        (sampler,) = call("EditLabFlowEditSampler", n_max=2, n_min=0, n_avg=1, seed=0)
        sample(kw["model"], None, None, _flow()["latent"], sigmas(kw["model"]), sampler=sampler, guider=out[0],
               noise=cs.Noise_EmptyNoise())

    def use_rf_guider(c, kw, out):
        import comfy_extras.nodes_custom_sampler as cs
        _, noise, sig = inversion()
        sample(kw["model"], None, None, noise, sig, guider=out[0], noise=cs.Noise_EmptyNoise())

    def use_rf_inversion(c, kw, out):
        import comfy_extras.nodes_custom_sampler as cs
        inv, noise, sig = out
        (guider,) = call("EditLabRFInversionGuider", **with_defaults(
            "EditLabRFInversionGuider", dict(model=kw["model"], inversion=inv, positive=_flow()["tar"], negative=_flow()["neg"])))
        sample(kw["model"], None, None, noise, sig, guider=guider, noise=cs.Noise_EmptyNoise())

    f = _flow
    return {
        "EditLabFlowEditGuider": (
            lambda c: dict(model=f()["model"], source=f()["src"], target=f()["tar"], negative=f()["neg"],
                           source_scale=3.5, target_scale=13.5), use_flowedit_guider),
        "EditLabRFInversionInvert": (
            lambda c: dict(model=f()["model"], positive=f()["src"], latent=f()["latent"],
                           sigmas=sigmas(f()["model"], 3)), use_rf_inversion),
        "EditLabRFInversionGuider": (
            lambda c: dict(model=f()["model"], inversion=inversion()[0], positive=f()["tar"], negative=f()["neg"]),
            use_rf_guider),
    }

