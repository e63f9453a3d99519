"""SDEdit sampler properties against analytic denoisers (docs/methods.md §1-2)."""
from __future__ import annotations

import math

import pytest
import torch

from editlab.errors import EditLabError
from editlab.samplers.sdedit import (
    KnownRegion,
    check_t0,
    latent_distance,
    perturb,
    sample_reverse_sde,
    search_t0,
    seeded_noise,
    tail_schedule,
    with_known_region,
)


def geometric(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    s = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n))
    return torch.cat([s, torch.zeros(1)])


def point_mass(x_star: torch.Tensor):
    """Exact denoiser when the data is a single point: D(x, sigma) = x_star."""
    return lambda x, sigma, **kw: x_star.expand_as(x).clone()


def gaussian(mu: float, s: float):
    """Exact denoiser for x0 ~ N(mu, s^2) per dimension: D = mu + s^2 / (s^2 + sigma^2) (x - mu)."""
    def denoise(x, sigma, **kw):
        sig = sigma.reshape([-1] + [1] * (x.ndim - 1))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)
    return denoise


def states(model, x, sigmas, **kw):
    """Run the sampler and return its output and the state x it held at each evaluation (callback)."""
    seen = []
    out = sample_reverse_sde(model, x, sigmas, callback=lambda d: seen.append(d["x"].clone()), disable=True, **kw)
    return out, seen


def test_point_mass_probability_flow_follows_the_exact_ode_before_the_last_step():
    """Point mass x*: the probability-flow ODE is x(sigma) - x* = (sigma / sigma0) (x(sigma0) - x*).

    The last step returns D = x* whatever the drift, so the property is checked on the state at
    sigma_{n-1}: half the drift lands there (Euler error only), a full or missing drift is far off.
    """
    x_star = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_star + 14.6 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = geometric(14.6, 0.03, 400)
    out, seen = states(point_mass(x_star), x, sigmas, mode="deterministic")
    ratio = ((seen[-1] - x_star) / (x - x_star)).flatten()
    exact = float(sigmas[-2] / sigmas[0])
    assert ratio.std().item() < 1e-2 * exact  # the same contraction everywhere (float32): no noise was added
    assert ratio.mean().item() == pytest.approx(exact, rel=0.1)
    assert torch.equal(out, x_star.expand_as(out))


def test_point_mass_reverse_sde_state_has_the_exact_marginal_before_the_last_step():
    """Point mass x*: the reverse SDE keeps the marginal x(sigma) ~ N(x*, sigma^2) all the way down.

    Checked at sigma_{n-1} (Euler–Maruyama keeps the standard deviation within a factor 1 / r of it,
    r the per-step ratio); without noise, or with the half drift, it is off by more than 3x.
    """
    x_star = torch.tensor(0.8)
    sigmas = geometric(14.6, 0.03, 400)
    x = x_star + 14.6 * torch.randn(20_000, 1, 1, 1, generator=torch.Generator().manual_seed(2))
    out, seen = states(point_mass(x_star), x, sigmas, noise_source=seeded_noise(4))
    z = (seen[-1] - x_star) / float(sigmas[-2])
    assert z.mean().item() == pytest.approx(0.0, abs=0.03)
    assert z.std().item() == pytest.approx(1.0, rel=0.05)
    assert torch.equal(out, x_star.expand_as(out))


def test_perturbed_marginal_has_the_right_variance():
    g = torch.Generator().manual_seed(0)
    mu, s, sigma0 = 0.7, 0.5, 2.0
    x0 = mu + s * torch.randn(200_000, generator=g)
    x = perturb(x0, sigma0, torch.randn(200_000, generator=g))
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.var().item() == pytest.approx(s**2 + sigma0**2, rel=0.02)


@pytest.mark.parametrize("deterministic", [False, True])
def test_reverse_sampler_recovers_gaussian_data(deterministic):
    """Started from the perturbed marginal N(mu, s^2 + sigma0^2), the sampler must end at N(mu, s^2)."""
    g = torch.Generator().manual_seed(3)
    mu, s, sigma0 = -0.4, 0.6, 5.0
    n = 100_000
    x = mu + math.sqrt(s**2 + sigma0**2) * torch.randn(n, 1, 1, 1, generator=g)
    out = sample_reverse_sde(gaussian(mu, s), x, geometric(sigma0, 0.002, 400),
                             mode="deterministic" if deterministic else "stochastic", noise_source=seeded_noise(5))
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(s, rel=0.03)


def test_full_drift_without_noise_would_collapse_the_spread():
    """The half drift of the deterministic variant matters: full drift with no noise over-shrinks."""
    g = torch.Generator().manual_seed(3)
    mu, s, sigma0 = 0.0, 0.6, 5.0
    x = math.sqrt(s**2 + sigma0**2) * torch.randn(50_000, 1, 1, 1, generator=g)
    sigmas = geometric(sigma0, 0.002, 400)
    zero_noise = lambda like: torch.zeros_like(like)  # noqa: E731
    collapsed = sample_reverse_sde(gaussian(mu, s), x, sigmas, noise_source=zero_noise)
    assert collapsed.std().item() < 0.5 * s


def test_faithfulness_is_monotone_in_t0_for_a_fixed_seed():
    guide = torch.full((1, 4, 32, 32), 2.5)  # off the data distribution N(0, 1)
    dists = []
    for sigma0 in [0.2, 0.5, 1.0, 2.0, 4.0, 8.0]:
        x = perturb(guide, sigma0, torch.randn(guide.shape, generator=torch.Generator().manual_seed(11)))
        out = sample_reverse_sde(gaussian(0.0, 1.0), x, geometric(sigma0, 0.01, 30), noise_source=seeded_noise(11))
        dists.append(latent_distance(out, guide).item())
    assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_repeat_runs_k_rounds_and_still_lands_on_the_point():
    x_star = torch.randn(1, 4, 4, 4)
    calls = []

    def counting(x, sigma, **kw):
        calls.append(float(sigma[0]))
        return x_star.expand_as(x).clone()

    sigmas = geometric(3.0, 0.1, 5)
    out = sample_reverse_sde(counting, torch.randn(1, 4, 4, 4), sigmas, repeat=3, noise_source=seeded_noise(0))
    assert len(calls) == 3 * (len(sigmas) - 1)
    assert calls[0] == calls[len(sigmas) - 1] == pytest.approx(3.0)  # each round restarts at sigma(t0)
    assert torch.equal(out, x_star)


def test_repeat_counts_progress_and_previews_over_all_rounds(capsys):
    """One progress bar of rounds x steps, and the callback's i counts on across rounds."""
    x_star = torch.zeros(1, 4, 4, 4)
    sigmas = geometric(3.0, 0.1, 5)  # 5 steps
    seen = []
    sample_reverse_sde(point_mass(x_star), torch.randn(1, 4, 4, 4), sigmas, repeat=3, noise_source=seeded_noise(0),
                       callback=lambda d: seen.append(d["i"]), disable=False)
    assert seen == list(range(15))
    assert "15/15" in capsys.readouterr().err


def test_disable_hides_the_progress_bar(capsys):
    x_star = torch.zeros(1, 4, 4, 4)
    for disable in (True, False):
        sample_reverse_sde(point_mass(x_star), torch.randn(1, 4, 4, 4), geometric(3.0, 0.1, 5), disable=disable,
                           noise_source=seeded_noise(0))
        err = capsys.readouterr().err
        assert ("5/5" in err) is (not disable), err


def test_unknown_modes_are_refused_not_read_as_a_default():
    model, x, sigmas = point_mass(torch.zeros(1, 4, 2, 2)), torch.zeros(1, 4, 2, 2), torch.tensor([1.0, 0.0])
    for bad in ("Deterministic", "ode", "", None):
        with pytest.raises(EditLabError, match=r"mode must be one of \['stochastic', 'deterministic'\]"):
            sample_reverse_sde(model, x, sigmas, mode=bad)
    guide = torch.zeros(1, 4, 2, 2)
    with pytest.raises(EditLabError, match="known_noise must be one of"):
        KnownRegion(guide=guide, mask=guide[:, :1], noise=guide, known_noise="Same")
    with pytest.raises(EditLabError, match="replace_on must be one of"):
        KnownRegion(guide=guide, mask=guide[:, :1], noise=guide, replace_on="xt")


def _known_region(mode: str, replace_on: str, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(7)
    guide = torch.randn(shape, generator=g)
    mask = torch.zeros(shape[0], 1, *shape[2:])
    mask[..., 2:6, 2:6] = 1.0
    fixed = torch.randn(shape, generator=g)
    return KnownRegion(guide=guide, mask=mask, noise=fixed if mode == "same" else None, known_noise=mode,
                       replace_on=replace_on)


@pytest.mark.parametrize("mode", ["same", "fresh"])
@pytest.mark.parametrize("replace_on", ["x_t", "x0", "both"])
def test_known_region_follows_the_noised_guide_at_every_step_before_the_final_paste(mode, replace_on):
    """Checked on what the denoiser sees and returns at each step, not after ``finish`` (which pastes the
    guide by construction): on x_t the known region is guide + sigma_i z (z = the fixed draw or a fresh
    unit normal), on x0 the prediction's known region is the guide."""
    known = _known_region(mode, replace_on)
    keep = known.mask.expand_as(known.guide) == 0
    sigmas = geometric(6.0, 0.05, 12)
    x = known.guide + sigmas[0] * torch.randn(known.guide.shape, generator=torch.Generator().manual_seed(5))
    inputs, predictions = [], []

    def spy(x_in, sigma, **kw):
        inputs.append((float(sigma[0]), x_in.clone()))
        return gaussian(0.0, 1.0)(x_in, sigma)

    out = sample_reverse_sde(with_known_region(spy, known, seeded_noise(1)), x, sigmas, noise_source=seeded_noise(2),
                             callback=lambda d: predictions.append(d["denoised"].clone()), disable=True)
    assert len(inputs) == len(predictions) == len(sigmas) - 1
    implied = [((x_in - known.guide) / sigma)[keep] for sigma, x_in in inputs]
    if replace_on in ("x_t", "both"):
        for z in implied:
            assert z.mean().abs().item() < 0.25 and z.std().item() == pytest.approx(1.0, rel=0.2)
            if mode == "same":
                torch.testing.assert_close(z, known.noise[keep], rtol=0, atol=1e-4)
        if mode == "fresh":
            assert not torch.allclose(implied[0], implied[1], atol=1e-2)
    if replace_on in ("x0", "both"):
        for d in predictions:
            assert torch.equal(d[keep], known.guide[keep])
        assert torch.equal(out[keep], known.guide[keep])  # the last step lands on the pasted x0: already exact
    else:
        # x_t only: the last input is the guide noised to sigma_{n-1}; finish() removes that last bit.
        assert not torch.equal(out[keep], known.guide[keep])
        done = known.finish(out)
        assert torch.equal(done[keep], known.guide[keep])
    # ... and the masked region was actually regenerated.
    assert not torch.allclose(known.finish(out)[~keep], known.guide[~keep])


def test_same_noise_renoises_the_known_region_with_the_fixed_draw_and_fresh_does_not():
    seen = {}

    def spy(x, sigma, **kw):
        seen.setdefault("inputs", []).append((float(sigma[0]), x.clone()))
        return torch.zeros_like(x)

    sigmas = geometric(4.0, 0.5, 3)
    for mode in ("same", "fresh"):
        seen.clear()
        known = _known_region(mode, "x_t")
        sample_reverse_sde(with_known_region(spy, known, seeded_noise(9)), torch.zeros_like(known.guide), sigmas,
                           noise_source=seeded_noise(3))
        keep = known.mask.expand_as(known.guide) == 0
        implied = [((x_in - known.guide) / sigma)[keep] for sigma, x_in in seen["inputs"]]
        assert len(implied) == len(sigmas) - 1
        for z in implied:
            assert z.std().item() == pytest.approx(1.0, rel=0.2)  # a unit normal draw, at the right level
        if mode == "same":
            assert all(torch.allclose(z, known.noise[keep], atol=1e-5) for z in implied)
        else:
            assert not torch.allclose(implied[0], implied[1], atol=1e-2)


def test_x0_replacement_pastes_the_guide_into_the_prediction():
    known = _known_region("fresh", "x0")
    wrapped = with_known_region(lambda x, s, **k: torch.full_like(x, 9.0), known, seeded_noise(0))
    d = wrapped(torch.zeros_like(known.guide), torch.tensor([1.0, 1.0]))
    keep = known.mask.expand_as(d) == 0
    assert torch.equal(d[keep], known.guide[keep]) and torch.all(d[~keep] == 9.0)


def test_tail_schedule_starts_exactly_at_sigma0_and_ends_at_zero():
    full = geometric(14.6, 0.03, 39)
    tail = tail_schedule(full, 3.3, 20)
    assert tail[0].item() == pytest.approx(3.3)
    assert tail[-1].item() == 0.0
    assert len(tail) == 21
    assert torch.all(tail[1:] < tail[:-1])


@pytest.mark.parametrize("t0", [0.0, -0.1, 1.01, float("nan")])
def test_t0_outside_the_unit_interval_is_refused(t0):
    with pytest.raises(EditLabError, match="t0"):
        check_t0(t0)


def test_empty_or_bad_schedules_are_refused():
    model = point_mass(torch.zeros(1, 4, 2, 2))
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(EditLabError, match="empty"):
        sample_reverse_sde(model, x, torch.tensor([1.0]))
    with pytest.raises(EditLabError, match="non-increasing"):
        sample_reverse_sde(model, x, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(EditLabError, match="repeat"):
        sample_reverse_sde(model, x, torch.tensor([1.0, 0.0]), repeat=0)


def test_mask_latent_size_mismatch_is_refused():
    known = _known_region("same", "x_t", shape=(1, 4, 8, 8))
    with pytest.raises(EditLabError, match="mask shape"):
        KnownRegion(guide=known.guide, mask=torch.ones(1, 1, 5, 8), noise=known.noise).check(known.guide)
    with pytest.raises(EditLabError, match="guide latent shape"):
        known.check(torch.zeros(1, 4, 16, 16))
    with pytest.raises(EditLabError, match="fixed noise"):
        KnownRegion(guide=known.guide, mask=known.mask, noise=None, known_noise="same")


def test_t0_search_finds_the_largest_feasible_t0_within_budget():
    runs = []

    def run(t0):
        runs.append(t0)
        return f"result@{t0}", t0**2  # monotone distance

    found = search_t0(run, budget=0.25, lo=0.05, hi=1.0, max_runs=8)
    assert len(runs) <= 8
    assert found.distance <= 0.25
    assert 0.5 - (0.95 / 2**6) <= found.t0 <= 0.5
    assert found.result == f"result@{found.t0}"


def test_t0_search_edges():
    assert search_t0(lambda t: (t, 0.0), budget=1.0).t0 == 1.0  # everything feasible: one run, t0 = hi
    infeasible = search_t0(lambda t: (t, 10.0), budget=1.0, lo=0.1)
    assert infeasible.t0 == 0.1 and infeasible.distance > 1.0  # flagged by its distance
    with pytest.raises(EditLabError, match="budget"):
        search_t0(lambda t: (t, 0.0), budget=0.0)
