"""Pixel and perceptual metrics over a region (docs/methods.md §9): PSNR, MSE, SSIM, LPIPS, L2 to a guide.

Images are ComfyUI-style float tensors [B,H,W,C] in [0,1] (or [H,W,C]); a region is a weight map
[B,H,W] / [H,W] in [0,1] (1 = counted). Region metrics are crop-free: both images are multiplied by the
region (so pixels outside it can never change the value) and the per-pixel values (squared error, the
SSIM map, LPIPS' spatial map) are averaged over the region only, so zeroed pixels are not counted. With
no region the values equal torchmetrics' PSNR / MSE / SSIM / LPIPS on the same images.

``pie_*`` are the PIE-Bench reference formulas (Ju et al., direct inversion): the images multiplied by
the region and the metric taken over every pixel, zeroed ones included.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import EditLabError


def as_bchw(images: torch.Tensor, what: str) -> torch.Tensor:
    """[B,H,W,C] (or [H,W,C]) in [0,1] -> float32 RGB [B,3,H,W]; grey is repeated, alpha dropped."""
    if not isinstance(images, torch.Tensor):
        raise EditLabError(f"{what}: expected an image tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise EditLabError(f"{what}: expected an IMAGE [batch, height, width, 1|3|4 channels], got {tuple(images.shape)}")
    x = images[..., :3].float() if images.shape[-1] != 1 else images.float().expand(*images.shape[:-1], 3)
    if not torch.isfinite(x).all():
        raise EditLabError(f"{what}: the image contains NaN or inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-4 or hi > 1 + 1e-4:
        raise EditLabError(f"{what}: pixel values span [{lo:.3g}, {hi:.3g}]; images must be in [0, 1] (ComfyUI IMAGE)")
    return x.clamp(0, 1).permute(0, 3, 1, 2).contiguous()


def same_size(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[-2:] != b.shape[-2:]:
        raise EditLabError(f"{what}: the images are {a.shape[-1]}x{a.shape[-2]} and {b.shape[-1]}x{b.shape[-2]} px; "
                           "metrics compare pixel to pixel, so resize one to the other's size first")
    if a.shape[0] != b.shape[0] and 1 not in (a.shape[0], b.shape[0]):
        raise EditLabError(f"{what}: batches of {a.shape[0]} and {b.shape[0]} images; give equal batches (or one image)")


def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Broadcast a batch of one against the other batch."""
    n = max(a.shape[0], b.shape[0])
    return a.expand(n, *a.shape[1:]), b.expand(n, *b.shape[1:])


def as_region(region: torch.Tensor | None, like: torch.Tensor, what: str = "mask") -> torch.Tensor | None:
    """A region [B,H,W] / [H,W] / [B,1,H,W] -> float weights [B,1,H,W] at the images' size, or None."""
    if region is None:
        return None
    r = region.float()
    if r.ndim == 2:
        r = r.unsqueeze(0)
    if r.ndim == 4 and r.shape[1] == 1:
        r = r[:, 0]
    if r.ndim != 3:
        raise EditLabError(f"{what}: expected [batch, height, width], got {tuple(region.shape)}")
    if r.shape[-2:] != like.shape[-2:]:
        raise EditLabError(f"{what} is {r.shape[-1]}x{r.shape[-2]} px but the images are {like.shape[-1]}x{like.shape[-2]}; "
                           "give the mask at the images' size")
    if r.shape[0] not in (1, like.shape[0]):
        raise EditLabError(f"{what}: {r.shape[0]} masks for {like.shape[0]} images (use one mask or one per image)")
    if not torch.isfinite(r).all():
        raise EditLabError(f"{what} contains NaN or inf values")
    return r.clamp(0, 1).unsqueeze(1).expand(like.shape[0], 1, *like.shape[-2:])


def _weighted_mean(values: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Per-row mean of [B,C,H,W] values weighted by [B,1,H,W] (NaN where the region is empty)."""
    if w is None:
        return values.flatten(1).mean(1)
    total = (w.expand_as(values)).flatten(1).sum(1)
    out = (values * w).flatten(1).sum(1) / total.clamp_min(1e-12)
    return torch.where(total > 0, out, torch.full_like(out, float("nan")))


def mse(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per row over the region, [B]."""
    return _weighted_mean((x - y) ** 2, region)


def psnr(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None = None, data_range: float = 1.0) -> torch.Tensor:
    """PSNR = 10 log10(range^2 / MSE) per row (inf for identical regions), [B]."""
    return 10 * torch.log10(data_range ** 2 / mse(x, y, region))


def l2(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """SDEdit's faithfulness: the L2 norm of the difference (RGB in [0,1]) per row, over the region, [B]."""
    d = (x - y) ** 2 if region is None else (x - y) ** 2 * region
    return d.flatten(1).sum(1).sqrt()


def ssim(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """SSIM (Gaussian 11x11, sigma 1.5, range 1: torchmetrics' defaults) per row: its map averaged over the region."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
    if region is not None:
        x, y = x * region, y * region
    _, full = tm_ssim(x, y, data_range=1.0, reduction="none", return_full_image=True)
    return _weighted_mean(full, region)


def lpips(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """LPIPS (Zhang et al. 2018) per row with torchmetrics' network; over a region, its spatial map's mean there.

    With no region this is torchmetrics' own forward (spatially averaged per layer, then summed).
    """
    device = next(net.parameters()).device
    if region is None:
        return net((2 * x - 1).to(device), (2 * y - 1).to(device)).flatten().float().cpu()
    w = region.to(device)
    a, b = (2 * x.to(device) * w - 1), (2 * y.to(device) * w - 1)
    from torchmetrics.functional.image.lpips import _normalize_tensor
    fa, fb = net.net(net.scaling_layer(a)), net.net(net.scaling_layer(b))
    spatial = 0
    for k in range(net.L):
        diff = (_normalize_tensor(fa[k]) - _normalize_tensor(fb[k])) ** 2
        # the spatial variant of LPIPS: each layer's map upsampled to the image (bilinear), then summed
        spatial = spatial + F.interpolate(net.lins[k](diff), size=a.shape[-2:], mode="bilinear", align_corners=False)
    return _weighted_mean(spatial, w).float().cpu()


def quantize(x: torch.Tensor) -> torch.Tensor:
    """As the reference reads images: 8-bit values."""
    return torch.round(x * 255) / 255


def pie_region(edit_mask: torch.Tensor) -> torch.Tensor:
    """PIE-Bench's mask quirk: the one-pixel border is forced into the edit region ("annotation errors")."""
    m = edit_mask.clone()
    m[..., 0, :] = 1
    m[..., -1, :] = 1
    m[..., :, 0] = 1
    m[..., :, -1] = 1
    return m


def pie_pixel(x: torch.Tensor, y: torch.Tensor, region: torch.Tensor | None, lpips_net: torch.nn.Module | None) -> dict:
    """The reference's PSNR / MSE / SSIM / LPIPS: images multiplied by the region, zeros counted, [B] each."""
    from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim
    x, y = quantize(x), quantize(y)
    if region is not None:
        x, y = x * region, y * region
    out = {"mse": ((x - y) ** 2).flatten(1).mean(1)}
    out["psnr"] = 10 * torch.log10(1.0 / out["mse"])
    out["ssim"] = tm_ssim(x, y, data_range=1.0, reduction="none")
    if lpips_net is not None:
        out["lpips"] = lpips(lpips_net, x, y, None)
    if region is not None:  # the reference reports "nan" for an empty region
        empty = region.flatten(1).sum(1) == 0
        out = {k: torch.where(empty, torch.full_like(v, float("nan")), v) for k, v in out.items()}
    return out
