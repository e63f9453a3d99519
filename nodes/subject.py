"""BLIP-Diffusion subject nodes (docs/methods.md §7): a subject image becomes 16 embeddings spliced into a prompt.

- ``EditLabSubjectEncoderLoader``: the vision encoder + Q-Former + projection of a BLIP-Diffusion folder
  (diffusers layout) under ``models/blip_diffusion/``, registered with ComfyUI's memory management.
- ``EditLabSubjectEncode``: IMAGE + class word -> SUBJECT (a batch of images is averaged).
- ``EditLabSubjectPrompt``: CLIP + SUBJECT + prompt -> positive CONDITIONING with the subject vectors at
  position 2 of the reference prompt, and a negative without them.
- ``EditLabSubjectMix``: weighted interpolation of SUBJECTs.
- ``EditLabSubjectEditPair``: CLIP + SUBJECT + the photo's prompt -> a Prompt-to-Prompt [source, target]
  pair whose target carries the subject vectors, and its refine edit (subject-driven editing of a photo).

Everything downstream is ordinary ComfyUI: the UNet, text encoder and VAE of the release load through
ComfyUI's own loaders, and ComfyUI's output cache makes each subject encode once per unchanged input.
"""
from __future__ import annotations

import os

import torch

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..guidance.p2p import subject_edit_spec
from ..guidance.subject import (
    CLIP_MAX_LENGTH,
    Subject,
    build_prompt,
    load_subject_encoder,
    mix_subjects,
    plan_splice,
    preprocess,
)
from .clip_tokens import encode_rows, plain_prompt_tokens, word_tokenizer
from .common import CATEGORY, EditLabError, EditLabNode
from .p2p import EDIT

SUBJECT_CATEGORY = f"{CATEGORY}/Subject"
MODEL_FOLDER = "blip_diffusion"
SubjectEncoderType = io.Custom("SUBJECT_ENCODER")
SubjectType = io.Custom("SUBJECT")

# models/blip_diffusion/<release folder>/...; extra_model_paths.yaml entries for "blip_diffusion" are kept.
folder_paths.add_model_folder_path(MODEL_FOLDER, os.path.join(folder_paths.models_dir, MODEL_FOLDER))


def _registered_roots() -> list[str]:
    """The registered blip_diffusion folders that exist, resolved (symlinks followed)."""
    return [os.path.realpath(b) for b in folder_paths.get_folder_paths(MODEL_FOLDER) if os.path.isdir(b)]


def _inside(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([root, path]) == root for root in roots)


def subject_folders() -> list[str]:
    """Release folders (those with ``qformer/config.json``) directly under a registered blip_diffusion path
    that resolve inside a registered path ("." = the registered folder itself is a release)."""
    roots = _registered_roots()
    names = []
    for base in folder_paths.get_folder_paths(MODEL_FOLDER):
        if not os.path.isdir(base):
            continue
        for entry in [".", *sorted(os.listdir(base))]:
            path = os.path.realpath(os.path.join(base, entry))
            if (entry not in names and os.path.isfile(os.path.join(path, "qformer", "config.json"))
                    and _inside(path, roots)):
                names.append(entry)
    return names


def resolve_folder(name: str) -> str:
    """The release folder ``name`` under a registered blip_diffusion path, confined to those paths.

    ``name`` is a relative path without ``..`` (an absolute path or a step up is refused outright), and its
    real path (symlinks followed) must lie inside one of the registered blip_diffusion folders: a symlink
    whose target is inside a registered folder is accepted, one that leads outside is refused.
    """
    searched = folder_paths.get_folder_paths(MODEL_FOLDER)
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if not isinstance(name, str) or not name.strip() or os.path.isabs(name) or ".." in parts or "\0" in name:
        raise EditLabError(f"subject encoder folder {name!r} is not a folder name under models/blip_diffusion: "
                           f"choose one of {subject_folders()} (the folders registered for blip_diffusion are "
                           f"{searched}; add another with extra_model_paths.yaml)")
    roots = _registered_roots()
    for base in searched:
        path = os.path.realpath(os.path.join(base, name))
        if os.path.isdir(path):
            if not _inside(path, roots):
                raise EditLabError(
                    f"subject encoder folder {name!r} resolves to {path}, outside the folders registered for "
                    f"blip_diffusion ({searched}); move the release folder there (a symlink must point inside "
                    "them), or register its location under blip_diffusion in extra_model_paths.yaml")
            return path
    raise EditLabError(f"subject encoder folder {name!r} not found; searched {searched} (registered for "
                       "blip_diffusion). Put the BLIP-Diffusion release folder (with qformer/, image_processor/) "
                       "there, e.g. models/blip_diffusion/blipdiffusion")


class SubjectEncoderModel:
    """The SUBJECT_ENCODER socket: the loaded network, its ModelPatcher, tokenizer and preprocessing."""

    def __init__(self, loaded, name: str):
        self.loaded = loaded
        self.name = name
        self.load_device = comfy.model_management.text_encoder_device()
        offload = comfy.model_management.text_encoder_offload_device()
        self.dtype = (torch.float32 if self.load_device.type == "cpu"
                      else comfy.model_management.text_encoder_dtype(self.load_device))
        loaded.model.to(device=offload, dtype=self.dtype)
        self.patcher = comfy.model_patcher.ModelPatcher(loaded.model, load_device=self.load_device,
                                                        offload_device=offload)

    @property
    def width(self) -> int:
        return self.loaded.model.width

    def encode(self, image: torch.Tensor, class_word: str) -> torch.Tensor:
        """[n_query, width] float32 on the intermediate device: the mean over the image batch."""
        pixels = preprocess(image, self.loaded.preprocess)
        ids = self.loaded.class_ids(class_word)
        comfy.model_management.load_models_gpu([self.patcher])
        out = self.loaded.model(pixels.to(self.load_device, self.dtype), ids.to(self.load_device))
        return out.float().mean(dim=0).to(comfy.model_management.intermediate_device())


class SubjectEncoderLoader(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectEncoderLoader",
            display_name="Subject Encoder Loader (BLIP-Diffusion)",
            category=SUBJECT_CATEGORY,
            description="Loads the BLIP-Diffusion subject encoder (BLIP-2 vision encoder, Q-Former with its text "
                        "embeddings, projection) from a release folder in diffusers layout under "
                        "models/blip_diffusion/. Local files only, confined to the folders registered for "
                        "blip_diffusion (a symlinked folder must resolve inside one of them). Load the release's "
                        "UNet, text encoder and VAE with ComfyUI's own loaders.",
            inputs=[
                io.Combo.Input("folder", options=subject_folders(),
                               tooltip="A folder under models/blip_diffusion/ holding qformer/config.json + "
                                       "qformer/model.safetensors, image_processor/preprocessor_config.json and "
                                       "a bert-base-uncased vocab.txt (qformer/vocab.txt)."),
            ],
            outputs=[SubjectEncoderType.Output(display_name="subject_encoder",
                                               tooltip="The subject encoder, managed by ComfyUI (on the GPU only while encoding).")],
        )

    @classmethod
    def execute(cls, folder) -> io.NodeOutput:
        loaded = load_subject_encoder(resolve_folder(folder), name=folder)
        return io.NodeOutput(SubjectEncoderModel(loaded, folder))


class SubjectEncode(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectEncode",
            display_name="Subject Encode (BLIP-Diffusion)",
            category=SUBJECT_CATEGORY,
            description="Subject image + its class word -> SUBJECT (16 embeddings). The image is resized to 224 px "
                        "(bicubic, aspect not kept) and normalised as the reference; a batch is averaged into one "
                        "subject. Computed once: ComfyUI reuses the output while the inputs are unchanged.",
            inputs=[
                SubjectEncoderType.Input("subject_encoder", tooltip="From Subject Encoder Loader."),
                io.Image.Input("image", tooltip="The subject, ideally centred on a plain background. Several "
                                                "images (a batch) are averaged. Alpha is dropped; grey is made RGB."),
                io.String.Input("class_word", default="dog",
                                tooltip="The subject's category as a word ('dog', 'sneaker'): the Q-Former reads it "
                                        "with the image (the reference's source_subject_category)."),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="16 subject embeddings + the class word.")],
        )

    @classmethod
    def execute(cls, subject_encoder, image, class_word) -> io.NodeOutput:
        embeds = subject_encoder.encode(image, class_word)
        return io.NodeOutput(Subject(embeds.cpu(), class_word.strip(), subject_encoder.name))


def clip_width(clip) -> int:
    return int(clip.cond_stage_model.clip_l.transformer.get_input_embeddings().weight.shape[-1])


def subject_clip(clip, subject: Subject):
    """The CLIP-L tokenizer of an SD1.x CLIP whose token width fits the subject; clear errors otherwise."""
    tok = getattr(clip.tokenizer, "clip_l", None) if clip is not None else None
    if tok is None or set(clip.tokenize("")) != {"l"}:
        raise EditLabError("subject prompts need an SD1.x CLIP (one CLIP-L text encoder), as BLIP-Diffusion was "
                           "trained on; load the release's text encoder or an SD1.5 checkpoint")
    width = clip_width(clip)
    if width != subject.width:
        raise EditLabError(f"the SUBJECT is {subject.width} wide but this CLIP's token embeddings are {width} wide; "
                           "use the CLIP that belongs to the subject encoder (SD1.x, 768)")
    return tok


def subject_tokens(clip, subject: Subject, text: str) -> tuple[dict, str]:
    """The CLIP token dict of ``text`` with the subject spliced at position 2, and a budget report."""
    tok = subject_clip(clip, subject)
    rows = clip.tokenize(text, return_word_ids=True)["l"]
    content = [(t, w) for row in rows for (t, w, word) in row if word != 0]
    n = int(subject.embeds.shape[0])
    plan = plan_splice(content, n, (tok.start_token, 1.0), (tok.end_token, 1.0), (tok.pad_token, 1.0),
                       max_length=CLIP_MAX_LENGTH)
    embeds = subject.embeds.float()
    row = [(embeds[item[1]], 1.0) if isinstance(item, tuple) and item[0] == "subject" else item
           for item in plan.items]
    report = (f"subject: {n} vectors at position {plan.begin}; prompt: {plan.kept} of {len(content)} tokens kept "
              f"(budget {CLIP_MAX_LENGTH - n - 2}), {plan.dropped} truncated as in the reference")
    return {"l": [row]}, report


class SubjectPrompt(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectPrompt",
            display_name="Subject Prompt (BLIP-Diffusion)",
            category=SUBJECT_CATEGORY,
            description="CLIP + SUBJECT + prompt -> positive/negative CONDITIONING. The positive encodes the "
                        "reference prompt 'a {target_class} {prompt}' repeated int(strength x reps) times, cut to "
                        "77 - 16 = 61 tokens, with the 16 subject vectors after BOS and 'a' (before position "
                        "embeddings). The negative is the negative prompt without subject.",
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion release's text encoder (or an SD1.x CLIP)."),
                SubjectType.Input("subject", tooltip="From Subject Encode or Subject Mix."),
                io.String.Input("prompt", multiline=True, default="swimming underwater",
                                tooltip="What the subject does or where it is, without the class word: the "
                                        "reference prepends 'a {target_class}'."),
                io.String.Input("target_class", default="",
                                tooltip="Category to generate; empty = the subject's class word. A different "
                                        "category re-renders the subject as it (e.g. a dog as a 'cat')."),
                io.Float.Input("prompt_strength", default=1.0, min=0.0, max=10.0, step=0.05,
                               tooltip="Repetitions = int(prompt_strength x prompt_reps) (reference 1.0)."),
                io.Int.Input("prompt_reps", default=20, min=1, max=100,
                             tooltip="Reference 20: the repeated prompt fills the token budget, which balances "
                                     "text against the subject vectors."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="The unconditional branch, encoded without subject vectors."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Prompt with the subject spliced in."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative prompt, no subject."),
                io.String.Output(display_name="report", tooltip="Token budget used and how much was truncated."),
            ],
        )

    @classmethod
    def execute(cls, clip, subject, prompt, target_class, prompt_strength, prompt_reps, negative_prompt) -> io.NodeOutput:
        text = build_prompt(prompt, target_class or subject.class_word, prompt_strength, prompt_reps)
        tokens, report = subject_tokens(clip, subject, text)
        positive = clip.encode_from_tokens_scheduled(tokens)
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(negative_prompt))
        return io.NodeOutput(positive, negative, report)


class SubjectMix(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectMix",
            display_name="Subject Mix (BLIP-Diffusion)",
            category=SUBJECT_CATEGORY,
            description="Weighted average of two or three subjects' embeddings (weights normalised): subject "
                        "interpolation and style mixing.",
            inputs=[
                SubjectType.Input("subject_a", tooltip="First subject."),
                io.Float.Input("weight_a", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="Weight of subject_a."),
                SubjectType.Input("subject_b", tooltip="Second subject."),
                io.Float.Input("weight_b", default=0.5, min=0.0, max=1.0, step=0.05, tooltip="Weight of subject_b."),
                io.String.Input("class_word", default="",
                                tooltip="Class word of the mix; empty = that of the most weighted subject."),
                SubjectType.Input("subject_c", optional=True, tooltip="Optional third subject."),
                io.Float.Input("weight_c", default=0.0, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip="Weight of subject_c (ignored when it is not connected)."),
            ],
            outputs=[SubjectType.Output(display_name="subject", tooltip="The mixed subject.")],
        )

    @classmethod
    def execute(cls, subject_a, weight_a, subject_b, weight_b, class_word, subject_c=None, weight_c=0.0) -> io.NodeOutput:
        subjects, weights = [subject_a, subject_b], [weight_a, weight_b]
        if subject_c is not None:
            subjects.append(subject_c)
            weights.append(weight_c)
        return io.NodeOutput(mix_subjects(subjects, weights, class_word))


class SubjectEditPair(EditLabNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="EditLabSubjectEditPair",
            display_name="Subject Edit Pair (BLIP-Diffusion + Prompt-to-Prompt)",
            category=SUBJECT_CATEGORY,
            description="Subject-driven editing of a photo: the source row is the photo's prompt; the target row "
                        "is the same prompt with the 16 subject vectors inserted before the subject word (after "
                        "'a' for 'a dog ...', the reference position). Its refine edit keeps every source word's "
                        "attention and gives the subject vectors their own; local blend confines the change to "
                        "where the subject word attends. Wire 'edit' to the Attention Controller (refine, cross "
                        "0.8 / self 0.4) and 'conditioning' to the Inversion Guider's positive.",
            inputs=[
                io.Clip.Input("clip", tooltip="The BLIP-Diffusion release's text encoder (or an SD1.x CLIP)."),
                SubjectType.Input("subject", tooltip="From Subject Encode or Subject Mix: the new subject."),
                io.String.Input("source", multiline=True, default="a dog sitting on the grass",
                                tooltip="The photo's prompt (the one it is inverted with), naming the object to "
                                        "replace. At most 59 tokens: the target adds 16 subject vectors."),
                io.String.Input("subject_word", default="",
                                tooltip="The word (or phrase) of the source prompt the subject replaces; empty = "
                                        "the subject's class word."),
                io.String.Input("target_class", default="",
                                tooltip="Renames the subject word in the target (e.g. 'cat' for a cat subject "
                                        "replacing a dog); empty = keep it."),
                io.Boolean.Input("local_blend", default=True,
                                 tooltip="Confine the edit to where the subject word (source) and the subject "
                                         "vectors (target) attend; the rest of the photo is kept."),
                io.Float.Input("subject_weight", default=1.0, min=0.0, max=5.0, step=0.05,
                               tooltip="Scales the subject vectors' cross-attention while attention is controlled "
                                       "(Prompt-to-Prompt reweight); above 1 = more subject."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="[source, target] as one batch: the positive of the guider."),
                EDIT.Output(display_name="edit", tooltip="Refine edit for the Attention Controller."),
                io.String.Output(display_name="report", tooltip="The two rows, and where the subject sits."),
            ],
        )

    @classmethod
    def execute(cls, clip, subject, source, subject_word, target_class, local_blend, subject_weight) -> io.NodeOutput:
        if not isinstance(subject, Subject):
            raise EditLabError("'subject' must come from Subject Encode or Subject Mix")
        tok = subject_clip(clip, subject)
        source = " ".join(source.split())
        if not source:
            raise EditLabError("write the photo's prompt in 'source', naming the object to replace")
        n = int(subject.embeds.shape[0])
        spec = subject_edit_spec(source, subject_word.strip() or subject.class_word, target_class, n,
                                 word_tokenizer(tok), bos=int(tok.start_token), eos=int(tok.end_token),
                                 blend=local_blend, subject_weight=subject_weight)
        source_tokens = plain_prompt_tokens(clip, tok, source, spec.words[0])
        embeds = subject.embeds.float()
        row = [(int(tok.start_token), 1.0)]
        for word in spec.words[1]:
            row += [(embeds[-t - 1], 1.0) if t < 0 else (t, 1.0) for t in word.tokens]
        row.append((int(tok.end_token), 1.0))
        row += [(int(tok.pad_token), 1.0)] * (CLIP_MAX_LENGTH - len(row))
        begin = next(w.start for w in spec.words[1] if any(t < 0 for t in w.tokens))
        report = f"{spec.describe()}\nsubject: {n} vectors at positions {begin}-{begin + n - 1} of the target"
        return io.NodeOutput(encode_rows(clip, [source_tokens, {"l": [row]}]), spec, report)


NODES = [SubjectEncoderLoader, SubjectEncode, SubjectPrompt, SubjectMix, SubjectEditPair]
