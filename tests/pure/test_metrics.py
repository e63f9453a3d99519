"""Metric core: properties and parity with torchmetrics / the PIE-Bench reference formulas (docs/methods.md §9)."""
from __future__ import annotations

import math

import pytest
import torch
from torchmetrics.functional import mean_squared_error
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure
from torchmetrics.image.kid import KernelInceptionDistance

import random_metric_models as rmm
from editlab.errors import EditLabError
from editlab.metrics import edit, embed, kid, models, pixel


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("editlab_metrics")
    rmm.write_default_set(root)
    return str(root)


@pytest.fixture(scope="module")
def loaded(folder):
    return edit.EditModels(models.load_clip("clip-vit-large-patch14", [folder]),
                           models.load_vit("structure", "dino-vitb8", [folder]),
                           models.load_lpips("squeeze", [folder]))


def _images(seed=0, n=2, h=40, w=48):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, h, w, generator=g)


def _region(n=2, h=40, w=48):
    r = torch.zeros(n, 1, h, w)
    r[:, :, 8:30, 10:40] = 1
    return r


# ---- properties ------------------------------------------------------------------------------------------

def test_identical_images_give_the_ideal_values(loaded):
    x = _images()
    rows = edit.edit_metrics(x.permute(0, 2, 3, 1), x.permute(0, 2, 3, 1), None, None, loaded,
                             keys=("structure_distance", "psnr", "lpips", "mse", "ssim"))
    for row in rows:
        assert row["psnr"] == math.inf and row["mse"] == 0 and row["lpips"] == pytest.approx(0, abs=1e-7)
        assert row["ssim"] == pytest.approx(1, abs=1e-6) and row["structure_distance"] == pytest.approx(0, abs=1e-9)
    e = embed.clip_image_embeds(loaded.clip, x)
    assert torch.allclose(embed.mean_pairwise_cos(e[:1], e[:1]), torch.ones(1), atol=1e-6)


def test_pixels_outside_the_region_never_change_a_region_metric(loaded):
    x, y, r = _images(0), _images(1), _region()
    y2 = y * r + _images(2) * (1 - r)  # other content everywhere outside the region
    x2 = x * r + _images(3) * (1 - r)
    for fn in (pixel.psnr, pixel.mse, pixel.ssim, pixel.l2):
        assert torch.allclose(fn(x, y, r), fn(x2, y2, r), atol=1e-6), fn.__name__
    a, b = pixel.lpips(loaded.lpips.module, x, y, r), pixel.lpips(loaded.lpips.module, x2, y2, r)
    assert torch.allclose(a, b, atol=1e-6)
    # ...and the region metrics do see a change inside the region
    y3 = y.clone()
    y3[:, :, 10:20, 12:30] = 0.5
    assert not torch.allclose(pixel.ssim(x, y, r), pixel.ssim(x, y3, r))


def test_region_metrics_do_not_count_zeroed_pixels():
    x = torch.zeros(1, 3, 6, 6)
    y = x.clone()
    y[..., :3, :] = 0.5  # the region's pixels all differ by 0.5
    r = torch.zeros(1, 1, 6, 6)
    r[..., :3, :] = 1
    assert pixel.mse(x, y, r).item() == pytest.approx(0.25)  # not 0.125 (half the image zeroed)
    assert pixel.psnr(x, y, r).item() == pytest.approx(10 * math.log10(4))


def test_symmetric_metrics_are_symmetric(loaded):
    x, y, r = _images(0), _images(1), _region()
    for fn in (pixel.psnr, pixel.mse, pixel.ssim, pixel.l2):
        assert torch.allclose(fn(x, y, r), fn(y, x, r), atol=1e-6), fn.__name__
    assert torch.allclose(pixel.lpips(loaded.lpips.module, x, y, r), pixel.lpips(loaded.lpips.module, y, x, r), atol=1e-6)
    assert torch.allclose(embed.structure_distance(loaded.structure, x, y),
                          embed.structure_distance(loaded.structure, y, x), atol=1e-7)


def test_directional_similarity_flips_with_the_captions(loaded):
    x, y = _images(0, n=1), _images(1, n=1)
    i = embed.clip_image_embeds(loaded.clip, torch.cat([x, y]))
    t = embed.clip_text_embeds(loaded.clip, ["a cat", "a dog"])
    d = embed.directional(i[:1], i[1:], t[:1], t[1:])
    assert torch.allclose(embed.directional(i[:1], i[1:], t[1:], t[:1]), -d, atol=1e-6)
    assert torch.allclose(embed.directional(i[1:], i[:1], t[1:], t[:1]), d, atol=1e-6)


def test_kid_of_a_set_with_itself_is_about_zero_and_grows_with_a_shift():
    net = rmm.TinyFeatures()
    x = _images(0, n=40, h=16, w=16) * 0.5
    f = kid.features(net, x)
    same, _ = kid.kid(f, f, subsets=5, subset_size=40)
    shifts = [kid.kid(f, kid.features(net, x + s), subsets=5, subset_size=40)[0] for s in (0.1, 0.3)]
    assert abs(same) < 0.05 * shifts[0]
    assert 0 < shifts[0] < shifts[1]


# ---- parity ----------------------------------------------------------------------------------------------

def test_unmasked_values_equal_torchmetrics(loaded):
    x, y = _images(0), _images(1)
    ref_psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    assert torch.allclose(pixel.psnr(x, y), ref_psnr, atol=1e-5)
    assert torch.allclose(pixel.ssim(x, y), structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"))
    assert torch.allclose(pixel.ssim(x, y, torch.ones(2, 1, 40, 48)),
                          structural_similarity_index_measure(x, y, data_range=1.0, reduction="none"), atol=1e-6)
    from torchmetrics.functional.image.lpips import _lpips_update
    assert torch.allclose(pixel.lpips(loaded.lpips.module, x, y), _lpips_update(x, y, loaded.lpips.module, True))
    # the masked LPIPS (spatial map) over an all-ones region is the unmasked value up to the upsampling
    assert torch.allclose(pixel.lpips(loaded.lpips.module, x, y, torch.ones(2, 1, 40, 48)),
                          pixel.lpips(loaded.lpips.module, x, y), rtol=2e-2)


def test_masked_psnr_and_mse_equal_torchmetrics_on_the_region_pixels():
    x, y, r = _images(0), _images(1), _region()
    for i in range(2):
        sel = r[i, 0].bool()
        xs, ys = x[i][:, sel], y[i][:, sel]
        assert pixel.mse(x, y, r)[i].item() == pytest.approx(mean_squared_error(xs, ys).item(), rel=1e-5)
        assert pixel.psnr(x, y, r)[i].item() == pytest.approx(
            peak_signal_noise_ratio(xs, ys, data_range=1.0).item(), rel=1e-5)


def test_kid_equals_torchmetrics_with_the_same_features():
    net = rmm.TinyFeatures()
    real, fake = _images(0, n=12, h=16, w=16), _images(1, n=12, h=16, w=16) * 0.8
    ref = KernelInceptionDistance(feature=net, subsets=1, subset_size=12)
    ref.update(real, real=True)
    ref.update(fake, real=False)
    expected = ref.compute()[0].item()
    ours, _ = kid.kid(kid.features(net, real), kid.features(net, fake), subsets=3, subset_size=12)
    assert ours == pytest.approx(expected, rel=1e-4)  # every subset is the whole set: MMD^2 is order-free


def test_pie_bench_compat_matches_the_reference_formulas_by_hand():
    # 6x6: the source is black, the edit brightens every pixel by 128/255 (an 8-bit value), the edit mask is empty. The reference forces the mask's border to 1, multiplies both images by
    # the background (the 4x4 interior) and averages over all 36 pixels.
    src = torch.zeros(1, 6, 6, 3)
    out = torch.full((1, 6, 6, 3), 128 / 255)
    mask = torch.zeros(1, 6, 6)
    m = edit.EditModels()
    compat = edit.edit_metrics(src, out, mask, None, m, compat=True, keys=("mse", "psnr", "ssim"))[0]
    d2 = (128 / 255) ** 2
    assert compat["mse"] == pytest.approx(16 * d2 / 36, rel=1e-6)
    assert compat["psnr"] == pytest.approx(10 * math.log10(36 / (16 * d2)), rel=1e-6)
    ours = edit.edit_metrics(src, out, mask, None, m, keys=("mse", "psnr"))[0]
    assert ours["mse"] == pytest.approx(d2, rel=1e-6)  # no border quirk, zeros not counted
    # the reference's SSIM: torchmetrics' SSIM on the multiplied images, zeros included
    bg = torch.zeros(1, 1, 6, 6)
    bg[..., 1:5, 1:5] = 1
    expected = structural_similarity_index_measure(src.permute(0, 3, 1, 2) * bg, out.permute(0, 3, 1, 2) * bg,
                                                   data_range=1.0)
    assert compat["ssim"] == pytest.approx(expected.item(), rel=1e-6)


def test_pie_bench_compat_empty_background_is_nan():
    src, out = torch.zeros(1, 6, 6, 3), torch.ones(1, 6, 6, 3)
    mask = torch.ones(1, 6, 6)
    row = edit.edit_metrics(src, out, mask, None, edit.EditModels(), compat=True, keys=("mse", "psnr"))[0]
    assert math.isnan(row["mse"]) and math.isnan(row["psnr"])


def test_pie_bench_clip_score_equals_torchmetrics_clipscore(loaded):
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPProcessor
    clip = loaded.clip

    class Tensors(torch.nn.Module):  # transformers >= 5 returns an output object torchmetrics 1.9 cannot read
        def __init__(self):
            super().__init__()
            self.m, self.config = clip.model, clip.model.config

        def get_image_features(self, *a, **k):
            return models._tensor(self.m.get_image_features(*a, **k))

        def get_text_features(self, *a, **k):
            return models._tensor(self.m.get_text_features(*a, **k))

    processor = CLIPProcessor.from_pretrained(clip.path, local_files_only=True)
    seen_positive = False
    for seed, text in enumerate(["a cat", "zz", "photo of a red car", "1 2 3", "dog!", "q"]):
        img = _images(seed, n=1)
        ours = edit.pie_clip_score(clip, img, [text]).item()
        ref = clip_score((img[0] * 255).round().to(torch.uint8), text, model_name_or_path=lambda: (Tensors(), processor))
        assert ours == pytest.approx(ref.item(), abs=1e-4)
        seen_positive |= ours > 0
    assert seen_positive  # the clamp at 0 is not all we compared


def test_bad_inputs_are_clear_errors(loaded):
    with pytest.raises(EditLabError, match="resize"):
        edit.edit_metrics(torch.rand(1, 8, 8, 3), torch.rand(1, 9, 8, 3), None, None, loaded, keys=("mse",))
    with pytest.raises(EditLabError, match=r"\[0, 1\]"):
        edit.edit_metrics(torch.rand(1, 8, 8, 3) * 255, torch.rand(1, 8, 8, 3), None, None, loaded, keys=("mse",))
    with pytest.raises(EditLabError, match="mask is 4x4"):
        edit.edit_metrics(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), torch.ones(1, 4, 4), None, loaded, keys=("mse",))
    with pytest.raises(EditLabError, match="target prompt"):
        edit.edit_metrics(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), None, None, loaded, keys=("clip_whole",))
    with pytest.raises(EditLabError, match="LPIPS"):
        edit.edit_metrics(torch.rand(1, 8, 8, 3), torch.rand(1, 8, 8, 3), None, None, edit.EditModels(), keys=("lpips",))


def test_metric_plot_draws_the_series_and_rejects_bad_lines():
    from editlab.metrics.plot import parse_series, plot_series
    series = parse_series("# s_I sweep\ns_I=1.2, 0.80, 0.12\ns_I=1.2, 0.75, 0.16\n\ns_I=1.5, 0.85, 0.10")
    assert series == {"s_I=1.2": [(0.8, 0.12), (0.75, 0.16)], "s_I=1.5": [(0.85, 0.1)]}
    image = plot_series(series, "CLIP image similarity", "CLIP directional similarity", "sweep", 320, 200)
    assert image.shape == (1, 200, 320, 3) and 0 <= image.min() < image.max() <= 1
    assert (image < 0.9).any(dim=-1).float().mean() > 0.01  # something was drawn on the white canvas
    with pytest.raises(EditLabError, match="line 2"):
        parse_series("a, 1, 2\nb, x, 3")
    with pytest.raises(EditLabError, match="empty"):
        parse_series("# nothing\n")


# ---- sweeps (one metric per image -> Metric Plot points) -----------------------------------------------

def _bhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def test_sweep_metric_orders_a_sweep_by_distance_to_the_guide(loaded):
    from editlab.metrics.sweep import SweepModels, sweep_values
    guide = _images(seed=3, n=1)
    # a sweep of growing departures from the guide, as SDEdit's output drifts further with larger t0
    steps = torch.tensor([0.0, 0.1, 0.3, 0.6]).view(-1, 1, 1, 1)
    sweep = (guide * (1 - steps) + steps * _images(seed=4, n=1)).clamp(0, 1)
    models_ = SweepModels(clip=loaded.clip, lpips=loaded.lpips)
    l2 = sweep_values("l2", _bhwc(sweep), _bhwc(guide), "", models_)
    assert l2[0] == 0 and (l2.diff() > 0).all()
    by_hand = ((sweep - guide) ** 2).flatten(1).sum(1).sqrt()
    torch.testing.assert_close(l2, by_hand)
    psnr = sweep_values("psnr", _bhwc(sweep), _bhwc(guide), "", models_)
    assert math.isinf(psnr[0]) and (psnr[1:].diff() < 0).all()
    clip_i = sweep_values("clip_i", _bhwc(sweep), _bhwc(guide), "", models_)
    assert clip_i[0] == pytest.approx(1, abs=1e-5) and (clip_i[1:] < 1).all()
    lp = sweep_values("lpips", _bhwc(sweep), _bhwc(guide), "", models_)
    assert lp[0] == pytest.approx(0, abs=1e-6) and (lp[1:] > 0).all()
    t = sweep_values("clip_t", _bhwc(sweep), None, "a photo", models_)
    direct = embed.clip_t(embed.clip_image_embeds(loaded.clip, sweep), embed.clip_text_embeds(loaded.clip, ["a photo"]))
    torch.testing.assert_close(t, direct)


def test_sweep_metric_bad_inputs_are_clear_errors(loaded):
    from editlab.metrics.sweep import SweepModels, sweep_values
    imgs = _bhwc(_images(n=3))
    with pytest.raises(EditLabError, match="reference"):
        sweep_values("l2", imgs, None, "", SweepModels())
    with pytest.raises(EditLabError, match="text"):
        sweep_values("clip_t", imgs, None, " ", SweepModels(clip=loaded.clip))
    with pytest.raises(EditLabError, match="2 reference images for 3"):
        sweep_values("l2", imgs, imgs[:2], "", SweepModels())
    with pytest.raises(EditLabError, match="not one of"):
        sweep_values("fid", imgs, imgs, "", SweepModels())


def test_sweep_points_round_trip_through_metric_plot_parsing():
    from editlab.metrics.plot import format_points, parse_series, parse_x_values
    xs = parse_x_values("0.3, 0.45; 0.6", 3)
    assert xs == [0.3, 0.45, 0.6]
    assert parse_x_values("", 3) == [0.0, 1.0, 2.0]
    text = format_points("L2, to guide", xs, [1.5, 2.25, 4.0]) + "\n" + format_points("CLIP-T", xs, [0.2, 0.1, 0.05])
    assert parse_series(text) == {"L2, to guide": [(0.3, 1.5), (0.45, 2.25), (0.6, 4.0)],
                                  "CLIP-T": [(0.3, 0.2), (0.45, 0.1), (0.6, 0.05)]}
    with pytest.raises(EditLabError, match="2 numbers for 3 images"):
        parse_x_values("0.1, 0.2", 3)
    with pytest.raises(EditLabError, match="one number per image"):
        parse_x_values("0.1, low, 0.2", 3)
