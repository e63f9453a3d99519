"""FlowEdit and RF-Inversion on a Gaussian data distribution under the flow parametrisation
(docs/methods.md §11): ``x = (1 - t) x0 + t z`` with ``x0 ~ N(mu, s^2)`` per dimension.

For Gaussian data everything is known in closed form: the exact velocity ``E[z - x0 | x_t]`` and the exact
ODE map ``x(t) = (1 - t) mu + sqrt((1 - t)^2 s^2 + t^2) (x0 - mu) / s`` (it keeps the standardised
coordinate), so expected values come from these formulas, never from the code under test.
"""
from __future__ import annotations

import pytest
import torch

from editlab.errors import EditLabError
from editlab.samplers.flowedit import PRESETS, check_settings, flowedit
from editlab.samplers.rf_inversion import (
    VELOCITY_FLOOR,
    controlled_denoised,
    controlled_forward,
    controlled_reverse,
    eta_at,
)

def gaussian_velocity(mu: torch.Tensor, s: torch.Tensor):
    """The exact flow velocity ``E[z | x_t] - E[x0 | x_t]`` of ``x0 ~ N(mu, s^2)``."""

    def v(x: torch.Tensor, t: float) -> torch.Tensor:
        var = (1 - t) ** 2 * s**2 + t**2
        r = x - (1 - t) * mu
        return t * r / var - mu - (1 - t) * s**2 * r / var

    return v


def exact_map(x0, mu, s, t):
    return (1 - t) * mu + ((1 - t) ** 2 * s**2 + t**2) ** 0.5 * (x0 - mu) / s


def linear_sigmas(steps: int, top: float = 1.0) -> torch.Tensor:
    return torch.linspace(top, 0.0, steps + 1, dtype=torch.float64)


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    shape, f64 = (2, 4, 3, 3), torch.float64
    mu = torch.randn(shape, generator=g, dtype=f64)
    s = 0.3 + torch.rand(shape, generator=g, dtype=f64)
    x0 = mu + s * torch.randn(shape, generator=g, dtype=f64)
    return mu, s, x0


def seeded_noise(like: torch.Tensor, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(like.shape, generator=g, dtype=like.dtype)


# -- FlowEdit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_max,n_avg", [(1, 1), (7, 1), (12, 3), (50, 2)])
def test_flowedit_zero_edit_returns_the_source_exactly(data, n_max, n_avg):
    mu, s, x_src = data
    v = gaussian_velocity(mu, s)
    calls = []

    def pair(z_src, z_tar, t):
        calls.append(t)
        return v(z_src, t), v(z_tar, t)

    out = flowedit(pair, v, x_src, linear_sigmas(12), n_max=n_max, n_avg=n_avg, noise=seeded_noise(x_src))
    assert torch.equal(out, x_src)
    assert len(calls) == min(n_max, 12) * n_avg  # the steps were walked, not skipped


def test_flowedit_moves_the_source_by_the_difference_of_the_means(data):
    """Equal-variance Gaussians: source and target ODEs from one noise stay ``(1 - t) (mu_t - mu_s)`` apart
    (the exact map), the velocity difference is affine in ``z - x_src`` and vanishes on that line, so
    FlowEdit lands on ``x_src + (mu_t - mu_s)`` for any step count and any noise draw."""
    mu, s, x_src = data
    shift = 0.7 * torch.randn(mu.shape, generator=torch.Generator().manual_seed(5), dtype=mu.dtype)
    v_src, v_tar = gaussian_velocity(mu, s), gaussian_velocity(mu + shift, s)

    def pair(z_src, z_tar, t):
        return v_src(z_src, t), v_tar(z_tar, t)

    for steps, seed in ((5, 1), (13, 2), (40, 3)):
        out = flowedit(pair, v_tar, x_src, linear_sigmas(steps), n_max=steps, noise=seeded_noise(x_src, seed))
        torch.testing.assert_close(out, x_src + shift, rtol=0, atol=1e-9)
    # n_max < steps starts from the source at a lower level: the shift is only partly applied
    part = flowedit(pair, v_tar, x_src, linear_sigmas(10), n_max=5, noise=seeded_noise(x_src))
    along = float(((part - x_src) * shift).sum() / (shift * shift).sum())
    assert 0.05 < along < 0.95


def test_flowedit_n_max_is_the_number_of_edited_steps(data):
    """Only the last n_max steps are evaluated, from their own levels (the authors' loop)."""
    mu, s, x_src = data
    v = gaussian_velocity(mu, s)
    seen = []

    def pair(z_src, z_tar, t):
        seen.append(t)
        return v(z_src, t), v(z_src, t) + 1.0  # a constant difference of 1

    sigmas = linear_sigmas(10)
    out = flowedit(pair, v, x_src, sigmas, n_max=4, noise=seeded_noise(x_src))
    assert seen == [float(x) for x in sigmas[6:10]]
    # a constant velocity difference of 1 integrates to -(sigma at step 6) over the walked steps
    torch.testing.assert_close(out, x_src - float(sigmas[6]))


def test_flowedit_n_min_tail_is_plain_target_sampling(data):
    mu, s, x_src = data
    v = gaussian_velocity(mu, s)
    target_calls = []

    def target(x, t):
        target_calls.append(t)
        return v(x, t)

    out = flowedit(lambda a, b, t: (v(a, t), v(b, t)), target, x_src, linear_sigmas(10), n_max=6, n_min=2,
                   noise=seeded_noise(x_src))
    assert len(target_calls) == 2
    assert not torch.equal(out, x_src)  # the tail re-noises and samples: an SDEdit of the target


@pytest.mark.parametrize("n_max,n_min,n_avg", [(0, 0, 1), (5, 5, 1), (5, -1, 1), (5, 0, 0), (50, 10, 1)])
def test_flowedit_bad_settings_are_refused(n_max, n_min, n_avg):
    with pytest.raises(EditLabError):
        check_settings(10, n_max, n_min, n_avg)


def test_flowedit_published_presets():
    """fallenshock/FlowEdit SD3_exp.yaml and FLUX_exp.yaml."""
    sd3, flux = PRESETS["SD3"], PRESETS["FLUX"]
    assert (sd3.steps, sd3.n_max, sd3.n_min, sd3.n_avg, sd3.source_scale, sd3.target_scale) == (50, 33, 0, 1, 3.5, 13.5)
    assert (flux.steps, flux.n_max, flux.n_min, flux.n_avg, flux.source_scale, flux.target_scale) == (28, 24, 0, 1, 1.5, 5.5)


# -- RF-Inversion -------------------------------------------------------------------------------------

def plain_euler_inversion(v, x0, sigmas):
    levels = [float(t) for t in sigmas.flip(0)]
    x = x0.clone()
    for a, b in zip(levels[:-1], levels[1:]):
        x = x + (b - a) * v(x, max(a, VELOCITY_FLOOR))
    return x


def plain_euler_sampling(v, x, sigmas):
    levels = [float(t) for t in sigmas]
    for a, b in zip(levels[:-1], levels[1:]):
        x = x + (b - a) * v(x, a)
    return x


def test_rf_gamma_zero_is_plain_ode_inversion(data):
    mu, s, x0 = data
    v = gaussian_velocity(mu, s)
    sigmas = linear_sigmas(20)
    traj = controlled_forward(v, x0, sigmas, 0.0, torch.randn_like(x0))
    torch.testing.assert_close(traj[0], plain_euler_inversion(v, x0, sigmas).float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(traj[-1], x0.float())
    assert traj.shape[0] == len(sigmas)


def test_rf_gamma_zero_inversion_converges_to_the_exact_ode_map(data):
    mu, s, x0 = data
    v = gaussian_velocity(mu, s)
    exact = exact_map(x0, mu, s, 1.0)
    errors = [float((controlled_forward(v, x0, linear_sigmas(n), 0.0, torch.zeros_like(x0))[0] - exact).abs().max())
              for n in (10, 40, 160)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.05


def test_rf_gamma_one_goes_straight_to_the_noise_sample(data):
    mu, s, x0 = data
    y1 = torch.randn_like(x0)
    sigmas = linear_sigmas(8, top=0.99)
    traj = controlled_forward(gaussian_velocity(mu, s), x0, sigmas, 1.0, y1)
    for k, t in enumerate(sigmas):
        torch.testing.assert_close(traj[k], ((1 - t) * x0 + t * y1).float(), rtol=1e-5, atol=1e-5)


def test_rf_gamma_pulls_the_inversion_toward_the_noise_sample(data):
    mu, s, x0 = data
    v, y1, sigmas = gaussian_velocity(mu, s), torch.randn_like(x0), linear_sigmas(20)
    dist = [float((controlled_forward(v, x0, sigmas, g, y1)[0] - y1).norm()) for g in (0.0, 0.5, 0.9)]
    assert dist[0] > dist[1] > dist[2]


def test_rf_eta_zero_is_plain_sampling(data):
    mu, s, x0 = data
    v = gaussian_velocity(mu, s)
    x1 = torch.randn_like(x0)
    sigmas = linear_sigmas(20)
    out = controlled_reverse(v, x1, x0, sigmas, eta=0.0, start=0, stop=20)
    torch.testing.assert_close(out, plain_euler_sampling(v, x1, sigmas), rtol=1e-6, atol=1e-6)


def test_rf_eta_one_on_every_step_returns_the_source(data):
    mu, s, x0 = data
    out = controlled_reverse(gaussian_velocity(mu, s), torch.randn_like(x0), x0, linear_sigmas(10), 1.0, 0, 10)
    torch.testing.assert_close(out, x0, rtol=1e-9, atol=1e-9)


def test_rf_eta_window_only_acts_on_its_steps(data):
    mu, s, x0 = data
    v, x1, sigmas = gaussian_velocity(mu, s), torch.randn_like(x0), linear_sigmas(10)
    assert [eta_at(i, 0.9, 2, 5) for i in range(7)] == [0.0, 0.0, 0.9, 0.9, 0.9, 0.0, 0.0]
    plain = controlled_reverse(v, x1, x0, sigmas, 0.0, 0, 0)
    windowed = controlled_reverse(v, x1, x0, sigmas, 0.9, 0, 3)
    assert float((windowed - x0).norm()) < float((plain - x0).norm())


def test_rf_round_trip_error_shrinks_with_steps(data):
    mu, s, x0 = data
    v = gaussian_velocity(mu, s)
    errors = []
    for n in (10, 40, 160):
        sigmas = linear_sigmas(n)
        x1 = controlled_forward(v, x0, sigmas, 0.0, torch.zeros_like(x0))[0].double()
        errors.append(float((controlled_reverse(v, x1, x0, sigmas, 0.0, 0, 0) - x0).abs().max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.3 * errors[1]  # first order: about 4x smaller per 4x steps


def test_rf_controlled_denoised_is_the_controlled_velocity(data):
    """(1 - eta) D + eta y0 gives the Euler step of (1 - eta) u + eta (x - y0) / sigma (Algorithm 2)."""
    mu, s, y0 = data
    x = torch.randn_like(y0)
    u = gaussian_velocity(mu, s)(x, 0.6)
    d_hat = controlled_denoised(x - 0.6 * u, y0, 0.3)
    step_from_d = x + (0.4 - 0.6) * (x - d_hat) / 0.6
    step_from_v = x + (0.4 - 0.6) * (0.7 * u + 0.3 * (x - y0) / 0.6)
    torch.testing.assert_close(step_from_d, step_from_v)


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_rf_gamma_out_of_range_is_refused(data, gamma):
    mu, s, x0 = data
    with pytest.raises(EditLabError, match="gamma"):
        controlled_forward(gaussian_velocity(mu, s), x0, linear_sigmas(4), gamma, x0)
