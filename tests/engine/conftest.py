"""Engine-tier fixtures: the real ComfyUI (``COMFYUI_PATH``) with a random SD1.5-architecture checkpoint.

Everything is written under pytest's temporary directory: models, inputs, outputs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
SKIP_REASON = ("engine tier skipped: COMFYUI_PATH is not set (point it at a ComfyUI checkout, v0.3.64 or newer, "
               "with its requirements installed, to run the real-engine tests)")
ROOT = Path(__file__).resolve().parents[2]
SIZE = 64  # px: an 8x8 latent keeps every workflow to seconds on two CPU cores


@dataclass
class Engine:
    root: Path
    runner: object
    checkpoint: str

    def workflow(self, name: str) -> dict:
        import json
        with open(ROOT / "workflows" / f"{name}.json", encoding="utf-8") as fh:
            return json.load(fh)

    def prompt(self, name: str, **per_input) -> dict:
        """The API prompt of a shipped workflow, with every input named in ``per_input`` overridden."""
        from editlab.headless.convert import convert
        prompt = convert(self.workflow(name), self.runner.definitions())
        for node in prompt.values():
            for key, value in per_input.items():
                if key in node["inputs"] and not isinstance(node["inputs"][key], list):
                    node["inputs"][key] = value
        return prompt

    def run(self, prompt: dict, executor=None):
        return self.runner.run_prompt(prompt, output_dir=str(self.root / "output"), executor=executor)


def _write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    # A "stroke painting": flat colour blocks.
    stroke = np.zeros((SIZE, SIZE, 3), np.uint8)
    stroke[: SIZE // 2] = (90, 140, 220)
    stroke[SIZE // 2:] = (40, 120, 60)
    stroke[SIZE // 3: SIZE // 2, SIZE // 4: SIZE // 2] = (200, 200, 210)
    Image.fromarray(stroke).save(folder / "editlab_stroke.png")
    # A "photo" with a transparent square: LoadImage's MASK is 1 there (= regenerate).
    photo = (rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    alpha = np.full((SIZE, SIZE, 1), 255, np.uint8)
    alpha[16:48, 16:48] = 0
    Image.fromarray(np.concatenate([photo, alpha], axis=2), "RGBA").save(folder / "editlab_photo.png")
    # A "subject" photo (its own picture, for the subject encoder).
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(folder / "editlab_subject.png")
    # A subject set for DreamBooth: a subfolder of three photos (Load Image Dataset from Folder).
    subject_set = folder / "editlab_subject"
    subject_set.mkdir(exist_ok=True)
    for i in range(3):
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(subject_set / f"subject_{i}.png")


@pytest.fixture(scope="session")
def engine(tmp_path_factory) -> Engine:
    if not COMFYUI_PATH:
        pytest.skip(SKIP_REASON)
    from editlab.headless import runner
    import random_models

    runner.boot(COMFYUI_PATH)
    import folder_paths

    root = tmp_path_factory.mktemp("comfyui")
    ckpt_dir = root / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    name = "v1-5-pruned-emaonly.safetensors"
    # $EDITLAB_WEIGHT_SEED (default 0): run the tier on other random weights to catch tests tuned to one draw.
    random_models.build_sd15_checkpoint(ckpt_dir / name, seed=random_models.weight_seed(), dtype=torch.float32)
    folder_paths.add_model_folder_path("checkpoints", str(ckpt_dir), is_default=True)
    _write_inputs(root / "input")
    folder_paths.set_input_directory(str(root / "input"))
    folder_paths.set_output_directory(str(root / "output"))
    folder_paths.set_temp_directory(str(root / "temp"))
    return Engine(root=root, runner=runner, checkpoint=name)


@pytest.fixture(scope="session")
def sd15(engine):
    """(model, clip, vae) of the random checkpoint, loaded by ComfyUI's stock loader."""
    import nodes
    with torch.inference_mode():
        return nodes.CheckpointLoaderSimple().load_checkpoint(engine.checkpoint)[:3]
