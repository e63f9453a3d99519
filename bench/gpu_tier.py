"""GPU tier: every benchmark's headline ratio in one run, for a session that is lent a GPU for minutes.

One row per benchmark -- ours vs the reference or plain-ComfyUI baseline that benchmark compares against --
with ms per step, the time ratio and the peak memory of each side, measured with the benchmarks' own
contenders and functions (``bench_p2p.build``, ``bench_inversion.ours``/``reference``, ``common``'s timer
and memory probe; the SDEdit, Dual CFG, subject and DreamBooth contenders are built as in their scripts):

- SDEdit: Reverse SDE Sampler (stochastic) vs ComfyUI ``euler_ancestral`` (bench_sdedit.py, sampler overhead);
- Inversion: Null-Text Optimize vs the reference null-text loop on diffusers (bench_inversion.py), the
  paper's settings (10 inner steps, lr 1e-2); the reference runs fp32 as the paper prescribes;
- Prompt-to-Prompt: Attention Controller word swap vs the same batch without it (bench_p2p.py);
- Dual CFG: Dual CFG Combiner vs ComfyUI ``DualCFGGuider`` "regular" (bench_dual_cfg.py), 8-channel UNet;
- Subject: subject-prompt generation vs plain text-to-image at equal steps (bench_subject.py);
- DreamBooth: DreamBooth Train vs ComfyUI's Train LoRA per optimizer step (bench_dreambooth.py).

bench_batch.py (the batch runner's process-level throughput) has no GPU-tier row.

Default (GPU): 512 px, random weights of full SD1.5 size (860 M-parameter UNet, CLIP-L, SD VAE), the dtypes
ComfyUI picks on the device (fp16 UNet and text encoder on CUDA), peak memory = CUDA allocation above the
resident models. None of the benchmarks has an SDXL contender, so there is no SDXL row. Planned to finish
in under 8 minutes on one H200-class GPU (weights are built on the machine first, cached under ``--work``).
The table is printed and written, after every row, into a marked section of ``--out`` (default
bench/RESULTS.md), replaced atomically.

``--smoke``: the same code on the CPU at tiny sizes (32 px, 2 steps, one run per contender, the reduced 107 M
UNet) to keep the script working on CI-class machines; ``--prepare`` builds the ``--work`` weight cache
first. Writes to bench/out/RESULTS_smoke.md unless ``--out`` is given. The rows live in gpu_tier_rows.py.

    COMFYUI_PATH=/path/to/ComfyUI python bench/gpu_tier.py [--smoke] [--out FILE] [--work DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_tier_rows import RUNNERS, TITLES, Row  # noqa: E402  (bench/ is not a package)

BEGIN = "<!-- editlab:gpu-tier:begin -->"
END = "<!-- editlab:gpu-tier:end -->"
# The longest last: a budget cut loses least.
BENCHMARKS = ("sdedit", "p2p", "dual_cfg", "subject", "dreambooth", "inversion")


# -- the RESULTS.md section (pure logic) ----------------------------------------------------------------

def replace_section(text: str, body: str) -> str:
    """``text`` with the marked GPU-tier section replaced by ``body`` (appended if there is none)."""
    block = f"{BEGIN}\n{body.strip()}\n{END}"
    nb, ne = text.count(BEGIN), text.count(END)
    if nb == 0 and ne == 0:
        return text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    start, stop = text.find(BEGIN), text.find(END)
    if nb != 1 or ne != 1 or stop < start:
        raise ValueError(f"malformed GPU-tier markers: {nb} begin / {ne} end markers, end before begin: "
                         f"{stop < start}; fix the file by hand (one {BEGIN} ... {END} pair)")
    return text[:start] + block + text[stop + len(END):]


def write_section(path: str | os.PathLike, body: str) -> None:
    """Replace the marked section of ``path`` atomically (temp file in the same folder + ``os.replace``)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    new = replace_section(old, body)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(new)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _f(x: float, fmt: str = "{:.1f}") -> str:
    return "n/a" if x != x else fmt.format(x)


def table(rows: list[Row]) -> str:
    head = ("| benchmark | ours | baseline | ms/step ours | ms/step baseline | time ratio | peak MiB ours | "
            "peak MiB baseline | memory ratio | dtype | notes |\n|" + "---|" * 11)
    lines = [head]
    for r in rows:
        if r.error:
            lines.append(f"| {r.benchmark} | {r.ours} | {r.baseline} | failed | | | | | | | {r.error} |")
            continue
        # below 1 MiB the baseline's peak is resolution noise (CPU resident-set deltas): no ratio
        mem_ratio = r.ours_mib / r.base_mib if r.base_mib >= 1.0 else float("nan")
        lines.append(f"| {r.benchmark} | {r.ours} | {r.baseline} | {_f(r.ours_ms)} | {_f(r.base_ms)} | "
                     f"**{_f(r.ours_ms / r.base_ms, '{:.2f}')}** | {_f(r.ours_mib)} | {_f(r.base_mib)} | "
                     f"{_f(mem_ratio, '{:.2f}')} | {r.dtype} | {r.note} ({r.seconds:.0f} s) |")
    return "\n".join(lines)


def section(cfg, rows: list[Row], machine: str, wall: float, done: bool) -> str:
    mode = ("smoke run: a CPU-class check of the script at tiny sizes, not GPU-tier numbers" if cfg.smoke
            else "512 px, full-size weights")
    status = "" if done else f" -- **incomplete: {len(rows)} of {len(cfg.only)} rows so far**"
    timing = ("one run per contender, time and peak from the same run" if cfg.smoke else
              f"medians of {cfg.repeats} interleaved runs after {cfg.warmup} warm-up")
    weights = "reduced random SD1.5 (107 M UNet)" if not cfg.full_size else "random full-size SD1.5 (860 M UNet)"
    return (f"## GPU tier ({mode})\n\n"
            f"`{cfg.command}` -- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {wall:.0f} s{status}\n\n"
            f"{machine}. {cfg.size} px, {weights} + CLIP-L + SD VAE, dtypes as ComfyUI picks them on this device; "
            f"{timing}; ratio = ours / baseline; peak memory = "
            "CUDA allocation above the resident models (CPU: rise of the peak resident set). No benchmark has an "
            "SDXL contender, so there is no SDXL row.\n\n" + table(rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script, not the GPU)")
    ap.add_argument("--out", help="results file whose marked section is replaced (default bench/RESULTS.md; "
                                  "--smoke: bench/out/RESULTS_smoke.md)")
    ap.add_argument("--work", default=str(HERE / "out"), help="cache folder for the random weights")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip the benchmarks not yet started once this many seconds have passed (default: 450 s "
                         "on the GPU, which with the last row leaves the 8-minute plan; none with --smoke)")
    ap.add_argument("--prepare", action="store_true", help="only build the random weights into --work, then exit")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    only = [b.strip() for b in a.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    if not os.environ.get("COMFYUI_PATH"):
        ap.error("set COMFYUI_PATH to a ComfyUI checkout (the benchmarks run ComfyUI in-process)")
    cfg = SimpleNamespace(smoke=a.smoke, only=only, work=Path(a.work).resolve(), full_size=not a.smoke,
                          size=32 if a.smoke else 512, steps=2 if a.smoke else 20, repeats=1 if a.smoke else 3,
                          warmup=0 if a.smoke else 1,
                          inv_steps=2 if a.smoke else 20, inner=1 if a.smoke else 10,
                          command="python bench/gpu_tier.py" + (" --smoke" if a.smoke else ""))
    out = Path(a.out) if a.out else (HERE / "out" / "RESULTS_smoke.md" if a.smoke else HERE / "RESULTS.md")

    import torch
    from common import free_models, machine, setup
    if not a.smoke and not torch.cuda.is_available():
        print("warning: no CUDA device; running the GPU-tier sizes on the CPU will take very long", file=sys.stderr)
    env = setup(cfg.work, full_size=cfg.full_size, diffusers=any(b in only for b in ("inversion", "p2p")))
    env8 = setup(cfg.work, in_channels=8, diffusers=False, full_size=cfg.full_size) if "dual_cfg" in only else None
    import comfy.cli_args
    # ComfyUI's CPU default is an fp16 text encoder, which CPUs run slowly: like --fp32-text-enc there (as the
    # benchmark scripts do); on CUDA ComfyUI's own default (fp16).
    comfy.cli_args.args.fp32_text_enc = not torch.cuda.is_available()
    desc = machine() + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
    print(f"weights ready after {time.perf_counter() - t_start:.0f} s", file=sys.stderr, flush=True)
    if a.prepare:
        return 0

    rows: list[Row] = []
    budget = a.budget_s if a.budget_s is not None else (None if a.smoke else 450.0)
    for name in only:
        t = time.perf_counter()
        if budget is not None and t - t_start > budget:
            rows.append(Row(TITLES[name], "", "", error=f"skipped: the {budget:.0f} s budget was spent"))
            continue
        try:
            row = RUNNERS[name](cfg, env8 if name == "dual_cfg" else env)
        except Exception as exc:  # one failed row must not lose the others on a one-shot device run
            traceback.print_exc()
            row = Row(TITLES[name], "", "", error=f"{type(exc).__name__}: {str(exc)[:200]}".replace("|", "/"))
        row.seconds = time.perf_counter() - t
        rows.append(row)
        free_models()
        print(f"{name}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
        write_section(out, section(cfg, rows, desc, time.perf_counter() - t_start, len(rows) == len(only)))
    text = section(cfg, rows, desc, time.perf_counter() - t_start, True)
    write_section(out, text)
    sys.stdout.write(text + f"\n\nwritten to {out}\n")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
