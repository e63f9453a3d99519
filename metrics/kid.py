"""Kernel Inception Distance (Binkowski et al. 2018; SDEdit's realism metric, docs/methods.md §9).

KID = the unbiased MMD^2 between feature sets with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets; the estimator is torchmetrics' (``poly_mmd``), fed with features from any extractor (Inception-v3
pool features in practice, a tiny stand-in in the tests).
"""
from __future__ import annotations

import torch

from ..errors import EditLabError


@torch.inference_mode()
def features(extractor: torch.nn.Module, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """[N,d] features of [N,3,H,W] images in [0,1], in chunks on the extractor's device."""
    dev = next(extractor.parameters()).device
    return torch.cat([extractor(images[i:i + chunk].to(dev)).float().cpu().flatten(1)
                      for i in range(0, images.shape[0], chunk)])


def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 over ``subsets`` random subsets (size capped at the smaller set)."""
    from torchmetrics.image.kid import poly_mmd
    n = min(real.shape[0], fake.shape[0])
    if n < 2:
        raise EditLabError(f"KID needs at least 2 images in each set; got {real.shape[0]} real and {fake.shape[0]} generated")
    size = min(subset_size, n)
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=gen)[:size]].double()
        f = fake[torch.randperm(fake.shape[0], generator=gen)[:size]].double()
        scores.append(poly_mmd(r, f))
    s = torch.stack(scores)
    return float(s.mean()), float(s.std(unbiased=False))
