"""Metric nodes on the real ComfyUI: validated and executed by ComfyUI's own executor, hand-checked values."""
from __future__ import annotations

import math
import os

import pytest

import random_metric_models as rmm

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="engine tier: set COMFYUI_PATH")
SIZE = 32


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    from editlab.headless import runner
    runner.boot(COMFYUI_PATH)
    import folder_paths
    root = tmp_path_factory.mktemp("editlab_metrics")
    rmm.write_default_set(root)
    folder_paths.add_model_folder_path("editlab_metrics", str(root), is_default=True)
    return runner, root


def _outputs(result, node: str) -> list:
    """The node's outputs (first list item of each)."""
    return [o[0] for o in result.node_output(node)]


def _image(color: int, batch: int = 1) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": batch, "color": color}}


def _edit_prompt(compat: bool, prompt: str = "a grey [square]") -> dict:
    return {
        "1": _image(0x000000, 2), "2": _image(0x808080),
        "3": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": SIZE, "height": SIZE}},
        "4": {"class_type": "EditLabEditMetrics", "inputs": {
            "source": ["1", 0], "edited": ["2", 0], "mask": ["3", 0], "clip_model": "clip-vit-large-patch14",
            "structure_model": "dino-vitb8", "lpips_net": "squeeze", "pie_bench_compat": compat,
            "target_prompt": prompt}},
        "5": {"class_type": "PreviewAny", "inputs": {"source": ["4", 7]}},
    }


def test_edit_metrics_by_hand_and_compat(comfy, tmp_path):
    runner, _ = comfy
    d2 = (128 / 255) ** 2  # black source, grey edit, no edit region: every pixel is background
    res = runner.run_prompt(_edit_prompt(False), output_dir=str(tmp_path))
    out = _outputs(res, "4")
    keys = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited")
    values = dict(zip(keys, out[:7]))
    assert values["mse"] == pytest.approx(d2, rel=1e-5)
    assert values["psnr"] == pytest.approx(-10 * math.log10(d2), rel=1e-5)
    assert values["lpips"] > 0 and 0 <= values["ssim"] < 1 and -1 <= values["clip_whole"] <= 1
    assert math.isnan(values["clip_edited"])  # no edited region
    assert "rows:" in out[7]  # a batch of two source rows is scored row by row
    res = runner.run_prompt(_edit_prompt(True), output_dir=str(tmp_path))
    compat = _outputs(res, "4")
    assert compat[3] == pytest.approx(d2 * (SIZE - 2) ** 2 / SIZE ** 2, rel=1e-5)  # border forced, zeros counted
    assert compat[7].startswith("PIE-Bench compat") and "squeeze" in compat[7]
    assert compat[5] >= 0  # max(100 cos, 0)


def test_metric_models_are_managed_by_comfyui(comfy, tmp_path):
    import comfy.model_management as mm
    runner, _ = comfy
    runner.run_prompt(_edit_prompt(False), output_dir=str(tmp_path))
    import sys
    import nodes
    node_metrics = sys.modules[nodes.NODE_CLASS_MAPPINGS["EditLabEditMetrics"].__module__]  # the module ComfyUI loaded
    managed = {id(p.model) for p in node_metrics._PATCHERS.values()}
    loaded = {id(m.model.model) for m in mm.current_loaded_models}
    assert managed and managed <= loaded


def test_missing_model_is_a_clear_node_error(comfy, tmp_path):
    runner, root = comfy
    prompt = _edit_prompt(False)
    os.rename(root / "dino-vitb8", root / "moved")
    try:
        with pytest.raises(runner.RunError, match=r"dino-vitb8.*not found; searched.*config.json"):
            runner.run_prompt(prompt, output_dir=str(tmp_path))
    finally:
        os.rename(root / "moved", root / "dino-vitb8")


def test_subject_clip_score_directional_and_plot(comfy, tmp_path):
    runner, _ = comfy
    prompt = {
        "1": _image(0x204080, 2), "2": _image(0x204080), "3": _image(0x802010),
        "4": {"class_type": "EditLabSubjectMetrics", "inputs": {
            "generated": ["1", 0], "references": ["2", 0], "prompt": "a dog", "clip_model": "clip-vit-large-patch14",
            "dino_model": "dino-vits16"}},
        "5": {"class_type": "EditLabCLIPScore", "inputs": {"image": ["1", 0], "clip_model": "clip-vit-large-patch14",
                                                           "text": "", "reference_image": ["2", 0]}},
        "6": {"class_type": "EditLabDirectionalCLIP", "inputs": {
            "source": ["2", 0], "edited": ["3", 0], "clip_model": "clip-vit-large-patch14",
            "caption_before": "a blue square", "caption_after": "a red square"}},
        "7": {"class_type": "EditLabMetricPlot", "inputs": {"data": "a, 0.8, 0.1\na, 0.7, 0.2", "x_label": "x",
                                                            "y_label": "y", "title": "", "width": 200, "height": 150}},
        "8": {"class_type": "PreviewAny", "inputs": {"source": ["4", 3]}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}},
        "10": {"class_type": "PreviewAny", "inputs": {"source": ["6", 2]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    res = runner.run_prompt(prompt, output_dir=str(tmp_path))
    dino, clip_i, clip_t, _ = _outputs(res, "4")
    assert dino == pytest.approx(1, abs=1e-5) and clip_i == pytest.approx(1, abs=1e-5)  # same images
    assert -1 <= clip_t <= 1
    cosine, score, _ = _outputs(res, "5")
    assert cosine == pytest.approx(1, abs=1e-5) and score == pytest.approx(100, abs=1e-3)
    directional, image_sim, _, _points = _outputs(res, "6")
    assert -1 <= directional <= 1 and image_sim < 1 - 1e-4  # two different colours
    assert tuple(_outputs(res, "7")[0].shape) == (1, 150, 200, 3)


def test_subject_metrics_take_clip_i_from_a_comfyui_clip_vision_model(comfy):
    import sys
    import nodes
    import torch
    node = sys.modules[nodes.NODE_CLASS_MAPPINGS["EditLabSubjectMetrics"].__module__].SubjectMetrics

    class FakeClipVision:  # the part of comfy.clip_vision.ClipVisionModel the node uses: encode_image
        def __init__(self):
            self.calls = 0

        def encode_image(self, image):
            self.calls += 1
            return {"image_embeds": image.mean(dim=(1, 2))}  # [B,3]: the mean colour

    gen = torch.zeros(2, SIZE, SIZE, 3)
    gen[..., 0] = 1.0  # red
    ref = torch.zeros(1, SIZE, SIZE, 3)
    ref[..., 1] = 1.0  # green: orthogonal mean colours, so CLIP-I = 0 by hand
    vision = FakeClipVision()
    out = node.execute(gen, ref, "a dog", "clip-vit-large-patch14", "dino-vits16", clip_vision=vision)
    dino, clip_i, clip_t, report = out.result
    assert vision.calls == 2 and clip_i == pytest.approx(0.0, abs=1e-6)
    assert "clip_vision" in report and -1 <= clip_t <= 1 and -1 <= dino <= 1


def test_sweep_metric_and_directional_points_feed_metric_plot(comfy, tmp_path):
    """A sweep of two colours against a guide -> points -> Concatenate -> Metric Plot, on ComfyUI's executor."""
    runner, _ = comfy
    prompt = {
        "1": _image(0x204080), "2": _image(0x204080), "3": _image(0x802010),
        "4": {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["3", 0]}},
        "5": {"class_type": "EditLabSweepMetric", "inputs": {
            "images": ["4", 0], "metric": "l2", "x_values": "0.3, 0.6", "series": "L2 to guide",
            "clip_model": "clip-vit-large-patch14", "dino_model": "dino-vits16", "lpips_net": "alex",
            "reference": ["1", 0]}},
        "6": {"class_type": "EditLabDirectionalCLIP", "inputs": {
            "source": ["1", 0], "edited": ["4", 0], "clip_model": "clip-vit-large-patch14",
            "caption_before": "a blue square", "caption_after": "a red square", "series": "s_I=1.5"}},
        "7": {"class_type": "StringConcatenate", "inputs": {"string_a": ["5", 0], "string_b": ["6", 3],
                                                            "delimiter": "\n"}},
        "8": {"class_type": "EditLabMetricPlot", "inputs": {"data": ["7", 0], "x_label": "x", "y_label": "y",
                                                            "title": "", "width": 200, "height": 150}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    res = runner.run_prompt(prompt, output_dir=str(tmp_path))
    points, mean, report = _outputs(res, "5")
    lines = points.splitlines()
    assert lines[0] == "L2 to guide, 0.3, 0" and lines[1].startswith("L2 to guide, 0.6, ")
    assert float(lines[1].rsplit(",", 1)[1]) > 1  # a different colour over 32x32 px: far from the guide
    assert mean == pytest.approx(float(lines[1].rsplit(",", 1)[1]) / 2, rel=1e-4)
    directional, image_sim, _, dpoints = _outputs(res, "6")
    assert [p.split(",")[0] for p in dpoints.splitlines()] == ["s_I=1.5", "s_I=1.5"]
    assert float(dpoints.splitlines()[0].split(",")[1]) == pytest.approx(1, abs=1e-4)  # same image: similarity 1
    assert tuple(_outputs(res, "8")[0].shape) == (1, 150, 200, 3)


def test_kid_node_is_about_zero_for_a_set_with_itself_and_grows_with_a_shift(comfy, tmp_path):
    runner, root = comfy
    if not (root / "inception").exists():
        rmm.write_inception(root / "inception")

    def noisy(seed: int, shift: float) -> dict:
        return {"class_type": "ImageAddNoise", "inputs": {"image": ["base", 0], "seed": seed, "strength": 0.5 + shift}}

    prompt = {
        "base": _image(0x606060, 6),
        "a": noisy(1, 0.0), "b": noisy(2, 0.0), "c": noisy(3, 0.5),
        "same": {"class_type": "EditLabKID", "inputs": {"real": ["a", 0], "generated": ["a", 0], "subsets": 20,
                                                         "subset_size": 6, "seed": 0}},
        "alike": {"class_type": "EditLabKID", "inputs": {"real": ["a", 0], "generated": ["b", 0], "subsets": 20,
                                                          "subset_size": 6, "seed": 0}},
        "shifted": {"class_type": "EditLabKID", "inputs": {"real": ["a", 0], "generated": ["c", 0], "subsets": 20,
                                                            "subset_size": 6, "seed": 0}},
        **{f"show_{k}": {"class_type": "PreviewAny", "inputs": {"source": [k, 2]}} for k in ("same", "alike", "shifted")},
    }
    res = runner.run_prompt(prompt, output_dir=str(tmp_path))
    same, alike, shifted = (_outputs(res, k)[0] for k in ("same", "alike", "shifted"))
    assert abs(same) < 1e-6  # identical sets: every subset pair is the same set
    assert shifted > alike  # stronger noise = a different distribution of features
    assert "6 real vs 6 generated" in _outputs(res, "shifted")[2]


def test_kid_node_refuses_a_single_image_before_loading_a_model(comfy, tmp_path):
    runner, _ = comfy
    prompt = {"1": _image(0x606060, 1), "2": _image(0x606060, 3),
              "3": {"class_type": "EditLabKID", "inputs": {"real": ["1", 0], "generated": ["2", 0], "subsets": 5,
                                                           "subset_size": 5, "seed": 0}},
              "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 2]}}}
    with pytest.raises(Exception, match="at least 2 images in each set; got 1 real"):
        runner.run_prompt(prompt, output_dir=str(tmp_path))
