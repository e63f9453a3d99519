"""Gradient guidance (docs/methods.md §10): closed forms on Gaussian data, windows, losses, classifier files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from editlab.errors import EditLabError
from editlab.guidance.classifier import ClassifierConfig, NoisyClassifier, load_classifier
from editlab.guidance.gradient import (
    ClassifierLoss,
    ClipGuidanceLoss,
    CutoutConfig,
    GradientGuidance,
    GuidanceWindow,
    cutouts,
    guided_denoised,
    guided_prediction,
    spherical_distance,
    step_index,
)

M = torch.tensor([1.5, 0.5])  # two classes: x0 ~ N(+M, I) (class 0) or N(-M, I) (class 1), equal priors


def as_latent(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], 2, 1, 1)


def mixture_denoiser(sigma: float):
    """The exact D(x, sigma) of the two-Gaussian mixture: x + sigma^2 * score, score = (-x + M tanh(M.x / v)) / v."""
    v = 1.0 + sigma ** 2

    def predict(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        a = flat @ M / v
        score = (-flat + M * torch.tanh(a)[:, None]) / v
        return as_latent(flat + sigma ** 2 * score)
    return predict


def exact_classifier(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The Bayes classifier on noisy samples: logit of class 0 vs 1 is 2 M.x / (1 + sigma^2)."""
    v = 1.0 + sigma.reshape(-1) ** 2
    logit = 2.0 * (x.flatten(1) @ M) / v
    return torch.stack([logit, torch.zeros_like(logit)], -1)


def class_loss() -> ClassifierLoss:
    return ClassifierLoss(exact_classifier, 0, "latent", takes_sigma=True, num_classes=2)


@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_guided_prediction_follows_the_closed_form_of_the_guided_score(scale):
    torch.manual_seed(0)
    sigma = 1.7
    x = as_latent(torch.randn(64, 2) * 2.0)
    s = torch.full((64,), sigma)
    d_hat, grad = guided_prediction(mixture_denoiser(sigma), x, s, class_loss(), scale)
    v = 1 + sigma ** 2
    flat = x.flatten(1)
    a = flat @ M / v
    grad_expected = (1 - torch.sigmoid(2 * a))[:, None] * 2 * M / v  # d/dx log sigmoid(2 M.x / v)
    expected = flat + sigma ** 2 * ((-flat + M * torch.tanh(a)[:, None]) / v + scale * grad_expected)
    assert torch.allclose(grad.flatten(1), grad_expected, atol=1e-5)
    assert torch.allclose(d_hat.flatten(1), expected, atol=1e-5)
    if scale == 1.0:  # s = 1 with the exact classifier = the class-conditional denoiser of N(M, I)
        assert torch.allclose(d_hat.flatten(1), flat + sigma ** 2 * (M - flat) / v, atol=1e-5)


def euler_sample(guidance_scale: float, n: int = 4000, steps: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.exp(torch.linspace(math.log(60.0), math.log(0.01), steps)).tolist() + [0.0]
    x = as_latent(torch.randn(n, 2, generator=g) * math.sqrt(1 + sigmas[0] ** 2))
    for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
        d, _ = guided_prediction(mixture_denoiser(sigma), x, torch.full((n,), sigma), class_loss(), guidance_scale)
        x = x + (nxt - sigma) * (x - d) / sigma
    return x.flatten(1)


def test_guided_sampler_mean_shift_and_class_probability_follow_the_closed_form():
    guided, plain = euler_sample(1.0), euler_sample(0.0)
    # unguided: the symmetric mixture, mean 0; guided with s = 1: the class-0 component N(M, I)
    assert plain.mean(0).abs().max() < 0.12
    assert torch.allclose(guided.mean(0), M, atol=0.08)
    assert torch.allclose(guided.var(0), torch.ones(2), atol=0.12)
    # p(class 0 | x0) = sigmoid(2 M.x0); under N(M, I), z = M.x0 ~ N(|M|^2, |M|^2): quadrature
    m2 = float(M @ M)
    z = torch.linspace(m2 - 8 * math.sqrt(m2), m2 + 8 * math.sqrt(m2), 20001, dtype=torch.float64)
    pdf = torch.exp(-(z - m2) ** 2 / (2 * m2)) / math.sqrt(2 * math.pi * m2)
    expected = float(torch.trapezoid(torch.sigmoid(2 * z) * pdf, z))
    measured = float(torch.sigmoid(2 * guided @ M).mean())
    assert abs(measured - expected) < 0.02
    assert float(torch.sigmoid(2 * plain @ M).mean()) < 0.6 < measured


class CountingLoss:
    space, sees, needs_sigma = "latent", "denoised", False

    def __init__(self, target: torch.Tensor):
        self.target, self.calls = target, 0

    def __call__(self, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 0.5 * (x0 - self.target).pow(2).flatten(1).sum(-1)


def test_x0_and_model_mode_gradients_have_their_closed_forms():
    sigma = 2.0
    v = 1 + sigma ** 2
    x = torch.randn(3, 4, 2, 2)
    target = torch.randn(3, 4, 2, 2)
    predict = lambda z: z / v  # noqa: E731 (D of N(0, I) data)
    s = torch.full((3,), sigma)
    d_x0, g_x0 = guided_prediction(predict, x, s, CountingLoss(target), 0.3, "x0")
    d_model, g_model = guided_prediction(predict, x, s, CountingLoss(target), 0.3, "model")
    assert torch.allclose(g_x0, -(x / v - target), atol=1e-6)          # d/dD of -loss
    assert torch.allclose(g_model, -(x / v - target) / v, atol=1e-6)   # chain rule through D(x) = x / v
    assert torch.allclose(d_x0, x / v + 0.3 * sigma ** 2 * g_x0, atol=1e-6)
    assert torch.allclose(d_model, x / v + 0.3 * sigma ** 2 * g_model, atol=1e-6)


def test_scale_zero_is_exactly_the_unguided_prediction_and_computes_no_gradient():
    x = torch.randn(2, 4, 3, 3)
    loss = CountingLoss(torch.zeros(2, 4, 3, 3))
    predict = lambda z: torch.tanh(z) * 0.7  # noqa: E731
    for through in ("x0", "model"):
        d, g = guided_prediction(predict, x, torch.full((2,), 3.0), loss, 0.0, through)
        assert torch.equal(d, predict(x)) and not g.any()
    assert loss.calls == 0


def test_window_and_every_k_are_respected_no_gradient_outside_them():
    sigmas = torch.linspace(10.0, 0.0, 11)  # 10 steps, fractions i / 9
    loss = CountingLoss(torch.zeros(1, 4, 2, 2))
    guidance = GradientGuidance(loss, 1.0, GuidanceWindow(0.2, 0.7, 2), "x0")
    x = torch.randn(1, 4, 2, 2)
    guided_steps = []
    for i, sigma in enumerate(sigmas[:-1].tolist()):
        before = loss.calls
        out = guidance(lambda z: z * 0.5, x, torch.tensor([sigma]), sigmas)
        if loss.calls > before:
            guided_steps.append(i)
        else:
            assert torch.equal(out, x * 0.5)
    # window [0.2, 0.7] of 9 intervals: steps 2..6; every 2nd from the first one inside
    assert guided_steps == [2, 4, 6]
    # a sampler that evaluates between schedule points (Heun) belongs to the step it is inside
    assert step_index(float((sigmas[3] + sigmas[4]) / 2), sigmas) == (3, 10)
    assert step_index(float(sigmas[4]), sigmas) == (4, 10)


def test_rows_limit_guidance_to_the_named_rows():
    x = torch.randn(3, 4, 2, 2)
    _, g = guided_prediction(lambda z: z, x, torch.full((3,), 1.0), CountingLoss(torch.zeros_like(x)), 1.0,
                             "x0", rows=[1])
    assert not g[0].any() and not g[2].any() and g[1].abs().sum() > 0
    with pytest.raises(EditLabError, match="outside the batch"):
        guided_prediction(lambda z: z, x, torch.full((3,), 1.0), CountingLoss(torch.zeros_like(x)), 1.0, rows=[5])


def test_bad_windows_and_losses_are_refused():
    with pytest.raises(EditLabError, match="after sigma_end"):
        GuidanceWindow(0.8, 0.2)
    with pytest.raises(EditLabError, match="every_k"):
        GuidanceWindow(0.0, 1.0, 0)
    with pytest.raises(EditLabError, match="LOSS"):
        GradientGuidance(object(), 1.0, GuidanceWindow())
    with pytest.raises(EditLabError, match="gradient_through"):
        GradientGuidance(CountingLoss(torch.zeros(1)), 1.0, GuidanceWindow(), "unet")
    with pytest.raises(EditLabError, match="class_index"):
        ClassifierLoss(exact_classifier, 2, "latent", True, 2)


def test_guided_denoised_is_d_plus_s_sigma_squared_grad():
    d, g = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    out = guided_denoised(d, g, torch.tensor([2.0, 0.5]), 3.0)
    assert torch.allclose(out[0], d[0] + 3.0 * 4.0 * g[0]) and torch.allclose(out[1], d[1] + 3.0 * 0.25 * g[1])


def test_spherical_distance_and_cutouts():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert torch.allclose(spherical_distance(a, b), torch.tensor([math.pi ** 2 / 8]))
    assert torch.allclose(spherical_distance(a, 2 * a), torch.zeros(1), atol=1e-6)
    pixels = torch.rand(2, 3, 20, 24, requires_grad=True)
    cfg = CutoutConfig(count=5, size_min=0.3, size_max=0.9, augment=0.1, seed=3)
    one = cutouts(pixels, 8, cfg, torch.Generator().manual_seed(1))
    two = cutouts(pixels, 8, cfg, torch.Generator().manual_seed(1))
    other = cutouts(pixels, 8, cfg, torch.Generator().manual_seed(2))
    assert one.shape == (10, 3, 8, 8) and torch.equal(one, two) and not torch.equal(one, other)
    one.sum().backward()
    assert pixels.grad[0].abs().sum() > 0 and pixels.grad[1].abs().sum() > 0
    with pytest.raises(EditLabError, match="size_min"):
        CutoutConfig(size_min=0.9, size_max=0.5)


def test_clip_loss_moves_toward_its_target_along_the_guided_direction():
    torch.manual_seed(0)
    proj = torch.randn(3 * 8 * 8, 6)
    encode = lambda p: p.flatten(1) @ proj  # noqa: E731 (a linear stand-in for CLIP's image tower)
    target = torch.randn(1, 6)
    loss = ClipGuidanceLoss(encode, target, 8, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), CutoutConfig(4, 0.5, 1.0, 0.0))
    pixels = torch.rand(2, 3, 16, 16)
    sigma = torch.full((2,), 1.0)
    x = pixels.clone().requires_grad_(True)
    value = loss(x, sigma)
    assert value.shape == (2,)
    (g,) = torch.autograd.grad(value.sum(), x)
    assert torch.all(loss(pixels - 0.02 * g / g.abs().max(), sigma) < value.detach())


def test_classifier_files_round_trip_and_bad_configs(tmp_path):
    cfg = ClassifierConfig(space="latent", channels=4, num_classes=3, takes_sigma=True, width=16, depth=2)
    torch.manual_seed(0)
    net = NoisyClassifier(cfg)
    from safetensors.torch import save_file
    save_file(net.state_dict(), str(tmp_path / "c.safetensors"))
    raw = {"arch": "editlab_noisy_convnet", "space": "latent", "channels": 4, "num_classes": 3,
           "takes_sigma": True, "width": 16, "depth": 2}
    (tmp_path / "c.json").write_text(json.dumps(raw))
    loaded = load_classifier(str(tmp_path / "c.safetensors"))
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(loaded(x, torch.tensor([1.0, 1.0])), net(x, torch.tensor([1.0, 1.0])))
    assert not torch.allclose(loaded(x, torch.tensor([0.1, 0.1])), loaded(x, torch.tensor([10.0, 10.0])))
    (tmp_path / "c.json").write_text(json.dumps({**raw, "width": 32}))
    with pytest.raises(EditLabError, match="does not match its config"):
        load_classifier(str(tmp_path / "c.safetensors"))
    (tmp_path / "c.json").write_text(json.dumps({**raw, "space": "pixel"}))
    with pytest.raises(EditLabError, match="3 channels"):
        load_classifier(str(tmp_path / "c.safetensors"))
    (tmp_path / "c.json").unlink()
    with pytest.raises(EditLabError, match="no config"):
        load_classifier(str(tmp_path / "c.safetensors"))
    loss = ClassifierLoss(loaded, 1, "latent", True, 3)
    assert loss.sees == "noisy" and loss(x, torch.tensor([1.0, 1.0])).shape == (2,)


@pytest.mark.parametrize("through", ["x0", "model"])
def test_flow_form_is_the_k_space_formula_in_the_flow_models_k_space_counterpart(through):
    """x = (1 - sigma) x0 + sigma z is y = x / (1 - sigma) = x0 + k z, k = sigma / (1 - sigma) (docs/methods.md §11)."""
    torch.manual_seed(1)
    sigma = 0.6
    k = sigma / (1 - sigma)
    x = torch.randn(2, 4, 2, 2)
    target = torch.randn(2, 4, 2, 2)
    flow_d = lambda z: (1 - sigma) * z / ((1 - sigma) ** 2 + sigma ** 2)  # noqa: E731 (exact D, N(0, I) data)
    k_d = lambda y: y / (1 + k ** 2)  # noqa: E731 (the same posterior mean in k-space)
    d_flow, _ = guided_prediction(flow_d, x, torch.full((2,), sigma), CountingLoss(target), 0.7, through, flow=True)
    d_k, _ = guided_prediction(k_d, x / (1 - sigma), torch.full((2,), k), CountingLoss(target), 0.7, through)
    assert torch.allclose(d_flow, d_k, atol=1e-5)
    plain = flow_d(x)
    assert not torch.allclose(d_flow, plain, atol=1e-3)
