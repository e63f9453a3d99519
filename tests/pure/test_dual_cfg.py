"""Dual CFG combiner arithmetic, schedules and rescale (docs/methods.md §6)."""
from __future__ import annotations

import math

import pytest
import torch

from editlab.errors import EditLabError
from editlab.guidance.dual_cfg import (
    DualCFG,
    ScaleSchedule,
    dual_cfg,
    from_v,
    rescale_guidance,
    step_fraction,
    to_v,
)


def preds(seed: int = 0, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float64) * (i + 1) for i in range(4)]


def paper(both, image, uncond, s_t, s_i):
    """Brooks et al. eq. 3, written as in the reference implementation (and diffusers)."""
    return uncond + s_t * (both - image) + s_i * (image - uncond)


@pytest.mark.parametrize("s_t,s_i", [(7.5, 1.5), (0.0, 0.0), (1.0, 1.0), (12.0, -0.5), (3.3, 2.7)])
def test_combination_equals_the_formula_for_arbitrary_predictions(s_t, s_i):
    x, both, base, neither = preds(1)
    expected = paper(both, base, neither, s_t, s_i)
    torch.testing.assert_close(dual_cfg(both, base, neither, s_t, s_i), expected, rtol=0, atol=1e-12)
    combiner = DualCFG(ScaleSchedule(s_t, s_t), ScaleSchedule(s_i, s_i))
    torch.testing.assert_close(combiner.combine(x, torch.tensor([1.3, 0.4]), both, base, neither, 0.37), expected,
                               rtol=0, atol=1e-12)


def test_unit_scales_reduce_to_the_plain_conditional_prediction():
    x, both, base, neither = preds(2)
    assert torch.equal(dual_cfg(both, both, both, 1.0, 1.0), both)
    torch.testing.assert_close(dual_cfg(both, base, neither, 1.0, 1.0), both, rtol=0, atol=1e-12)
    combiner = DualCFG(ScaleSchedule(1.0, 1.0), ScaleSchedule(1.0, 1.0), rescale=0.7)
    # With s_I = s_T = 1 the rescale is the identity too (std ratio 1).
    torch.testing.assert_close(combiner.combine(x, torch.tensor(2.0), both, base, neither, 0.5), both,
                               rtol=1e-10, atol=1e-10)
    assert combiner.needs(0.5) == (False, False)


def test_needs_skips_only_predictions_that_cancel():
    assert DualCFG(ScaleSchedule(7.5, 7.5), ScaleSchedule(1.5, 1.5)).needs(0.0) == (True, True)
    assert DualCFG(ScaleSchedule(7.5, 7.5), ScaleSchedule(1.0, 1.0)).needs(0.0) == (True, False)
    assert DualCFG(ScaleSchedule(1.0, 1.0), ScaleSchedule(0.5, 0.5)).needs(0.0) == (True, True)
    # A schedule that passes through 1 only skips where it is 1.
    sched = DualCFG(ScaleSchedule(7.5, 7.5), ScaleSchedule(1.0, 2.0, "linear"))
    assert sched.needs(0.0) == (True, False) and sched.needs(1.0) == (True, True)


def test_shared_weight_structure_makes_the_space_irrelevant():
    """Weights sum to one: combining denoised predictions equals combining eps predictions."""
    x, both, base, neither = preds(3)
    sigma = torch.tensor([2.0, 0.5]).reshape(2, 1, 1, 1).double()
    eps = [(x - d) / sigma for d in (both, base, neither)]
    via_eps = x - sigma * dual_cfg(*eps, 7.5, 1.5)
    torch.testing.assert_close(dual_cfg(both, base, neither, 7.5, 1.5), via_eps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine"])
def test_schedules_interpolate_as_documented(shape):
    s = ScaleSchedule(7.5, 1.5, shape)
    for f in [0.0, 0.1, 0.25, 0.5, 0.9, 1.0]:
        if shape == "constant":
            expected = 7.5
        elif shape == "linear":
            expected = 7.5 + (1.5 - 7.5) * f
        else:
            expected = 7.5 + (1.5 - 7.5) * (1 - math.cos(math.pi * f)) / 2
        assert s.at(f) == pytest.approx(expected, abs=1e-12)
    assert s.at(-1.0) == s.at(0.0) and s.at(2.0) == s.at(1.0)  # clamped
    if shape != "constant":
        assert s.at(0.0) == 7.5 and s.at(1.0) == pytest.approx(1.5)
        values = [s.at(i / 20) for i in range(21)]
        assert all(a >= b for a, b in zip(values, values[1:]))  # monotone between the ends


def test_cosine_is_flat_at_both_ends_and_meets_linear_in_the_middle():
    lin, cos = ScaleSchedule(0.0, 1.0, "linear"), ScaleSchedule(0.0, 1.0, "cosine")
    assert cos.at(0.5) == pytest.approx(lin.at(0.5))
    assert cos.at(0.05) < lin.at(0.05) and cos.at(0.95) > lin.at(0.95)


def test_step_fraction_runs_from_first_to_last_step():
    sigmas = torch.tensor([14.6, 7.0, 3.0, 1.0, 0.3, 0.0])  # 5 steps
    fr = [step_fraction(float(s), sigmas) for s in sigmas[:-1]]
    assert fr == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    # Between schedule points (Heun's second evaluation): linear in the step position.
    assert step_fraction(5.0, sigmas) == pytest.approx((1 + (7.0 - 5.0) / (7.0 - 3.0)) / 4)
    assert step_fraction(0.1, sigmas) == 1.0 and step_fraction(20.0, sigmas) == 0.0
    assert step_fraction(3.0, None) == 0.0 and step_fraction(3.0, torch.tensor([3.0, 0.0])) == 0.0
    assert step_fraction(3.0, [14.6, 3.0, 0.0]) == 1.0


def test_scheduled_combiner_uses_the_scale_of_each_step():
    x, both, base, neither = preds(4)
    sigmas = torch.tensor([10.0, 5.0, 1.0, 0.0])
    combiner = DualCFG(ScaleSchedule(9.0, 3.0, "linear"), ScaleSchedule(2.0, 1.0, "linear"))
    for sigma, (s_t, s_i) in zip(sigmas[:-1], [(9.0, 2.0), (6.0, 1.5), (3.0, 1.0)]):
        f = step_fraction(float(sigma), sigmas)
        out = combiner.combine(x, sigma, both, base, neither, f)
        torch.testing.assert_close(out, paper(both, base, neither, s_t, s_i), rtol=0, atol=1e-12)


def test_v_conversion_round_trips_and_matches_the_definition():
    x, d, _, _ = preds(5)
    sigma = torch.tensor([3.0, 0.2], dtype=torch.float64)
    s = sigma.reshape(2, 1, 1, 1)
    torch.testing.assert_close(from_v(x, to_v(x, d, sigma), sigma), d, rtol=1e-10, atol=1e-10)
    # v = alpha eps - sigma_vp x0 with alpha = 1/sqrt(1+s^2), sigma_vp = s/sqrt(1+s^2), eps = (x - x0)/s.
    eps = (x - d) / s
    expected = (eps - s * d) / torch.sqrt(1 + s * s)
    torch.testing.assert_close(to_v(x, d, sigma), expected, rtol=1e-10, atol=1e-10)


def test_rescale_follows_lin_et_al():
    _, guided, cond, _ = preds(6)
    out = rescale_guidance(guided, cond, 1.0)
    std = lambda t: t.std(dim=(1, 2, 3))  # noqa: E731
    torch.testing.assert_close(std(out), std(cond), rtol=1e-10, atol=1e-10)
    assert torch.equal(rescale_guidance(guided, cond, 0.0), guided)
    half = rescale_guidance(guided, cond, 0.5)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * guided, rtol=1e-10, atol=1e-10)


def test_combiner_rescale_is_taken_in_v_space_against_the_full_condition():
    x, both, base, neither = preds(7)
    sigma = torch.tensor([4.0, 0.7], dtype=torch.float64)
    combiner = DualCFG(ScaleSchedule(7.5, 7.5), ScaleSchedule(1.5, 1.5), rescale=0.7)
    out = combiner.combine(x, sigma, both, base, neither, 0.0)
    v_guided = to_v(x, dual_cfg(both, base, neither, 7.5, 1.5), sigma)
    v_both = to_v(x, both, sigma)
    ratio = v_both.std(dim=(1, 2, 3), keepdim=True) / v_guided.std(dim=(1, 2, 3), keepdim=True)
    expected = from_v(x, 0.7 * v_guided * ratio + 0.3 * v_guided, sigma)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # Rescale tames the spread of the guided prediction at high scales.
    assert (to_v(x, out, sigma).std(dim=(1, 2, 3)) < v_guided.std(dim=(1, 2, 3))).all()


def test_bad_settings_say_what_to_do():
    with pytest.raises(EditLabError, match="rescale must be in"):
        DualCFG(ScaleSchedule(1, 1), ScaleSchedule(1, 1), rescale=1.5)
    with pytest.raises(EditLabError, match="choose one of"):
        ScaleSchedule(1.0, 2.0, "exponential")
    with pytest.raises(EditLabError, match="finite"):
        ScaleSchedule(float("nan"), 2.0)
