"""BLIP-Diffusion subject encoder and subject-prompt splicing (Li et al., NeurIPS 2023; docs/methods.md §7).

Pure torch (``transformers`` only lazily, for the BERT tokenizer and the BLIP-2 config defaults); no ComfyUI.

- :class:`SubjectEncoder`: vision encoder (ViT, ``visual_encoder.*``) -> Q-Former with learned queries that
  also attends to the class word (``embeddings.*``, ``encoder.layer.*``, ``query_tokens``) -> projection
  (``proj_layer.*``). Parameter names are those of the diffusers ``qformer/`` folder of the published
  weights, so its state dict loads as is.
- :func:`find_subject_files` / :func:`load_subject_encoder`: the on-disk layout (``qformer/config.json`` +
  weights, ``image_processor/preprocessor_config.json``, a BERT-uncased ``vocab.txt``) with errors that list
  the folder searched and the files expected.
- :func:`preprocess`: 224 px bicubic resize + the normalisation of the preprocessor config (CLIP's).
- :func:`build_prompt` / :func:`plan_splice`: the reference prompt ``"a {class} {prompt}"`` x reps and the
  token row with the 16 subject vectors at position 2, 77 long.
"""
from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import EditLabError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CTX_BEGIN_POS = 2  # diffusers' BlipDiffusionPipeline ctx_begin_pos: after BOS and "a"
CLIP_MAX_LENGTH = 77
MIN_IMAGE_SIDE = 16

WEIGHT_FILES = ("model.safetensors", "diffusion_pytorch_model.safetensors", "model.fp16.safetensors",
                "pytorch_model.bin")
VOCAB_PLACES = ("qformer/vocab.txt", "qformer_tokenizer/vocab.txt", "bert-base-uncased/vocab.txt")
# Buffers that transformers saves with the weights but that are recomputed here.
IGNORED_KEYS = ("embeddings.position_ids",)


# ---------------------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 23
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True


@dataclass(frozen=True)
class QFormerConfig:
    vocab_size: int = 30523
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cross_attention_frequency: int = 1
    encoder_hidden_size: int = 1024


@dataclass(frozen=True)
class SubjectEncoderConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    num_query_tokens: int = 16


def config_from_blip2_json(data: dict) -> SubjectEncoderConfig:
    """Our config from a BLIP-2 ``config.json`` (``vision_config`` / ``qformer_config`` / ``num_query_tokens``).

    transformers saves only the values that differ from its defaults, so the file is read through
    ``transformers.Blip2Config``, which fills the rest exactly as the reference did.
    """
    from transformers import Blip2Config

    known = {k: data[k] for k in ("vision_config", "qformer_config", "num_query_tokens") if k in data}
    cfg = Blip2Config(**known)
    v, q = cfg.vision_config, cfg.qformer_config
    return SubjectEncoderConfig(
        vision=VisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                            num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
                            image_size=v.image_size, patch_size=v.patch_size, hidden_act=v.hidden_act,
                            layer_norm_eps=v.layer_norm_eps, qkv_bias=bool(getattr(v, "qkv_bias", True))),
        qformer=QFormerConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size,
                              num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
                              intermediate_size=q.intermediate_size, hidden_act=q.hidden_act,
                              max_position_embeddings=q.max_position_embeddings, layer_norm_eps=q.layer_norm_eps,
                              pad_token_id=q.pad_token_id, cross_attention_frequency=q.cross_attention_frequency,
                              encoder_hidden_size=q.encoder_hidden_size),
        num_query_tokens=int(cfg.num_query_tokens),
    )


def _activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name in ("gelu", "gelu_python"):
        return nn.GELU()
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    raise EditLabError(f"unsupported activation {name!r} in the subject encoder config")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# ------------------------------------------------------------------------------------------- vision ViT

class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = nn.Parameter(torch.zeros(1, n + 1, cfg.hidden_size))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1)
        return x + self.position_embedding[:, : x.shape[1]]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        self.projection = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.projection(out.transpose(1, 2).reshape(b, t, c))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoderLayers(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))


class VisionEncoder(nn.Module):
    """CLIP-style ViT: embeddings -> pre-LN -> layers -> post-LN (all tokens, as the Q-Former reads them)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoderLayers(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.pre_layernorm(self.embeddings(pixels))
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


# -------------------------------------------------------------------------------------------- Q-Former

class TextEmbeddings(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        # word + absolute position embeddings of the text, queries prepended (no positions), then LayerNorm.
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        text = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]
        x = torch.cat([queries.expand(input_ids.shape[0], -1, -1), text.to(queries.dtype)], dim=1)
        return self.LayerNorm(x)


class BertAttentionHeads(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(kv_size, cfg.hidden_size)
        self.value = nn.Linear(kv_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        split = lambda y: y.reshape(b, y.shape[1], self.heads, c // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(context)), split(self.value(context)))
        return out.transpose(1, 2).reshape(b, t, c)


class BertResidualOutput(nn.Module):
    def __init__(self, in_size: int, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: QFormerConfig, kv_size: Optional[int] = None):
        super().__init__()
        self.attention = BertAttentionHeads(cfg, kv_size or cfg.hidden_size)
        self.output = BertResidualOutput(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.output(self.attention(x, x if context is None else context), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = _activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    """Self-attention over [queries, text]; queries also cross-attend to the image; separate FFNs."""

    def __init__(self, cfg: QFormerConfig, index: int):
        super().__init__()
        self.attention = BertAttention(cfg)
        if index % cfg.cross_attention_frequency == 0:
            self.crossattention = BertAttention(cfg, kv_size=cfg.encoder_hidden_size)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg.intermediate_size, cfg)
        self.intermediate_query = BertIntermediate(cfg)
        self.output_query = BertResidualOutput(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor, image: torch.Tensor, n_query: int) -> torch.Tensor:
        h = self.attention(x)
        q, t = h[:, :n_query], h[:, n_query:]
        if hasattr(self, "crossattention"):
            q = self.crossattention(q, image)
        q = self.output_query(self.intermediate_query(q), q)
        if t.shape[1] == 0:
            return q
        return torch.cat([q, self.output(self.intermediate(t), t)], dim=1)


class QFormerLayers(nn.Module):
    def __init__(self, cfg: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(cfg, i) for i in range(cfg.num_hidden_layers))


class Projection(nn.Module):
    """LayerNorm -> dense1 (H -> 4H) -> QuickGELU -> dense2 (4H -> H) + the pre-norm input."""

    def __init__(self, size: int, eps: float = 1e-12):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(size, eps=eps)
        self.dense1 = nn.Linear(size, 4 * size)
        self.act = QuickGELU()
        self.dense2 = nn.Linear(4 * size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.dense1(self.LayerNorm(x)))) + x


class SubjectEncoder(nn.Module):
    """Image + class-word tokens -> ``num_query_tokens`` subject embeddings of width ``qformer.hidden_size``."""

    def __init__(self, cfg: SubjectEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg.qformer)
        self.visual_encoder = VisionEncoder(cfg.vision)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer.hidden_size))
        self.proj_layer = Projection(cfg.qformer.hidden_size)
        self.encoder = QFormerLayers(cfg.qformer)

    @property
    def width(self) -> int:
        return self.config.qformer.hidden_size

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """``pixels`` [B, 3, S, S] normalised; ``input_ids`` [1 or B, L] BERT ids of "[CLS] class [SEP]"."""
        image = self.visual_encoder(pixels)
        if input_ids.shape[0] == 1 and pixels.shape[0] > 1:
            input_ids = input_ids.expand(pixels.shape[0], -1)
        x = self.embeddings(input_ids, self.query_tokens)
        n = self.config.num_query_tokens
        for layer in self.encoder.layer:
            x = layer(x, image.to(x.dtype), n)
        return self.proj_layer(x[:, :n])


# ----------------------------------------------------------------------------------- files and loading

@dataclass(frozen=True)
class SubjectFiles:
    folder: str
    config: str
    weights: tuple[str, ...]
    vocab: str
    preprocessor: Optional[str]


def _expected_listing(folder: str) -> str:
    return (f"expected in {folder}: qformer/config.json; qformer/ weights ({' or '.join(WEIGHT_FILES)}, or a "
            "sharded model.safetensors.index.json); a BERT-uncased vocab.txt in one of "
            f"{', '.join(VOCAB_PLACES)} (the Q-Former's class-word tokenizer: copy vocab.txt of "
            "bert-base-uncased there); optional image_processor/preprocessor_config.json")


def _hf_cache_vocab() -> Optional[str]:
    home = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    snaps = os.path.join(home, "models--bert-base-uncased", "snapshots")
    if os.path.isdir(snaps):
        for snap in sorted(os.listdir(snaps)):
            path = os.path.join(snaps, snap, "vocab.txt")
            if os.path.isfile(path):
                return path
    return None


def find_subject_files(folder: str) -> SubjectFiles:
    """The files of a BLIP-Diffusion folder (diffusers layout), or an error naming what is missing."""
    if not os.path.isdir(folder):
        raise EditLabError(f"subject encoder folder not found: {folder}. {_expected_listing(folder)}")
    qdir = os.path.join(folder, "qformer")
    config = os.path.join(qdir, "config.json")
    missing = []
    if not os.path.isfile(config):
        missing.append("qformer/config.json")
    weights: tuple[str, ...] = ()
    index = os.path.join(qdir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            shards = sorted(set(json.load(fh)["weight_map"].values()))
        weights = tuple(os.path.join(qdir, s) for s in shards)
        missing += [f"qformer/{s}" for s, p in zip(shards, weights) if not os.path.isfile(p)]
    else:
        for name in WEIGHT_FILES:
            if os.path.isfile(os.path.join(qdir, name)):
                weights = (os.path.join(qdir, name),)
                break
        else:
            missing.append(f"qformer/{' | '.join(WEIGHT_FILES)}")
    vocab = next((os.path.join(folder, p) for p in VOCAB_PLACES if os.path.isfile(os.path.join(folder, p))), None)
    vocab = vocab or _hf_cache_vocab()
    if vocab is None:
        missing.append(f"vocab.txt ({' | '.join(VOCAB_PLACES)})")
    if missing:
        raise EditLabError(f"subject encoder folder {folder} is missing {', '.join(missing)}. "
                                f"{_expected_listing(folder)}")
    pre = os.path.join(folder, "image_processor", "preprocessor_config.json")
    return SubjectFiles(folder, config, weights, vocab, pre if os.path.isfile(pre) else None)


def read_state_dict(paths: Sequence[str]) -> dict[str, torch.Tensor]:
    """The tensors of every weights file (safetensors, or a torch pickle with ``weights_only``); a file that
    cannot be read (truncated by an interrupted download, or not a weights file) is named in the error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for path in paths:
        try:
            sd.update(load_file(path) if path.endswith(".safetensors")
                      else torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
            size = os.path.getsize(path) if os.path.isfile(path) else 0
            raise EditLabError(
                f"cannot read the subject encoder weights {path} ({size} bytes): {exc}. The file is damaged or "
                "incomplete (an interrupted download?): download it again from the BLIP-Diffusion release "
                "(diffusers layout, qformer/ folder) and replace it"
            ) from exc
    return sd


def convert_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the older transformers naming of the ViT qkv bias (``q_bias`` / ``v_bias``; k has none)."""
    out = {k: v for k, v in sd.items() if k not in IGNORED_KEYS}
    for key in [k for k in out if k.endswith("self_attn.q_bias")]:
        stem = key[: -len("q_bias")]
        q, v = out.pop(key), out.pop(stem + "v_bias")
        out[stem + "qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])
    return out


def load_weights(model: SubjectEncoder, sd: dict[str, torch.Tensor], source: str) -> None:
    sd = convert_state_dict(sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        show = lambda ks: ", ".join(ks[:6]) + (f" ... ({len(ks)} in all)" if len(ks) > 6 else "")  # noqa: E731
        parts = [f"missing keys: {show(missing)}" if missing else "",
                 f"unexpected keys: {show(unexpected)}" if unexpected else "",
                 ("shape mismatches: " + show([f"{k} {tuple(sd[k].shape)} vs {tuple(expected[k].shape)}"
                                                for k in wrong])) if wrong else ""]
        raise EditLabError(f"the weights in {source} do not match qformer/config.json ("
                                + "; ".join(p for p in parts if p) + "). Use the qformer/ folder of the "
                                "BLIP-Diffusion release (diffusers layout) with its own config.json.")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in sd.items()}, strict=True)


@dataclass(frozen=True)
class Preprocess:
    size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD


def read_preprocess(path: Optional[str]) -> Preprocess:
    if path is None:
        return Preprocess()
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    size = data.get("size", 224)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", 224))
    return Preprocess(int(size), tuple(data.get("image_mean", OPENAI_CLIP_MEAN)),
                      tuple(data.get("image_std", OPENAI_CLIP_STD)))


@dataclass
class LoadedSubjectEncoder:
    model: SubjectEncoder
    tokenizer: Any  # transformers.BertTokenizer
    preprocess: Preprocess
    name: str

    def class_ids(self, word: str) -> torch.Tensor:
        word = word.strip()
        if not word:
            raise EditLabError("the subject class word is empty; give the subject's category, e.g. 'dog'")
        return torch.tensor([self.tokenizer(word)["input_ids"]], dtype=torch.long)


def load_subject_encoder(folder: str, name: Optional[str] = None) -> LoadedSubjectEncoder:
    """Build the encoder from ``qformer/config.json`` and load its weights, strictly (local files only)."""
    files = find_subject_files(folder)
    with open(files.config, encoding="utf-8") as fh:
        cfg = config_from_blip2_json(json.load(fh))
    model = SubjectEncoder(cfg)
    load_weights(model, read_state_dict(files.weights), os.path.dirname(files.weights[0]))
    model.eval().requires_grad_(False)
    from transformers import BertTokenizer
    tokenizer = BertTokenizer(files.vocab, do_lower_case=True)
    return LoadedSubjectEncoder(model, tokenizer, read_preprocess(files.preprocessor), name or os.path.basename(folder))


# ------------------------------------------------------------------------------------ preprocessing

def preprocess(images: torch.Tensor, spec: Preprocess) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] in 0..1 -> normalised pixels [B, 3, S, S] (bicubic, aspect not kept)."""
    if images.ndim != 4:
        raise EditLabError(f"expected an IMAGE [batch, height, width, channels], got shape {tuple(images.shape)}")
    c = images.shape[-1]
    if c == 1:
        images = images.expand(-1, -1, -1, 3)  # grey -> RGB, as PIL's convert("RGB")
    elif c == 4:
        images = images[..., :3]  # alpha dropped, as PIL's convert("RGB")
    elif c != 3:
        raise EditLabError(f"the subject image has {c} channels; give an RGB image (3 channels)")
    h, w = images.shape[1:3]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise EditLabError(f"the subject image is {w}x{h} px, too small to show a subject; give at least "
                                f"{MIN_IMAGE_SIDE} px a side (the encoder sees {spec.size}x{spec.size})")
    x = images.movedim(-1, 1).float()
    x = F.interpolate(x, size=(spec.size, spec.size), mode="bicubic", align_corners=False, antialias=True)
    x = x.clamp(0.0, 1.0)
    mean = torch.tensor(spec.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


# --------------------------------------------------------------------------------- subjects and prompts

@dataclass(frozen=True)
class Subject:
    """The SUBJECT socket: ``embeds`` [n_query, width] (CPU, float32) and the subject's class word."""

    embeds: torch.Tensor
    class_word: str
    source: str = ""

    @property
    def width(self) -> int:
        return int(self.embeds.shape[-1])


def mix_subjects(subjects: Sequence[Subject], weights: Sequence[float], class_word: str = "") -> Subject:
    """Weighted average of subject embeddings (normalised weights): subject interpolation / style mixing."""
    if len(subjects) == 0:
        raise EditLabError("Subject Mix needs at least one SUBJECT")
    shapes = {tuple(s.embeds.shape) for s in subjects}
    if len(shapes) != 1:
        raise EditLabError(f"subjects of different shapes cannot be mixed: {sorted(shapes)}; "
                                "encode them with the same subject encoder")
    total = float(sum(weights))
    if any(w < 0 for w in weights) or total <= 0:
        raise EditLabError(f"mix weights must be >= 0 with a positive sum, got {list(weights)}")
    embeds = sum(float(w) / total * s.embeds for s, w in zip(subjects, weights))
    if not class_word.strip():
        class_word = max(zip(weights, range(len(subjects))))[1]
        class_word = subjects[class_word].class_word
    return Subject(embeds, class_word.strip(), "mix(" + ", ".join(s.source for s in subjects) + ")")


def build_prompt(prompt: str, target_class: str, prompt_strength: float = 1.0, prompt_reps: int = 20) -> str:
    """The reference prompt: ``"a {target_class} {prompt}"`` repeated ``int(strength * reps)`` times, ", "-joined."""
    target_class = target_class.strip()
    if not target_class:
        raise EditLabError("the target class word is empty; give the category to generate, e.g. 'dog'")
    reps = int(prompt_strength * prompt_reps)
    if reps < 1:
        raise EditLabError(f"prompt_strength x prompt_reps = {prompt_strength} x {prompt_reps} gives "
                                f"{reps} repetitions; it must be at least 1")
    return ", ".join([f"a {target_class} {prompt.strip()}".strip()] * reps)


@dataclass(frozen=True)
class SplicePlan:
    """One CLIP row: ``items`` is 77 long, each a token id (int) or an int index into the subject vectors
    wrapped as ``("subject", i)``; ``kept`` / ``dropped`` count content tokens."""

    items: tuple
    kept: int
    dropped: int
    begin: int = CTX_BEGIN_POS


def plan_splice(content: Sequence[Any], n_subject: int, start: int, end: int, pad: int,
                max_length: int = CLIP_MAX_LENGTH, begin: int = CTX_BEGIN_POS) -> SplicePlan:
    """Row = [BOS, content[:begin-1], subject x n, content[begin-1:budget], EOS, pad...], ``max_length`` long.

    As the reference: the text is tokenised to ``max_length - n_subject`` tokens (BOS + content + EOS,
    truncated), then the subject vectors are inserted at ``begin`` before position embeddings are added.
    """
    budget = max_length - n_subject - 2
    if budget < begin - 1:
        raise EditLabError(f"{n_subject} subject vectors leave no room in a {max_length}-token prompt")
    kept = list(content[:budget])
    row = [start, *kept[: begin - 1], *[("subject", i) for i in range(n_subject)], *kept[begin - 1:], end]
    row += [pad] * (max_length - len(row))
    return SplicePlan(tuple(row), len(kept), max(0, len(content) - budget), begin)

