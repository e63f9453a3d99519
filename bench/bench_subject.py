"""BLIP-Diffusion subject benchmarks (issue: subject encoder).

1. Subject encoding cost (real-size encoder: ViT 1024 x 23 layers + Q-Former 768 x 12 layers, random weights,
   one 224 px image) vs one sampling step of the random SD1.5-architecture model (batch-2 CFG).
2. Zero-shot subject-driven generation (Subject Prompt conditioning) vs plain text-to-image (CLIP Text
   Encode) at equal steps, after encoding: the subject vectors are spliced into the one 77-token chunk,
   so the UNet work is identical and the ratio should be ~1.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_subject.py [--size 256] [--steps 10] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine, setup  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()
    env = setup(args.work, diffusers=False)
    import comfy.samplers
    import comfy_extras.nodes_custom_sampler as cs
    import nodes
    from editlab.guidance.subject import Subject, SubjectEncoder, SubjectEncoderConfig

    torch.manual_seed(0)
    encoder = SubjectEncoder(SubjectEncoderConfig()).eval()
    pixels = torch.randn(1, 3, 224, 224)
    ids = torch.tensor([[101, 3899, 102]])  # [CLS] dog [SEP]
    with torch.inference_mode():
        model, clip, _vae = nodes.CheckpointLoaderSimple().load_checkpoint(env["checkpoint"])[:3]
        embeds = encoder(pixels, ids)[0]
    subject = Subject(embeds.float().cpu(), "dog", "bench")
    prompt_node = nodes.NODE_CLASS_MAPPINGS["EditLabSubjectPrompt"]
    with torch.inference_mode():
        pos_subject, neg_subject, report = prompt_node.execute(
            clip=clip, subject=subject, prompt="swimming underwater", target_class="", prompt_strength=1.0,
            prompt_reps=20, negative_prompt="").result
        pos_text = nodes.CLIPTextEncode().encode(clip, "a dog swimming underwater")[0]
        neg_text = nodes.CLIPTextEncode().encode(clip, "")[0]
    side = args.size // 8
    latent = {"samples": torch.zeros(1, 4, side, side)}
    sigmas = cs.BasicScheduler().get_sigmas(model, "normal", args.steps, 1.0)[0]
    euler = comfy.samplers.sampler_object("euler")

    def generate(pos, neg, steps_sigmas=sigmas):
        def go():
            guider = cs.CFGGuider().get_guider(model, pos, neg, 7.5)[0]
            with torch.inference_mode():
                return cs.SamplerCustomAdvanced().sample(cs.Noise_RandomNoise(0), guider, euler, steps_sigmas, latent)
        return go

    def encode():
        with torch.inference_mode():
            return encoder(pixels, ids)

    times = interleaved_medians({
        "encode_subject": encode,
        "subject_generation": generate(pos_subject, neg_subject),
        "text_to_image": generate(pos_text, neg_text),
    }, args.repeats)
    print(json.dumps({
        "machine": machine(), "size": args.size, "steps": args.steps, "repeats": args.repeats,
        "encoder_params_M": sum(p.numel() for p in encoder.parameters()) / 1e6, "median_s": times,
        "sampling_step_s": times["text_to_image"] / args.steps,
        "ratio_encode_vs_one_step": times["encode_subject"] / (times["text_to_image"] / args.steps),
        "ratio_subject_generation_vs_t2i": times["subject_generation"] / times["text_to_image"],
        "prompt_report": report,
    }, indent=1))


if __name__ == "__main__":
    main()
