"""Every example workflow in workflows/ loads, converts, validates and runs on the real engine."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted(p.stem for p in (ROOT / "workflows").glob("*.json"))
# Small everywhere: 3 steps, 2 null-text iterations, 3 t0-search runs, 64 px, 2 class-prior images.
# LPIPS on the small SqueezeNet backbone (the random stand-in written below) instead of the examples' AlexNet.
FAST = {"steps": 3, "max_runs": 3, "inner_steps": 2, "width": 64, "height": 64, "count": 2, "lpips_net": "squeeze"}
IP2P_CHECKPOINT = "instruct-pix2pix-00-22000.safetensors"


def _ensure_checkpoints(engine, workflow: dict) -> None:
    import folder_paths
    import random_models
    names = {w for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple" for w in n["widgets_values"][:1]}
    if IP2P_CHECKPOINT in names:
        path = engine.root / "models" / "checkpoints" / IP2P_CHECKPOINT
        if not path.exists():
            random_models.build_sd15_checkpoint(path, seed=random_models.weight_seed(1), in_channels=8, dtype=torch.float32)
            folder_paths.filename_list_cache.clear()
    for n in workflow["nodes"]:
        if n["type"] == "ControlNetLoader":
            path = engine.root / "models" / "controlnet" / n["widgets_values"][0]
            if not path.exists():
                import nodes
                with torch.inference_mode():
                    base = nodes.CheckpointLoaderSimple().load_checkpoint(engine.checkpoint)[0]
                random_models.build_sd15_controlnet(path, base.model.model_config.unet_config)
            folder_paths.add_model_folder_path("controlnet", str(path.parent), is_default=True)
            folder_paths.filename_list_cache.clear()
    _ensure_loras_and_metric_models(engine, workflow)
    if any(n["type"] == "EditLabSubjectEncoderLoader" for n in workflow["nodes"]):
        from random_subject_encoder import write_subject_encoder_folder
        base = engine.root / "models" / "blip_diffusion"
        if not (base / "blipdiffusion").exists():
            write_subject_encoder_folder(base / "blipdiffusion", seed=0, width=768)
        folder_paths.add_model_folder_path("blip_diffusion", str(base), is_default=True)
        folder_paths.filename_list_cache.clear()


def _ensure_loras_and_metric_models(engine, workflow: dict) -> None:
    """Random stand-ins for the LoRA files (a DreamBooth subject) and the metric models the workflows name."""
    import folder_paths
    import random_metric_models as rmm
    import random_models
    loras = {n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "LoraLoaderModelOnly"}
    folder = engine.root / "models" / "loras"
    for name in loras - {p.name for p in folder.glob("*.safetensors")}:
        import nodes
        with torch.inference_mode():
            base = nodes.CheckpointLoaderSimple().load_checkpoint(engine.checkpoint)[0]
        random_models.write_random_lora(base, folder / name, seed=3)
    if loras:
        folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
        folder_paths.filename_list_cache.clear()
    metric_nodes = {"EditLabEditMetrics", "EditLabSubjectMetrics", "EditLabSweepMetric", "EditLabDirectionalCLIP",
                    "EditLabCLIPScore", "EditLabCLIPGuidanceLoss"}
    if any(n["type"] in metric_nodes for n in workflow["nodes"]):
        root = engine.root / "models" / "editlab_metrics"
        if not (root / "clip-vit-large-patch14").exists():
            rmm.write_default_set(root)
        folder_paths.add_model_folder_path("editlab_metrics", str(root), is_default=True)


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_end_to_end(engine, name):
    workflow = engine.workflow(name)
    assert any(n["type"] in ("MarkdownNote", "Note") for n in workflow["nodes"]), "every example explains itself"
    _ensure_checkpoints(engine, workflow)
    if any(n["type"] == "EditLabLoadInversion" for n in workflow["nodes"]):
        engine.run(engine.prompt("Inversion - invert once and save", **FAST))  # makes the file it loads
    import flow_workflow_stubs  # flow loaders and T5 -> tiny stand-ins, in this process only (see its docstring)
    prompt = flow_workflow_stubs.substitute(engine.prompt(name, **FAST))
    result = engine.run(prompt)
    from PIL import Image
    saves = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    if saves:
        assert result.images, "the workflow saved no image"
    plots = ("_curve", "_tradeoff", "_loss")  # Metric Plot / Plot Loss Graph images have the plot's own size
    for path in result.images:
        if any(p in Path(path).name for p in plots):
            continue
        with Image.open(path) as im:
            assert im.size[0] == im.size[1] == 64 or im.size[0] % 64 == 0  # grids are multiples
    for nid, node in prompt.items():
        if node["class_type"] in ("SamplerCustomAdvanced", "EditLabSDEditT0Search"):
            latent = result.node_output(nid)[0][0]["samples"]
            assert torch.isfinite(latent).all(), f"{node['class_type']} #{nid} produced non-finite values"


def test_shipped_workflows_match_their_specs(engine, tmp_path):
    """workflows/*.json are generated from headless/examples*.py with the loaded node definitions."""
    written = engine.runner.build_workflows(str(tmp_path))
    assert sorted(Path(p).stem for p in written) == WORKFLOWS
    for path in written:
        shipped = ROOT / "workflows" / Path(path).name
        assert json.loads(Path(path).read_text()) == json.loads(shipped.read_text()), shipped.name
