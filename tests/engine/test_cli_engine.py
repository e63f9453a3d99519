"""The headless CLI as a new user meets it: README's commands, run as subprocesses from the folders it names.

A ComfyUI-like base folder is set up around the engine tier's random checkpoint: ``custom_nodes/editlab``
(a link to this pack), ``models/checkpoints``, ``input``; ComfyUI's code comes from ``COMFYUI_PATH``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")  # the engine fixture skips the module when it is unset
ROOT = Path(__file__).resolve().parents[2]
README_WORKFLOW = "workflows/SDEdit - stroke painting to image.json"


@pytest.fixture(scope="module")
def base(engine, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "editlab").symlink_to(ROOT, target_is_directory=True)
    checkpoints = base / "models" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / engine.checkpoint).symlink_to(engine.root / "models" / "checkpoints" / engine.checkpoint)
    (base / "input").symlink_to(engine.root / "input", target_is_directory=True)
    return base


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COMFYUI_PATH": COMFYUI_PATH}
    env.pop("PYTHONPATH", None)  # as a user's shell: only the working directory decides what `-m editlab` finds
    return subprocess.run([sys.executable, "-m", "editlab", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    return lines[-1]


def test_readme_command_runs_from_custom_nodes(base):
    """README: `python -m editlab run "workflows/..." --comfyui PATH --set EditLabSDEPerturb.t0=0.4 --out ./out`,
    from ComfyUI/custom_nodes (the workflow path is the pack's)."""
    cwd = base / "custom_nodes"
    result = _cli(cwd, "run", README_WORKFLOW, "--comfyui", COMFYUI_PATH, "--base-directory", str(base),
                  "--set", "EditLabSDEPerturb.t0=0.4", "--out", "./out")
    assert result.returncode == 0, result.stderr[-2000:]
    images = [Path(line) for line in result.stdout.splitlines() if line.endswith(".png")]
    assert images and all(p.is_file() and p.resolve().parent == (cwd / "out").resolve() for p in images), result.stdout


def test_from_inside_the_pack_a_misspelt_input_is_an_error(base):
    """`python -m editlab` from inside the pack finds the CLI and the workflow; `--set ...t00=` is refused with
    the node's inputs (it used to be ignored, exit 0)."""
    result = _cli(base / "custom_nodes" / "editlab", "run", README_WORKFLOW, "--base-directory", str(base),
                  "--set", "SDE Perturb (SDEdit).t00=0.4")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    line = _error_line(result)
    assert "EditLabSDEPerturb ('SDE Perturb (SDEdit)') has no input 't00'" in line
    assert "its inputs: model, latent, t0, steps" in line and "Did you mean 't0'?" in line


def test_execution_errors_name_the_pack_not_its_path(base):
    """A node error is one line with the pack-relative error type (ComfyUI names the module by its path)."""
    result = _cli(base / "custom_nodes", "run", "workflows/InstructPix2Pix - edit a photo (dual CFG).json",
                  "--base-directory", str(base), "--set", "Load Checkpoint.ckpt_name=v1-5-pruned-emaonly.safetensors",
                  "--set", "BasicScheduler.steps=2")
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    line = _error_line(result)
    assert "EditLabDualCFGCombiner failed: editlab.errors.EditLabError: " in line, line
    assert str(base) not in line and str(ROOT) not in line


def test_a_kept_executor_keeps_only_the_last_runs_notifications(engine):
    executor = engine.runner.new_executor()
    prompt = engine.prompt("SDEdit - stroke painting to image", steps=2, t0=0.5)
    engine.run(prompt, executor=executor)
    first = {d.get("prompt_id") for _e, d in executor.server.messages if isinstance(d, dict)} - {None}
    engine.run(engine.prompt("SDEdit - stroke painting to image", steps=2, t0=0.6), executor=executor)
    second = {d.get("prompt_id") for _e, d in executor.server.messages if isinstance(d, dict)} - {None}
    assert len(first) == 1 and len(second) == 1 and first != second
