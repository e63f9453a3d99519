"""Example workflows that measure (docs/methods.md §9): a method's sweep scored and plotted, an edit scored with
the PIE-Bench set. Merged into ``examples.EXAMPLES``; same style (see builder.py).

The metric models are local folders under models/editlab_metrics/ (README, "Measuring edits").
"""
from __future__ import annotations

from typing import Callable

from .builder import Graph

CLIP = "clip-vit-large-patch14"
T0S = (0.3, 0.45, 0.6, 0.75)
_MODELS_NOTE = ("* Metric models: Hugging Face folders under `models/editlab_metrics/` (`clip-vit-large-patch14`,\n"
                "  `dino-vitb8`, `lpips/`); README, *Measuring edits*, says where to get them. Nothing is downloaded.\n")


def ip2p_sweep_scored(info: dict) -> dict:
    from .examples_dual_cfg import IMAGE_SCALES, INSTRUCTION, TEXT_SCALES, _ip2p_inputs, ip2p_sweep_rows
    cols = len(IMAGE_SCALES) * 3
    g = Graph(info, stages=["load", "encode (three levels)", "sampling settings"]
              + [f"row s_I = {s_i}: s_T {', '.join(map(str, TEXT_SCALES))}" for s_i in IMAGE_SCALES for _ in range(3)]
              + ["score (CLIP directional)", "trade-off plot"])
    g.note(
        "## InstructPix2Pix: scale sweep scored, with the paper's trade-off plot\n\n"
        "Brooks et al. 2023, Fig. 8: every (s_I, s_T) pair of the sweep is scored with **CLIP directional\n"
        "similarity** (does the change match the caption change?) and **CLIP image similarity** (how much\n"
        "of the photo is kept). One curve per s_I, one point per s_T: the plot shows the trade-off.\n\n"
        "* Captions: describe the photo before and after the instruction (they only steer the score).\n"
        + _MODELS_NOTE +
        "* Each row's images are saved too; pick the pair at the knee of the curve.",
        width=480)
    ends: dict = {}
    rows = ip2p_sweep_rows(g, _ip2p_inputs(g, out=ends))
    data = None
    for s_i, images in zip(IMAGE_SCALES, rows):
        _d, _s, _report, points = g.add(
            "EditLabDirectionalCLIP", 3 + cols, title=f"score row s_I = {s_i}", source=ends["image"], edited=images,
            clip_model=CLIP, caption_before="a photo", caption_after=f"a photo, {INSTRUCTION}",
            series=f"s_I={s_i}")
        data = points if data is None else g.add("StringConcatenate", 3 + cols, string_a=data, string_b=points,
                                                  delimiter="\n")[0]
    (plot,) = g.add("EditLabMetricPlot", 4 + cols, data=data, x_label="CLIP image similarity",
                    y_label="CLIP directional similarity",
                    inputs={"title": f"s_T = {', '.join(map(str, TEXT_SCALES))} along each curve"})
    g.add("SaveImage", 4 + cols, images=plot, filename_prefix="editlab_ip2p_tradeoff")
    return g.to_json()


def sdedit_t0_sweep_scored(info: dict) -> dict:
    from .examples import CHECKPOINT, STROKE_IMAGE
    g = Graph(info, stages=["load", "encode"] + [f"t0 = {t}" for t in T0S]
              + ["decode and save", "score per t0", "plot"])
    g.note(
        "## SDEdit: realism vs faithfulness over t0, measured\n\n"
        "Meng et al. 2022, Fig. 4: the same stroke painting and seed, perturbed to each t0 and denoised.\n"
        "**L2 to the guide** (faithfulness; lower = closer to the strokes) grows with t0, **CLIP-T**\n"
        "(the image fits the prompt) rises as the result looks more real. Pick t0 where the curves cross\n"
        "your taste; the t0 search workflow automates it.\n\n"
        "* The x values of each Sweep Metric must list the t0 of the images, in batch order.\n"
        + _MODELS_NOTE,
        width=460)
    model, clip, vae = g.add("CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    prompt = "a photo of a mountain lake at sunset, detailed, realistic"
    (pos,) = g.add("CLIPTextEncode", 1, title="Positive prompt", text=prompt, clip=clip)
    (neg,) = g.add("CLIPTextEncode", 1, title="Negative prompt", text="blurry, lowres, watermark", clip=clip)
    image, _mask = g.add("LoadImage", 0, image=STROKE_IMAGE)
    (latent,) = g.add("VAEEncode", 1, pixels=image, vae=vae)
    (sampler,) = g.add("EditLabReverseSDESampler", 1)
    (noise,) = g.add("DisableNoise", 1)
    (guider,) = g.add("CFGGuider", 1, model=model, positive=pos, negative=neg, cfg=7.5)
    last = 1 + len(T0S)
    images = None
    for i, t0 in enumerate(T0S):
        noised, sigmas = g.add("EditLabSDEPerturb", 2 + i, title=f"SDE Perturb t0 = {t0}", model=model,
                               latent=latent, t0=t0, steps=20)
        _out, decoded = g.sample_decode(2 + i, noise=noise, guider=guider, sampler=sampler, sigmas=sigmas,
                                        latent=noised, vae=vae)
        images = decoded if images is None else g.add("ImageBatch", last + 1, image1=images, image2=decoded)[0]
    g.add("SaveImage", last + 1, images=images, filename_prefix="editlab_sdedit_t0_sweep")
    xs = ", ".join(map(str, T0S))
    l2, _m, _r = g.add("EditLabSweepMetric", last + 2, title="L2 to the guide", images=images, metric="l2",
                       x_values=xs, series="L2 to the guide", clip_model=CLIP, reference=image)
    clip_t, _m, _r = g.add("EditLabSweepMetric", last + 2, title="CLIP-T", images=images, metric="clip_t",
                           x_values=xs, series="CLIP-T", clip_model=CLIP, text=prompt)
    for points, label in ((l2, "L2 to the guide (lower = more faithful)"), (clip_t, "CLIP-T (higher = fits the prompt)")):
        (plot,) = g.add("EditLabMetricPlot", last + 3, title=f"plot: {label.split(' (')[0]}", data=points,
                        x_label="t0", y_label=label)
        g.add("SaveImage", last + 3, images=plot, filename_prefix="editlab_sdedit_t0_curve")
    return g.to_json()


def p2p_real_scored(info: dict) -> dict:
    from .examples_inversion import _p2p_real_photo

    def score(g: Graph, ends: dict) -> None:
        (edited,) = g.add("ImageFromBatch", 6, title="the edit row", image=ends["decoded"], batch_index=1, length=1)
        outs = g.add("EditLabEditMetrics", 6, source=ends["image"], edited=edited, clip_model=CLIP,
                     mask=ends["mask"], target_prompt=ends["target"])
        g.add("PreviewAny", 6, title="PIE-Bench metrics", source=outs[-1])

    return _p2p_real_photo(
        info, mode="direct", prefix="editlab_p2p_real_scored", blend_words="", self_replace_steps=0.6,
        then=score, extra_stages=("score (PIE-Bench set)",),
        note="## Edit a real photo and score it with the PIE-Bench metrics\n\n"
             "Direct inversion + Prompt-to-Prompt (as in *real photo, direct inversion*), then the edit row is\n"
             "measured against the photo like PIE-Bench (Ju et al. 2024): **structure distance** (DINO\n"
             "self-similarity), background **PSNR / LPIPS / MSE / SSIM** outside the edit mask, and **CLIP**\n"
             "similarity of the target prompt to the whole image and to the edited region.\n\n"
             "* Mask: paint the edited region in the photo's mask editor (LoadImage's alpha; 1 = edited).\n"
             "  With no mask the background metrics use the whole image and clip_edited reads NaN.\n"
             "* `pie_bench_compat` on reproduces the benchmark's own evaluation quirks, to compare with papers.\n"
             + _MODELS_NOTE)


EXAMPLES: dict[str, Callable[[dict], dict]] = {
    "InstructPix2Pix - scale sweep scored (CLIP trade-off plot)": ip2p_sweep_scored,
    "SDEdit - t0 sweep scored (L2 and CLIP-T per t0)": sdedit_t0_sweep_scored,
    "Prompt-to-Prompt - real photo edit scored (PIE-Bench metrics)": p2p_real_scored,
}
