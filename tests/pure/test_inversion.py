"""DDIM inversion and null-text optimisation against analytic denoisers and a tiny network (docs/methods.md §3-4)."""
from __future__ import annotations

import math

import pytest
import torch

from editlab.errors import EditLabError
from editlab.samplers.inversion import (
    Inversion,
    ddim_invert,
    ddpm,
    euler_step,
    invert_step,
    landing_denoised,
    psnr,
)
from editlab.samplers.null_text import NullTextConfig, optimize_null_text, secant_step_factor

# SD1.x's training schedule (scaled-linear betas), to build realistic sigma levels.
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
ABAR = torch.cumprod(1.0 - BETAS, 0)
SIGMA_T = ((1 - ABAR) / ABAR).sqrt()


def ddim_sigmas(steps: int) -> torch.Tensor:
    ts = list(range(1, 1000, 1000 // steps))[::-1]  # 981 ... 1 for 50 steps (ddim_uniform)
    return torch.tensor([float(SIGMA_T[t]) for t in ts] + [0.0])


def point_mass(x_star):
    return lambda x, s: x_star.expand_as(x).clone()


def gaussian(mu: float, s: float):
    def denoise(x, sigma):
        sig = sigma.reshape([-1] + [1] * (x.ndim - 1))
        return mu + s**2 / (s**2 + sig**2) * (x - mu)
    return denoise


def replay(denoise, x_t, sigmas):
    x = x_t
    for i in range(len(sigmas) - 1):
        s = float(sigmas[i])
        x = euler_step(x, denoise(x, x.new_full((x.shape[0],), s)), s, float(sigmas[i + 1]))
    return x


def test_point_mass_round_trip_is_exact_in_k_space():
    x_star = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = ddim_sigmas(50)
    traj = ddim_invert(point_mass(x_star), x_star.clone(), sigmas, scaling="k-space")
    assert traj.shape == (51, 1, 4, 8, 8)
    assert torch.equal(traj[-1], x_star)  # stored in sampling order: the clean latent last
    assert torch.allclose(replay(point_mass(x_star), traj[0], sigmas), x_star, atol=1e-6)


def test_reference_step_is_mokadys_next_step_in_ddpm_space():
    """Our k-space step must equal the reference's DDPM-space next_step on the same network call."""
    g = torch.Generator().manual_seed(1)
    eps_net = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    t_lo, t_hi = 21, 41
    a_lo, a_hi = float(ABAR[t_lo]), float(ABAR[t_hi])
    s_lo, s_hi = float(SIGMA_T[t_lo]), float(SIGMA_T[t_hi])
    x_ddpm_lo = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    # Reference (Mokady et al., PnP-Inversion): eps = unet(latent_lo, t_hi); x0 = (x - sqrt(1-a_lo) eps)/sqrt(a_lo);
    # next = sqrt(a_hi) x0 + sqrt(1 - a_hi) eps.
    with torch.no_grad():
        eps = eps_net(x_ddpm_lo)
        x0 = (x_ddpm_lo - (1 - a_lo) ** 0.5 * eps) / a_lo**0.5
        ref_next = a_hi**0.5 * x0 + (1 - a_hi) ** 0.5 * eps

        # Ours, in k-space, with an eps-model wrapped as ComfyUI does: D = x - sigma * eps(x / sqrt(1 + sigma^2)).
        def denoise(x, sigma):
            s = float(sigma[0])
            return x - s * eps_net(x / math.sqrt(1 + s * s))

        x_lo = x_ddpm_lo * math.sqrt(1 + s_lo**2)
        ours = invert_step(denoise, x_lo, s_lo, s_hi, "reference")
    torch.testing.assert_close(ddpm(ours, s_hi), ref_next, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scaling", ["reference", "k-space"])
def test_reconstruction_error_decays_at_first_order_for_gaussian_data(scaling):
    g = torch.Generator().manual_seed(2)
    model = gaussian(0.3, 0.5)
    x0 = 0.3 + 0.5 * torch.randn(64, 1, 4, 4, generator=g)
    errors = []
    for steps in (20, 40, 80, 160, 320):
        sigmas = torch.cat([torch.exp(torch.linspace(math.log(14.6), math.log(0.03), steps)), torch.zeros(1)])
        traj = ddim_invert(model, x0, sigmas, scaling=scaling)
        errors.append(float((replay(model, traj[0], sigmas) - x0).abs().mean()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(r > 1.3 for r in ratios), (errors, ratios)  # always improving
    assert all(1.7 < r < 2.3 for r in ratios[-2:]), (errors, ratios)  # halving the step halves the error


def test_landing_prediction_makes_the_euler_step_hit_the_target():
    g = torch.Generator().manual_seed(3)
    x, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    for s, s_next in [(5.0, 3.0), (0.5, 0.0)]:
        d = landing_denoised(x, target, s, s_next)
        torch.testing.assert_close(euler_step(x, d, s, s_next), target)


class TinyUNet(torch.nn.Module):
    """A small differentiable eps-model with cross-attention-like text conditioning."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.proj = torch.nn.Linear(16, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def eps(self, x, sigma, emb):
        h = self.conv(x / math.sqrt(1 + sigma**2))
        return torch.tanh(h + self.proj(emb.mean(1))[:, :, None, None])


def _null_text_setup(steps=8):
    """A pivot trajectory that CFG at w = 1 retraces exactly (sampled with the source prompt)."""
    net = TinyUNet()
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    cond, empty = torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)
    sigmas = ddim_sigmas(steps)
    z = torch.randn(1, 4, 6, 6, generator=g) * float(sigmas[0])
    traj = [z]
    with torch.no_grad():
        for i in range(steps):
            s, s2 = float(sigmas[i]), float(sigmas[i + 1])
            z = z + (s2 - s) * net.eps(z, s, cond)
            traj.append(z)
    return net, cond, empty, torch.stack(traj), sigmas


def test_null_text_loss_falls_under_the_early_stop_threshold_and_reconstructs():
    net, cond, empty, traj, sigmas = _null_text_setup()
    config = NullTextConfig(guidance=7.5, inner_steps=200, lr=2e-2)
    nulls, stats = optimize_null_text(lambda z, s: net.eps(z, s, cond), lambda z, s, e: net.eps(z, s, e),
                                      traj, sigmas, empty, config)
    assert nulls.shape == (len(sigmas) - 1, 1, 3, 16)
    thresholds = [config.epsilon + i * config.epsilon_slope for i in range(len(sigmas) - 1)]
    assert all(l < t for l, t in zip(stats.losses, thresholds)), stats.losses
    # Replaying CFG 7.5 with the per-step nulls retraces the pivot; plain CFG with the empty prompt drifts.
    def replay_with(null_of):
        z = traj[0]
        for i in range(len(sigmas) - 1):
            s, s2 = float(sigmas[i]), float(sigmas[i + 1])
            e_u, e_c = net.eps(z, s, null_of(i)), net.eps(z, s, cond)
            z = z + (s2 - s) * (e_u + 7.5 * (e_c - e_u))
        return z
    tuned = psnr(replay_with(lambda i: nulls[i]), traj[-1])
    plain = psnr(replay_with(lambda i: empty), traj[-1])
    assert tuned > plain + 20, (tuned, plain)


def test_null_embedding_moves_only_when_it_must():
    net, cond, empty, traj, sigmas = _null_text_setup(steps=4)
    # Guidance 1: the unconditional branch has no effect, the pivot is already retraced, nothing to optimise.
    nulls, stats = optimize_null_text(lambda z, s: net.eps(z, s, cond), lambda z, s, e: net.eps(z, s, e),
                                      traj, sigmas, empty, NullTextConfig(guidance=1.0))
    assert stats.backwards == 0 and all(torch.equal(n, empty) for n in nulls)
    assert stats.forwards == 2 * (len(sigmas) - 1)  # one cond + one uncond forward per step, nothing more
    # Guidance 7.5: the embedding must move.
    nulls, stats = optimize_null_text(lambda z, s: net.eps(z, s, cond), lambda z, s, e: net.eps(z, s, e),
                                      traj, sigmas, empty, NullTextConfig(guidance=7.5, inner_steps=5))
    assert stats.backwards > 0 and not torch.equal(nulls[0], empty)


def test_null_text_cancel_is_honoured_at_an_inner_iteration():
    net, cond, empty, traj, sigmas = _null_text_setup(steps=4)
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        optimize_null_text(lambda z, s: net.eps(z, s, cond), lambda z, s, e: net.eps(z, s, e), traj, sigmas, empty,
                           NullTextConfig(guidance=7.5, inner_steps=10), check_cancel=cancel)


def _inversion(**kw):
    sigmas = ddim_sigmas(5)
    base = dict(sigmas=sigmas, trajectory=torch.randn(6, 1, 4, 8, 8), source_embedding=torch.randn(1, 77, 768),
                model_id="abc")
    base.update(kw)
    return Inversion(**base)


def test_inversion_round_trips_through_its_state_and_refuses_foreign_or_broken_data():
    inv = _inversion(null_embeddings=torch.randn(5, 1, 77, 768), meta={"source_prompt": "a cat"})
    tensors, meta = inv.to_state()
    back = Inversion.from_state(tensors, meta)
    assert torch.equal(back.trajectory, inv.trajectory) and torch.equal(back.null_embeddings, inv.null_embeddings)
    assert back.model_id == "abc" and back.meta == {"source_prompt": "a cat"}
    with pytest.raises(EditLabError, match="not an EditLab inversion"):
        Inversion.from_state(tensors, {"format": "something-else"})
    with pytest.raises(EditLabError, match="missing trajectory"):
        Inversion.from_state({k: v for k, v in tensors.items() if k != "trajectory"}, meta)
    bad = dict(tensors, trajectory=tensors["trajectory"].clone())
    bad["trajectory"][0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(EditLabError, match="NaN"):
        Inversion.from_state(bad, meta)
    with pytest.raises(EditLabError, match="null embeddings"):
        _inversion(null_embeddings=torch.randn(3, 1, 77, 768)).validate()


def test_schedule_checks():
    inv = _inversion()
    assert inv.check_schedule_matches(inv.sigmas) == 0
    assert inv.check_schedule_matches(inv.sigmas[2:]) == 2  # a tail of the schedule is fine
    with pytest.raises(EditLabError, match="does not match"):
        inv.check_schedule_matches(inv.sigmas * 1.1)
    with pytest.raises(EditLabError, match="not a level"):
        inv.step_index(0.123)
    assert inv.step_index(float(inv.sigmas[3])) == 3
    with pytest.raises(EditLabError, match="at least one step"):
        ddim_invert(point_mass(torch.zeros(1)), torch.zeros(1, 1, 1, 1), torch.tensor([0.0]))
    with pytest.raises(EditLabError, match="end at sigma 0"):
        ddim_invert(point_mass(torch.zeros(1)), torch.zeros(1, 1, 1, 1), torch.tensor([2.0, 1.0]))


def test_psnr():
    a = torch.zeros(1, 3, 4, 4)
    assert psnr(a, a) == float("inf")
    b = a.clone()
    b[..., 0, 0] = 1.0
    assert psnr(a, b, 1.0) == pytest.approx(10 * math.log10(48 / 3))


def _weak_text_model(scale: float):
    """An eps-model whose text path is weak: in fp16, its gradient w.r.t. the embedding is below fp16's range."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(16, 4, generator=g)
    cond, empty = torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)

    def eps(z, s, e, dtype):
        text = (e.to(dtype).mean(1) @ w.to(dtype)) * scale
        return torch.tanh(z.to(dtype) / math.sqrt(1 + s * s)) + text[:, :, None, None]

    sigmas = ddim_sigmas(5)
    z = torch.randn(1, 4, 6, 6, generator=g) * float(sigmas[0])
    traj = [z]
    for i in range(5):  # a pivot off the model by 0.1: a residual that fp16 resolves well, a gradient it cannot
        z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * (eps(z, float(sigmas[i]), cond, torch.float32) + 0.1)
        traj.append(z)
    return eps, cond, empty, torch.stack(traj), sigmas


def test_fp16_models_are_loss_scaled_so_the_null_still_learns(monkeypatch):
    from editlab.samplers import null_text
    eps, cond, empty, traj, sigmas = _weak_text_model(1e-7)
    config = NullTextConfig(guidance=7.5, inner_steps=3, lr=2e-2, epsilon=0.0, epsilon_slope=0.0)

    def run(dtype, fp32_out=False):
        """``fp32_out``: fp16 inside, fp32 returned - as ComfyUI's denoised prediction of an fp16 UNet."""
        cast = (lambda t: t.float()) if fp32_out else (lambda t: t)
        return optimize_null_text(lambda z, s: cast(eps(z, s, cond, dtype)), lambda z, s, e: cast(eps(z, s, e, dtype)),
                                  traj, sigmas, empty, config, half_precision=fp32_out)

    n32, s32 = run(torch.float32)
    n16, s16 = run(torch.float16)
    _, sbf = run(torch.bfloat16)
    n16_out32, s16_out32 = run(torch.float16, fp32_out=True)
    assert s32.loss_scale == 1.0 and sbf.loss_scale == 1.0  # fp32 / bf16: the plain fp32-gradient path
    assert s16.loss_scale > 1.0 and s16.skipped_updates == 0
    assert s16_out32.loss_scale > 1.0 and torch.equal(n16_out32, n16)  # the flag scales an fp32-returning model
    d32, d16 = (n32[0] - empty).flatten(), (n16[0] - empty).flatten()
    assert d16.abs().max() > 1e-3  # the null moved ...
    assert torch.nn.functional.cosine_similarity(d16, d32, dim=0) > 0.9  # ... the way the fp32 run moves it
    # Without the scale most of the fp16 gradient underflows to zero: those entries of the null never move.
    monkeypatch.setattr(null_text, "FP16_LOSS_SCALE", 1.0)
    n16_plain, _ = run(torch.float16)

    def frozen(n):
        return float((n[0] == empty).float().mean())

    assert frozen(n16) == 0.0 and frozen(n16_plain) > 0.5


def test_fp16_overflow_skips_the_update_and_lowers_the_scale():
    eps, cond, empty, traj, sigmas = _weak_text_model(1e3)  # strong text path: scaled fp16 gradients overflow
    config = NullTextConfig(guidance=7.5, inner_steps=3, lr=2e-2, epsilon=0.0, epsilon_slope=0.0)
    nulls, stats = optimize_null_text(lambda z, s: eps(z, s, cond, torch.float16),
                                      lambda z, s, e: eps(z, s, e, torch.float16), traj, sigmas, empty, config)
    assert stats.skipped_updates > 0 and stats.loss_scale < 2.0 ** 16
    assert torch.isfinite(nulls).all()


# -- the secant correction (EditLab's faster null-text optimiser) -------------------------------------

def test_secant_factor_is_the_exact_line_minimum_for_an_affine_residual():
    g = torch.Generator().manual_seed(11)
    A, r0, u = torch.randn(30, 5, generator=g), torch.randn(30, generator=g), torch.randn(5, generator=g)
    for scale in (0.01, 1.0, 50.0):  # an update far too short, about right, far too long
        step = scale * u
        t = secant_step_factor(r0, r0 + A @ step)
        grid = torch.linspace(-5 / scale, 5 / scale, 200001, dtype=torch.float64)  # brute force over t
        r = r0.double()[None] + grid[:, None] * (A.double() @ step.double())[None]
        assert t == pytest.approx(float(grid[r.square().sum(1).argmin()]), rel=1e-3, abs=1e-4 / scale)
    assert secant_step_factor(r0, r0.clone()) is None  # the residual did not move: no information


class LinearTextUNet(TinyUNet):
    """TinyUNet whose text path is linear: the residual is exactly affine in the null embedding."""

    def eps(self, x, sigma, emb):
        return torch.tanh(self.conv(x / math.sqrt(1 + sigma**2))) + self.proj(emb.mean(1))[:, :, None, None]


def _secant_runs(lr, inner, net_cls=LinearTextUNet):
    net = net_cls()
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(5)
    cond, empty = torch.randn(1, 3, 16, generator=g), torch.randn(1, 3, 16, generator=g)
    sigmas = ddim_sigmas(8)
    z = torch.randn(1, 4, 6, 6, generator=g) * float(sigmas[0])
    traj = [z]
    with torch.no_grad():
        for i in range(8):
            z = z + (float(sigmas[i + 1]) - float(sigmas[i])) * net.eps(z, float(sigmas[i]), cond)
            traj.append(z)
    return {secant: optimize_null_text(lambda z, s: net.eps(z, s, cond), lambda z, s, e: net.eps(z, s, e),
                                       torch.stack(traj), sigmas, empty,
                                       NullTextConfig(guidance=7.5, inner_steps=inner, lr=lr, secant=secant))
            for secant in (False, True)}


@pytest.mark.parametrize("lr, factor_side", [(1e-2, "short"), (3.0, "long")])
def test_secant_correction_reaches_a_far_lower_loss_with_no_extra_model_pass(lr, factor_side):
    runs = _secant_runs(lr, inner=6)
    (_, paper), (_, fast) = runs[False], runs[True]
    assert paper.secant_factors == []  # off: the paper's loop, nothing measured
    assert fast.forwards <= paper.forwards and fast.backwards <= paper.backwards
    assert sum(fast.losses) < 0.1 * sum(paper.losses), (fast.losses, paper.losses)
    median = sorted(fast.secant_factors)[len(fast.secant_factors) // 2]
    # the measured t* says which way the paper's update length is off: too short at lr 1e-2, too long at 3
    assert median > 1.0 if factor_side == "short" else median < 1.0, fast.secant_factors


def test_secant_correction_also_helps_through_a_nonlinear_text_path():
    runs = _secant_runs(1e-2, inner=6, net_cls=TinyUNet)  # tanh(conv + text): the residual is not affine
    assert sum(runs[True][1].losses) < 0.2 * sum(runs[False][1].losses)



# -- audit regressions --------------------------------------------------------------------------------------

def test_a_head_of_the_schedule_is_refused_with_the_reason_and_a_tail_gives_its_start():
    inv = _inversion()
    assert inv.check_schedule_matches(inv.sigmas[3:]) == 3
    with pytest.raises(EditLabError, match="not a tail of it ending at 0.*SplitSigmas"):
        inv.check_schedule_matches(inv.sigmas[:3])  # SplitSigmas' high half


def test_an_unknown_input_scaling_is_refused():
    with pytest.raises(EditLabError, match=r"input_scaling: 'bogus' is not one of \['reference', 'k-space'\]"):
        ddim_invert(point_mass(torch.zeros(1, 1, 1, 1)), torch.zeros(1, 1, 1, 1), ddim_sigmas(5), scaling="bogus")


def test_a_broken_inversion_file_is_named_in_the_error():
    tensors, meta = _inversion().to_state()
    bad = dict(tensors, trajectory=tensors["trajectory"][:3])
    with pytest.raises(EditLabError, match=r"^in/x.safetensors: trajectory shape \(3, 1, 4, 8, 8\) does not match 6"):
        Inversion.from_state(bad, meta, where="in/x.safetensors")
    with pytest.raises(EditLabError, match="^in/x.safetensors: not an EditLab inversion"):
        Inversion.from_state(tensors, {}, where="in/x.safetensors")


def test_null_text_helpers_are_the_papers_schedule():
    from editlab.samplers.null_text import early_stop_threshold, learning_rate
    config = NullTextConfig()
    assert early_stop_threshold(config, 0) == 1e-5 and early_stop_threshold(config, 10) == pytest.approx(2.1e-4)
    assert learning_rate(config, 0) == 1e-2 and learning_rate(config, 49) == pytest.approx(1e-2 * 0.51)
