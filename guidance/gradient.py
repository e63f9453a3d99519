"""Gradient guidance: classifier guidance and GLIDE-style CLIP guidance (docs/methods.md §10).

Pure torch. A guidance *loss* is a small object (the ``GuidanceLoss`` protocol, the LOSS socket):

- ``__call__(inputs, sigma) -> loss`` of shape ``[B]`` (one value per batch row, lower = better);
- ``space``: ``"latent"`` (inputs are model-space latents ``[B, C, h, w]``, what the sampler sees, i.e. after
  ``process_latent_in``) or ``"pixel"`` (inputs are decoded images ``[B, 3, H, W]`` in [0, 1], channels first);
- ``sees``: ``"denoised"`` (inputs are the x0 prediction ``D(x, sigma)``) or ``"noisy"`` (inputs are the noisy
  sample ``x`` itself, as a noise-aware classifier of Dhariwal & Nichol expects; latent space only);
- ``needs_sigma``: whether the value depends on ``sigma`` (``[B]`` tensor, k-space sigma).

With ``log p = -loss`` the guided prediction is, in ComfyUI's k-space parametrisation ``x = x0 + sigma * eps``,
``D_hat = D + s * sigma^2 * grad_x log p`` (classifier guidance, Dhariwal & Nichol; equivalently
``eps_hat = eps - s * sigma * grad_x log p``; flow models: the same in their k-space counterpart, see
``guided_prediction``). The gradient is taken either through the model
(``through="model"``: ``x -> D(x) [-> decode] -> loss``, the exact gradient of the approximation) or only through
the decoder and the loss (``through="x0"``: ``D -> [decode] -> loss``, treating ``dD/dx`` as the identity).
CLIP guidance here scores the decoded x0 prediction with an ordinary CLIP: an approximation of GLIDE's
noise-aware CLIP guidance (GLIDE §2.3), not a reproduction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F

from ..errors import EditLabError

SPACES = ("latent", "pixel")
SEES = ("denoised", "noisy")
THROUGH = ("model", "x0")


class GuidanceLoss(Protocol):
    """The LOSS socket's shape (see the module docstring)."""

    space: str
    sees: str
    needs_sigma: bool

    def __call__(self, inputs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


def check_loss(loss: object) -> None:
    """Refuse an object that does not have the LOSS shape, with what is missing."""
    space, sees = getattr(loss, "space", None), getattr(loss, "sees", "denoised")
    if not callable(loss) or space not in SPACES or sees not in SEES:
        raise EditLabError(f"loss: expected a LOSS object (callable, space in {SPACES}, sees in {SEES}); got "
                           f"{type(loss).__name__} with space={space!r}, sees={sees!r}")
    if sees == "noisy" and space != "latent":
        raise EditLabError("loss: a loss that sees the noisy sample must work in latent space (decoding a noisy "
                           "latent gives no image); make it see the denoised prediction instead")


def guided_denoised(denoised: torch.Tensor, grad_log_p: torch.Tensor, sigma: torch.Tensor | float,
                    scale: float) -> torch.Tensor:
    """``D_hat = D + s * sigma^2 * grad_x log p`` (docs/methods.md §10, classifier guidance in k-space)."""
    sigma = torch.as_tensor(sigma, dtype=denoised.dtype, device=denoised.device)
    sigma = sigma.reshape(-1, *([1] * (denoised.ndim - 1))) if sigma.ndim else sigma
    return denoised + scale * sigma ** 2 * grad_log_p.to(denoised)


# -- when to guide -----------------------------------------------------------------------------------------

def step_index(sigma: float, sample_sigmas: Optional[Sequence[float] | torch.Tensor]) -> tuple[int, int]:
    """``(i, n)``: the step of an ``n``-step run whose interval ``[sample_sigmas[i+1], sample_sigmas[i]]`` holds
    ``sigma`` (a sampler that evaluates between schedule points belongs to the step it is inside)."""
    if sample_sigmas is None:
        return 0, 1
    s = [float(v) for v in (sample_sigmas.flatten().tolist() if isinstance(sample_sigmas, torch.Tensor)
                            else sample_sigmas)]
    n = max(len(s) - 1, 1)
    tol = 1e-6 * abs(float(sigma)) + 1e-12
    # the latest step whose starting sigma is at or above this sigma (schedules decrease)
    i = max([k for k in range(n) if s[k] >= float(sigma) - tol], default=0)
    return i, n


@dataclass(frozen=True)
class GuidanceWindow:
    """Guide on the steps whose fraction ``i / (n - 1)`` lies in ``[start, end]``, every ``every_k``-th of them.

    Fractions count steps of the run: 0 = the first (noisiest) step, 1 = the last. The first guided step is the
    first one inside the window; then every ``every_k``-th step.
    """

    start: float = 0.0
    end: float = 1.0
    every_k: int = 1

    def __post_init__(self) -> None:
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0):
            raise EditLabError(f"sigma_start / sigma_end are fractions of the run in [0, 1]; got {self.start}, {self.end}")
        if self.start > self.end:
            raise EditLabError(f"sigma_start ({self.start}) is after sigma_end ({self.end}): the window would be "
                               "empty; start is the earlier (noisier) end, e.g. start 0.0, end 0.8")
        if self.every_k < 1:
            raise EditLabError(f"every_k must be at least 1, got {self.every_k}")

    def active(self, i: int, n: int) -> bool:
        last = max(n - 1, 1)
        first = math.ceil(self.start * last - 1e-9)
        frac = i / last if n > 1 else 0.0
        return self.start - 1e-9 <= frac <= self.end + 1e-9 and (i - first) % self.every_k == 0


# -- the guided prediction ---------------------------------------------------------------------------------

def row_mask(batch: int, rows: Optional[Sequence[int]], like: torch.Tensor) -> torch.Tensor:
    """``[B, 1, ..]`` 1 on the guided rows (all rows when ``rows`` is None)."""
    mask = torch.ones(batch, dtype=like.dtype, device=like.device)
    if rows is not None:
        bad = [r for r in rows if not -batch <= r < batch]
        if bad:
            raise EditLabError(f"rows {bad} are outside the batch of {batch} rows (rows count from 0)")
        mask.zero_()
        mask[list(rows)] = 1.0
    return mask.reshape(batch, *([1] * (like.ndim - 1)))


def guided_prediction(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                      loss: GuidanceLoss, scale: float, through: str = "x0",
                      decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      rows: Optional[Sequence[int]] = None, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided step: ``(D_hat, grad log p)`` for the noisy sample ``x`` at ``sigma`` (``[B]``).

    1. predict ``D = predict(x)`` (with a graph from ``x`` in ``model`` mode, else without);
    2. the loss input: ``x`` (noisy loss), else ``D``; decoded with ``decode`` for a pixel-space loss;
    3. ``grad log p = -d/dx sum(loss over the guided rows)`` (``model``) or ``-d/dD`` (``x0``: dD/dx = I);
    4. ``D_hat = D + s sigma^2 grad log p`` on the guided rows.

    ``flow``: a rectified-flow model (``x = (1 - sigma) x0 + sigma z``, docs/methods.md §11). Its k-space
    counterpart is ``y = x / (1 - sigma)`` at level ``k = sigma / (1 - sigma)``, where the formula above holds;
    so ``D_hat = D + s k^2 grad_y log p`` with ``grad_y = (1 - sigma) grad_x`` (``model``, noisy losses) and
    ``grad_y = grad_D`` (``x0``: dD/dy = I). The returned gradient is ``grad_y`` (``grad_x`` on k-space).

    Runs outside inference mode with gradients on, whatever the caller's context; ``scale == 0`` returns the
    plain prediction exactly and computes no gradient.
    """
    if through not in THROUGH:
        raise EditLabError(f"gradient_through: {through!r} is not one of {list(THROUGH)}")
    sees = getattr(loss, "sees", "denoised")
    if scale == 0.0:
        return predict(x), torch.zeros_like(x)
    if loss.space == "pixel" and decode is None:
        raise EditLabError("a pixel-space loss needs a VAE to decode the prediction: connect the vae input")
    with torch.inference_mode(False), torch.enable_grad():
        leaf = x.detach().clone().requires_grad_(True)
        if sees == "noisy":
            with torch.inference_mode():
                denoised = predict(x)
            denoised = denoised.detach().clone()
            inputs = leaf
        elif through == "model":
            denoised_graph = predict(leaf)
            denoised = denoised_graph.detach()
            inputs = denoised_graph
        else:
            with torch.inference_mode():
                denoised = predict(x)
            denoised = denoised.detach().clone()
            leaf = denoised.clone().requires_grad_(True)
            inputs = leaf
        if loss.space == "pixel":
            inputs = decode(inputs)
        values = loss(inputs, sigma.detach().clone())
        mask = row_mask(x.shape[0], rows, values)
        (grad,) = torch.autograd.grad((values * mask.flatten()).sum(), leaf)
        grad_log_p = -grad.detach() * row_mask(x.shape[0], rows, grad)
        level = sigma.detach().to(denoised)
        if flow:
            if sees == "noisy" or through == "model":  # d/dy = (1 - sigma) d/dx
                grad_log_p = grad_log_p * (1.0 - level).reshape(-1, *([1] * (x.ndim - 1)))
            level = level / (1.0 - level).clamp_min(1e-4)
        return guided_denoised(denoised, grad_log_p, level, float(scale)), grad_log_p


# -- the losses --------------------------------------------------------------------------------------------

def spherical_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``2 arcsin(|a - b| / 2)^2`` of unit-normalised embeddings (the CLIP-guided diffusion line's loss)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    return (a - b).norm(dim=-1).div(2).arcsin().pow(2).mul(2)


@dataclass
class CutoutConfig:
    """Random square cut-outs of the decoded image, each resized to the CLIP input size.

    ``count`` 0 = the whole image once (no crops). Sizes are fractions of the shorter side, drawn uniformly in
    ``[size_min, size_max]``. ``augment``: random horizontal flips + small translations + pixel noise of this
    standard deviation (0 = none). Draws come from a generator seeded with ``seed`` and the step's sigma, so a
    run is reproducible.
    """

    count: int = 16
    size_min: float = 0.4
    size_max: float = 1.0
    augment: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.count < 0:
            raise EditLabError(f"cutouts must be >= 0, got {self.count}")
        if not 0.0 < self.size_min <= self.size_max <= 1.0:
            raise EditLabError(f"cut-out sizes need 0 < size_min <= size_max <= 1; got {self.size_min}, {self.size_max}")


def cutouts(pixels: torch.Tensor, size: int, cfg: CutoutConfig, generator: torch.Generator) -> torch.Tensor:
    """``[B * max(count, 1), 3, size, size]`` differentiable cut-outs (rows grouped by image, image-major)."""
    b, _, h, w = pixels.shape
    side = min(h, w)
    pieces = []
    for _ in range(max(cfg.count, 1)):
        if cfg.count == 0:
            crop = pixels
        else:
            frac = cfg.size_min + (cfg.size_max - cfg.size_min) * float(torch.rand((), generator=generator))
            c = max(1, int(round(frac * side)))
            top = int(torch.randint(0, h - c + 1, (), generator=generator))
            left = int(torch.randint(0, w - c + 1, (), generator=generator))
            crop = pixels[:, :, top:top + c, left:left + c]
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=crop.shape[-1] > size)
        if cfg.augment > 0:
            if float(torch.rand((), generator=generator)) < 0.5:
                crop = crop.flip(-1)
            noise = torch.randn(crop.shape, generator=generator).to(crop) * cfg.augment
            crop = crop + noise
        pieces.append(crop)
    return torch.stack(pieces, 1).flatten(0, 1)


class ClipGuidanceLoss:
    """Spherical distance of CLIP image embeddings of cut-outs of the decoded x0 prediction to target embeddings.

    ``encode``: preprocessed pixels ``[N, 3, size, size]`` -> embeddings ``[N, d]`` (differentiable);
    ``targets``: ``[T, d]`` text and/or image embeddings, ``weights``: ``[T]``. The loss of a row is
    ``sum_t w_t * mean_cutouts spherical_distance(f(cutout), g_t)`` (docs/methods.md §10: an approximation of
    GLIDE's CLIP guidance with an ordinary CLIP on the decoded x0 prediction).
    """

    space = "pixel"
    sees = "denoised"
    needs_sigma = False

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor, size: int,
                 mean: Sequence[float], std: Sequence[float], cut: CutoutConfig,
                 weights: Optional[torch.Tensor] = None):
        self.encode = encode
        self.targets = targets.detach().float()
        self.weights = (torch.ones(len(targets)) if weights is None else weights).float()
        self.size = int(size)
        self.mean = torch.tensor(list(mean)).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std)).view(1, 3, 1, 1)
        self.cut = cut

    def __call__(self, pixels: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.cut.seed * 1_000_003 + int(round(float(sigma.flatten()[0]) * 1e4)))
        crops = cutouts(pixels.float(), self.size, self.cut, g)
        # fresh copies: constants made inside ComfyUI's inference mode cannot be saved for backward
        crops = (crops - self.mean.to(crops).clone()) / self.std.to(crops).clone()
        feats = self.encode(crops).float()
        n = max(self.cut.count, 1)
        targets, weights = self.targets.to(feats).clone(), self.weights.to(feats).clone()
        dist = spherical_distance(feats[:, None, :], targets[None, :, :])  # [B*n, T]
        return (dist * weights).sum(-1).view(pixels.shape[0], n).mean(-1)


class ClassifierLoss:
    """``-log p(y | x, sigma)`` of a classifier ``net(inputs, sigma) -> logits [B, classes]`` (Dhariwal & Nichol).

    A noise-aware classifier (``takes_sigma``) on latents sees the noisy sample, as in the paper; any other one
    sees the (decoded) x0 prediction.
    """

    needs_sigma: bool

    def __init__(self, net: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], class_index: int, space: str,
                 takes_sigma: bool, num_classes: int):
        if not 0 <= class_index < num_classes:
            raise EditLabError(f"class_index {class_index} is outside the classifier's {num_classes} classes (0..{num_classes - 1})")
        if space not in SPACES:
            raise EditLabError(f"classifier input space {space!r} is not one of {list(SPACES)}")
        self.net, self.class_index, self.space = net, int(class_index), space
        self.needs_sigma = bool(takes_sigma)
        self.sees = "noisy" if takes_sigma and space == "latent" else "denoised"

    def __call__(self, inputs: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        logits = self.net(inputs, sigma.to(inputs))
        return -torch.log_softmax(logits.float(), dim=-1)[:, self.class_index]


@dataclass
class GradientGuidance:
    """What a guider applies after CFG: the loss, its scale, the window and the gradient path."""

    loss: GuidanceLoss
    scale: float
    window: GuidanceWindow
    through: str = "x0"
    rows: Optional[Sequence[int]] = None
    flow: bool = False

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if self.through not in THROUGH:
            raise EditLabError(f"gradient_through: {self.through!r} is not one of {list(THROUGH)}")
        if not math.isfinite(float(self.scale)):
            raise EditLabError(f"scale must be a finite number, got {self.scale}")

    def active(self, sigma: float, sample_sigmas) -> bool:
        return self.scale != 0.0 and self.window.active(*step_index(sigma, sample_sigmas))

    def __call__(self, predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                 sample_sigmas=None, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``D_hat`` on a guided step, the plain ``predict(x)`` (no gradient at all) on any other."""
        if not self.active(float(sigma.flatten()[0]), sample_sigmas):
            return predict(x)
        return self.guide(predict, x, sigma, decode)

    def guide(self, predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
              decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """``D_hat`` for a step the caller already knows is ``active``."""
        return guided_prediction(predict, x, sigma, self.loss, float(self.scale), self.through, decode, self.rows,
                                 self.flow)[0]
