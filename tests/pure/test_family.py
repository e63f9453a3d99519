"""The model families of docs/methods.md §11 against analytic denoisers (no ComfyUI).

Gaussian data ``x0 ~ N(mu, v I)`` under the flow parametrisation ``x = (1 - s) x0 + s z`` has the exact
denoiser ``D(x, s) = mu + (1 - s) v / ((1 - s)^2 v + s^2) (x - (1 - s) mu)``; under k-space
``x = x0 + s z``: ``D = mu + v / (v + s^2) (x - mu)``. Expected values below are those formulas.
"""
from __future__ import annotations

import math

import pytest
import torch

from editlab.errors import EditLabError
from editlab.samplers import family as fam
from editlab.samplers.inversion import ddim_invert
from editlab.samplers.null_text import NullTextConfig, optimize_null_text
from editlab.samplers.sdedit import KnownRegion, perturb, sample_reverse_sde, seeded_noise, with_known_region

MU, VAR = 0.7, 0.25


def flow_gauss(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    a = 1.0 - s
    return MU + a * VAR / (a * a * VAR + s * s) * (x - a * MU)


def k_gauss(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return MU + VAR / (VAR + s * s) * (x - MU)


def data(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + math.sqrt(VAR) * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)


def euler_sample(denoise, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """ComfyUI's euler (k_diffusion.sampling.sample_euler) written out: x += (s' - s) (x - D) / s."""
    for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        d = (x - denoise(x, x.new_full((x.shape[0],), s))) / s
        x = x + (s_next - s) * d
    return x


def test_noise_is_each_familys_marginal_and_k_space_is_unchanged():
    x0, z = data(3, 1), data(3, 2)
    torch.testing.assert_close(fam.noise(fam.FLOW, x0, z, 0.3), 0.7 * x0 + 0.3 * z)
    torch.testing.assert_close(fam.noise(fam.FLOW_DISTILLED, x0, z, 0.3), 0.7 * x0 + 0.3 * z)
    torch.testing.assert_close(fam.noise(fam.K_SPACE, x0, z, 2.5), x0 + 2.5 * z)
    torch.testing.assert_close(perturb(x0, 2.5, z), x0 + 2.5 * z)  # the default family is still k-space
    rows = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    out = fam.noise(fam.FLOW, x0, z, rows)
    for r in range(3):
        s = float(rows[r])
        torch.testing.assert_close(out[r], (1 - s) * x0[r] + s * z[r])
    with pytest.raises(EditLabError, match="does not match"):
        fam.noise(fam.FLOW, x0, z[:2], 0.3)


def test_conversions_between_denoised_velocity_and_noise():
    x0, z = data(2, 3), data(2, 4)
    s = 0.4
    x = fam.noise(fam.FLOW, x0, z, s)
    v = fam.velocity_from_denoised(x, x0, s)
    torch.testing.assert_close(v, z - x0)  # the flow velocity
    torch.testing.assert_close(fam.denoised_from_derivative(x, v, s), x0)
    torch.testing.assert_close(fam.noise_from_denoised(fam.FLOW, x, x0, s), z)
    xk = fam.noise(fam.K_SPACE, x0, z, 3.0)
    torch.testing.assert_close(fam.derivative(xk, x0, 3.0), z)  # eps on k-space
    torch.testing.assert_close(fam.noise_from_denoised(fam.K_SPACE, xk, x0, 3.0), z)
    # x / (1 - s) is a k-space latent at s / (1 - s) (ComfyUI's CONST.inverse_noise_scaling)
    torch.testing.assert_close(fam.to_k_space(fam.FLOW, x, s), x0 + fam.k_sigma(fam.FLOW, s) * z)
    torch.testing.assert_close(fam.from_k_space(fam.FLOW, fam.to_k_space(fam.FLOW, x, s), s), x)
    assert fam.k_sigma(fam.FLOW, 1.0) == math.inf and fam.k_sigma(fam.K_SPACE, 4.0) == 4.0


def test_the_flow_ode_step_is_exact_for_a_point_mass():
    x0, z = data(2, 5), data(2, 6)
    x = fam.noise(fam.FLOW, x0, z, 1.0)
    for s, s_next in ((1.0, 0.6), (0.6, 0.25), (0.25, 0.0)):
        x = fam.ode_step(x, fam.derivative(x, x0, s), s, s_next)
        torch.testing.assert_close(x, fam.noise(fam.FLOW, x0, z, s_next))  # stays on the straight line


def test_sdedit_marginal_on_gaussian_data_is_one_minus_s_x_plus_s_z():
    x0 = data(20000, 7)
    draw = seeded_noise(3)
    for s in (0.3, 0.8, 1.0):
        z = draw(x0)
        x = perturb(x0, s, z, fam.FLOW)
        torch.testing.assert_close(x, (1 - s) * x0 + s * z)
        mean, var = (1 - s) * MU, (1 - s) ** 2 * VAR + s * s
        assert abs(float(x.mean()) - mean) < 0.02
        assert abs(float(x.var()) / var - 1) < 0.03


def test_the_posterior_step_keeps_the_flow_marginal_exactly_for_a_point_mass():
    x0 = torch.full((1, 1, 2, 2), 0.9, dtype=torch.float64)
    one, zero = torch.ones_like(x0), torch.zeros_like(x0)
    for s, s_next in ((1.0, 0.7), (0.7, 0.3), (0.3, 0.05), (0.9, 0.89)):
        # the step is affine in (e, z) for x = (1 - s) x0 + s e: read the two coefficients off
        base = fam.posterior_step(fam.FLOW, fam.noise(fam.FLOW, x0, zero, s), x0, s, s_next, zero)
        c_e = fam.posterior_step(fam.FLOW, fam.noise(fam.FLOW, x0, one, s), x0, s, s_next, zero) - base
        c_z = fam.posterior_step(fam.FLOW, fam.noise(fam.FLOW, x0, zero, s), x0, s, s_next, one) - base
        torch.testing.assert_close(base, (1 - s_next) * x0)  # mean (1 - s') x0
        torch.testing.assert_close(c_e ** 2 + c_z ** 2, torch.full_like(x0, s_next ** 2))  # variance s'^2
    assert torch.equal(fam.posterior_step(fam.FLOW, one, x0, 0.5, 0.0, one), x0)  # the last step lands on D


def test_flow_reverse_sde_on_gaussian_data_recovers_the_data_distribution():
    """SDEdit from (1 - s0) x0 + s0 z on N(mu, v) data: the output is N(mu, v), to first order in the step."""
    x0 = data(8000, 8)
    x = perturb(x0, 0.9, seeded_noise(1)(x0), fam.FLOW)
    var_error = {}
    for n in (20, 320):
        sigmas = torch.linspace(0.9, 0.0, n + 1, dtype=torch.float64)
        out = sample_reverse_sde(flow_gauss, x, sigmas, disable=True, noise_source=seeded_noise(2), family=fam.FLOW)
        assert abs(float(out.mean()) - MU) < 0.02
        var_error[n] = abs(float(out.var()) / VAR - 1)
    assert var_error[320] < var_error[20] / 4 and var_error[320] < 0.04, var_error
    sigmas = torch.linspace(0.9, 0.0, 11, dtype=torch.float64)
    det = sample_reverse_sde(flow_gauss, x, sigmas, disable=True, mode="deterministic", family=fam.FLOW)
    torch.testing.assert_close(det, euler_sample(flow_gauss, x, sigmas))  # deterministic = the flow ODE's Euler
    a = sample_reverse_sde(flow_gauss, x, sigmas, disable=True, noise_source=seeded_noise(2), family=fam.FLOW)
    two = sample_reverse_sde(flow_gauss, x, sigmas, disable=True, noise_source=seeded_noise(2), family=fam.FLOW,
                             repeat=2)
    assert torch.isfinite(two).all() and not torch.allclose(two, a)


def test_k_space_reverse_sde_is_unchanged_by_the_family_argument():
    x0 = data(8, 9)
    sigmas = torch.tensor([5.0, 2.0, 0.5, 0.0], dtype=torch.float64)
    x = perturb(x0, 5.0, seeded_noise(0)(x0))
    a = sample_reverse_sde(k_gauss, x, sigmas, disable=True, noise_source=seeded_noise(4))
    b = sample_reverse_sde(k_gauss, x, sigmas, disable=True, noise_source=seeded_noise(4), family=fam.K_SPACE)
    assert torch.equal(a, b)


def _round_trip_error(steps: int) -> float:
    x0 = data(64, 10)
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    traj = ddim_invert(flow_gauss, x0, sigmas, family=fam.FLOW)
    back = euler_sample(flow_gauss, traj[0].to(x0), sigmas)
    return float((back - x0).abs().max())


def test_flow_inversion_round_trip_error_shrinks_first_order_with_steps():
    errors = [_round_trip_error(n) for n in (8, 32, 128)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 10  # 16x the steps: first order gives ~16x smaller
    assert errors[2] < 0.03


def test_flow_inversion_reaches_the_noise_distribution_for_gaussian_data():
    x0 = data(4000, 11)
    sigmas = torch.linspace(1.0, 0.0, 129, dtype=torch.float64)
    x_t = ddim_invert(flow_gauss, x0, sigmas, family=fam.FLOW)[0]
    # the exact flow map of N(mu, v) at s = 1 is z = (x0 - mu) / sqrt(v): standard normal
    assert abs(float(x_t.mean())) < 0.03 and abs(float(x_t.var()) - 1) < 0.06
    torch.testing.assert_close(x_t.to(x0), (x0 - MU) / math.sqrt(VAR), rtol=0, atol=0.03)


def test_input_scaling_and_loss_latent_per_family():
    assert fam.inversion_input_scale(fam.FLOW, "reference", 0.2, 0.4) == 1.0
    assert fam.inversion_input_scale(fam.K_SPACE, "reference", 1.0, 2.0) == pytest.approx(math.sqrt(5 / 2))
    assert fam.inversion_input_scale(fam.K_SPACE, "k-space", 1.0, 2.0) == 1.0
    with pytest.raises(EditLabError, match="input_scaling 'k-space' is the eps-model"):
        fam.inversion_input_scale(fam.FLOW, "k-space", 0.2, 0.4)
    x = torch.ones(1, 1, 1, 1)
    torch.testing.assert_close(fam.loss_latent(fam.K_SPACE, x, 2.0), x / math.sqrt(5.0))
    assert torch.equal(fam.loss_latent(fam.FLOW, x, 0.5), x)
    assert fam.cap_start(fam.FLOW, 1.0) == fam.FLOW_SIGMA_CAP < 1.0 and fam.cap_start(fam.K_SPACE, 14.6) == 14.6
    assert fam.flow_sigma(0.5, 3.0) == pytest.approx(0.75) and fam.flow_sigma(0.3) == pytest.approx(0.3)


@pytest.mark.parametrize("known_noise", ["same", "fresh"])
def test_known_region_is_renoised_on_the_flow_marginal_and_finished_exactly(known_noise):
    guide, z = data(1, 12), data(1, 13)
    mask = torch.zeros_like(guide)
    mask[..., :2] = 1.0  # regenerate the left half, keep the right
    known = KnownRegion(guide=guide, mask=mask, noise=z if known_noise == "same" else None, known_noise=known_noise,
                        family=fam.FLOW)
    seen = []

    def model(x, sigma):
        seen.append((float(sigma[0]), x.clone()))
        return flow_gauss(x, sigma)

    sigmas = torch.tensor([0.8, 0.5, 0.2, 0.0], dtype=torch.float64)
    x = fam.noise(fam.FLOW, guide, z, 0.8)
    wrapped = with_known_region(model, known, seeded_noise(5))
    out = known.finish(euler_sample(wrapped, x, sigmas))
    keep = mask == 0
    assert torch.equal(out[keep], guide[keep])
    for s, x_in in seen:
        region = x_in[keep]
        if known_noise == "same":
            torch.testing.assert_close(region, ((1 - s) * guide + s * z)[keep])
        else:
            assert not torch.allclose(region, ((1 - s) * guide + s * z)[keep])
            assert not torch.allclose(region, (guide + s * z)[keep])


def test_null_text_refuses_a_guidance_distilled_family():
    traj = torch.zeros(3, 1, 1, 2, 2)
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    with pytest.raises(EditLabError, match="no unconditional branch|has none"):
        optimize_null_text(lambda z, s: z, lambda z, s, e: z, traj, sigmas, torch.zeros(1, 2, 4),
                           NullTextConfig(), family=fam.FLOW_DISTILLED)
