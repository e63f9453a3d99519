"""bench/gpu_tier.py: the RESULTS.md section replacement (pure logic) and a CPU smoke run of the whole script.

The smoke run needs a ComfyUI checkout (``COMFYUI_PATH``) and is skipped without one. It never writes the real
bench/RESULTS.md: it runs on a temporary copy (``--out``) and checks that the real file is unchanged.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_tier.py"
RESULTS = ROOT / "bench" / "RESULTS.md"
# A hang guard, not a speed assertion (speed is measured in bench/, never asserted in tests).
SMOKE_TIMEOUT_S = float(os.environ.get("EDITLAB_SMOKE_TIMEOUT_S", "1200"))


def _load():
    spec = importlib.util.spec_from_file_location("editlab_bench_gpu_tier", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gt = _load()


# -- section replacement ------------------------------------------------------------------------------

def test_section_is_appended_once_and_then_replaced_in_place():
    text = "# Benchmark results\n\n## SDEdit\n\nrow\n"
    first = gt.replace_section(text, "## GPU tier\n\n| a |\n")
    assert first.startswith(text.rstrip("\n"))
    assert first.count(gt.BEGIN) == 1 and first.count(gt.END) == 1
    assert "| a |" in first
    second = gt.replace_section(first + "\n## Later section\n\nkept\n", "## GPU tier\n\n| b |\n")
    assert "| a |" not in second and "| b |" in second
    assert second.count(gt.BEGIN) == 1 and second.count(gt.END) == 1
    assert second.startswith("# Benchmark results\n\n## SDEdit\n\nrow\n")
    assert second.endswith("## Later section\n\nkept\n")
    # replacing with the same body changes nothing (idempotent)
    assert gt.replace_section(second, "## GPU tier\n\n| b |\n") == second


@pytest.mark.parametrize("bad", [
    "x\n<!-- editlab:gpu-tier:begin -->\nno end\n",
    "x\n<!-- editlab:gpu-tier:end -->\nend first\n<!-- editlab:gpu-tier:begin -->\n",
    "<!-- editlab:gpu-tier:begin -->\na\n<!-- editlab:gpu-tier:end -->\n"
    "<!-- editlab:gpu-tier:begin -->\nb\n<!-- editlab:gpu-tier:end -->\n",
])
def test_malformed_markers_are_refused_not_guessed(bad):
    with pytest.raises(ValueError, match="malformed GPU-tier markers"):
        gt.replace_section(bad, "new")


def test_write_section_replaces_atomically_and_keeps_the_rest(tmp_path):
    target = tmp_path / "RESULTS.md"
    target.write_text("# Results\n\nkeep me\n", encoding="utf-8")
    gt.write_section(target, "one")
    gt.write_section(target, "two")
    text = target.read_text(encoding="utf-8")
    assert text.startswith("# Results\n\nkeep me\n")
    assert "two" in text and "one" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]  # no temp file left behind
    missing = tmp_path / "new" / "R.md"
    gt.write_section(missing, "fresh")
    assert missing.read_text(encoding="utf-8") == f"{gt.BEGIN}\nfresh\n{gt.END}\n"


def test_write_section_leaves_the_file_untouched_when_the_markers_are_malformed(tmp_path):
    target = tmp_path / "RESULTS.md"
    original = f"# R\n{gt.BEGIN}\nno end marker\n"
    target.write_text(original, encoding="utf-8")
    with pytest.raises(ValueError):
        gt.write_section(target, "new")
    assert target.read_text(encoding="utf-8") == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md"]


def test_table_has_one_row_per_result_and_marks_failures():
    rows = [gt.Row("SDEdit", "ours", "base", ours_ms=2.0, base_ms=4.0, ours_mib=10.0, base_mib=20.0),
            gt.Row("Inversion", "", "", error="RuntimeError: boom")]
    lines = gt.table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert "**0.50**" in lines[2] and "| 0.50 |" in lines[2]  # time ratio, memory ratio
    assert "failed" in lines[3] and "boom" in lines[3]


# -- the smoke run ---------------------------------------------------------------------------------------

def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_smoke_run_writes_one_row_per_benchmark(tmp_path):
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        pytest.skip("COMFYUI_PATH is not set: the GPU-tier smoke run needs a ComfyUI checkout")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    before = _sha(RESULTS)
    # Build the random weights first (a one-off cost), into the test's temporary folder.
    work = tmp_path / "work"  # tests write only under their temporary folder
    prep = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--prepare", "--work", str(work)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert prep.returncode == 0, prep.stderr[-3000:]
    out = tmp_path / "RESULTS.md"
    out.write_bytes(RESULTS.read_bytes())
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out), "--work", str(work)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=SMOKE_TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert _sha(RESULTS) == before, "the smoke run wrote the real bench/RESULTS.md"
    text = out.read_text(encoding="utf-8")
    assert text.startswith(RESULTS.read_text(encoding="utf-8").split(gt.BEGIN)[0].rstrip("\n"))
    section = text.split(gt.BEGIN, 1)[1].split(gt.END, 1)[0]
    assert "smoke" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| benchmark")]
    names = [line.split("|")[1].strip() for line in rows]
    assert names == ["SDEdit", "Prompt-to-Prompt", "Dual CFG", "Subject", "DreamBooth", "Inversion"]
    for line in rows:
        cells = [c.strip() for c in line.split("|")[1:-1]]
        assert "failed" not in cells[3], line
        assert float(cells[5].strip("*")) > 0, line  # a measured time ratio
