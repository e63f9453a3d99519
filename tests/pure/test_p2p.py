"""Prompt-to-Prompt controller maths against the paper's formulas on synthetic q/k/v (docs/methods.md §5).

The reference formulas are written out here on explicit attention probabilities, independently of the
controller's fused-kernel implementation, and every mode is compared with them.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from editlab.guidance.p2p import (
    ControlSettings,
    P2PController,
    MapsRecord,
    Step,
    attention_probs,
    basic_attention,
    blend_active,
    blend_mask,
    blended_denoised,
    build_edit_spec,
    chunk_layout,
    cross_alpha,
    self_replace_active,
    step_index,
    step_of,
)
from editlab.errors import EditLabError
from fake_tokenizer import BOS, EOS, FakeTokenizer

HEADS, DIM, PIX, L = 2, 4, 16, 77
SIGMAS = [14.0, 8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.02, 0.0]  # 10 steps


def spec_for(prompts, mode="replace", **kw):
    return build_edit_spec(prompts, mode, FakeTokenizer(), bos=BOS, eos=EOS, **kw)


class AtStep:
    """A controller whose attention calls all belong to step ``step`` of the 10-step SIGMAS schedule."""

    def __init__(self, c: P2PController, step: int):
        self.c, self.step = c, step_of(SIGMAS[step], SIGMAS)

    def cross(self, q, k, v, heads, layout, attention, run=None):
        return self.c.cross(q, k, v, heads, layout, self.step, attention, run)

    def self_attention(self, q, k, v, heads, layout, attention):
        return self.c.self_attention(q, k, v, heads, layout, self.step, attention)


def controller(spec, step=0, **settings):
    return AtStep(P2PController(spec, ControlSettings(**settings), levels=[1, 2]), step)


def qkv(batch, pixels=PIX, keys=L, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, pixels, HEADS * DIM, generator=g)
    k = torch.randn(batch, keys, HEADS * DIM, generator=g)
    v = torch.randn(batch, keys, HEADS * DIM, generator=g)
    return q, k, v


def probs(q, k):
    return attention_probs(q[None], k[None], HEADS)[0]  # [h, p, L]


def heads_v(v):
    return v.reshape(L, HEADS, DIM).transpose(0, 1)  # [h, L, d]


def out_of(a, v):
    """Attention output [p, h*d] from probabilities [h, p, L] and values [L, h*d]."""
    return (a @ heads_v(v)).transpose(0, 1).reshape(a.shape[1], HEADS * DIM)


def paper_target(spec, t, a_src, a_tgt, alpha):
    """The reference controller's target map (AttentionReplace / Refine / Reweight + time-word alphas)."""
    if spec.mode == "replace":
        r = torch.einsum("hpw,wn->hpn", a_src, spec.base[t])
    elif spec.mode == "refine":
        mapper = spec.base[t].argmax(0)
        a = spec.keep[t]
        r = a_src[:, :, mapper] * a + a_tgt * (1 - a)
    else:
        r = a_src
    r = r * spec.weights[t]
    return r * alpha[t] + (1 - alpha[t]) * a_tgt


CASES = {
    "replace": (["a photo of a cat", "a photo of a dog"], "replace", {}),
    "replace multi-token": (["a cat on grass", "a hippopotamus on grass"], "replace", {}),
    "refine": (["a photo of a cat", "a photo of a fat cat"], "refine", {}),
    "reweight": (["a smiling bunny doll", "a smiling bunny doll"], "reweight", {"reweight": [("smiling", 3.0)]}),
    "refine+reweight+override": (["a cat", "a fat cat in snow"], "refine",
                                 {"reweight": [("fat", 2.0)], "replace_overrides": [("snow", 0.1)]}),
    "replace+reweight+override": (["a photo of a cat", "a photo of a dog"], "replace",
                                  {"reweight": [("dog", -1.0)], "replace_overrides": [("dog", 0.05)]}),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("step", [0, 5])
def test_each_mode_reproduces_the_papers_formula(case, step):
    prompts, mode, kw = CASES[case]
    spec = spec_for(prompts, mode, **kw)
    c = controller(spec, step=step, cross_replace=0.8)
    q, k, v = qkv(4)
    out = c.cross(q, k, v, HEADS, [0, 1], basic_attention)
    alpha = cross_alpha(spec, 0.8, step, 10)
    a_src, a_tgt = probs(q[0], k[0]), probs(q[1], k[1])
    expected = out_of(paper_target(spec, 0, a_src, a_tgt, alpha), v[1])
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-5)
    # the source row and the unconditional rows are exactly ComfyUI's plain attention
    plain = basic_attention(q, k, v, HEADS)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2:], plain[2:])


def test_time_word_alphas_follow_the_reference_schedule():
    spec = spec_for(["a photo of a cat", "a photo of a dog"], replace_overrides=[("dog", 0.3)])
    # end = int(fraction * (steps + 1)): default 0.8 of 10 steps -> steps 0..7; "dog" 0.3 -> steps 0..2
    on = [bool(cross_alpha(spec, 0.8, s, 10)[0, 1]) for s in range(10)]
    dog = [bool(cross_alpha(spec, 0.8, s, 10)[0, 5]) for s in range(10)]
    assert on == [True] * 8 + [False] * 2 and dog == [True] * 3 + [False] * 7
    assert [self_replace_active(0.4, s, 10) for s in range(10)] == [True] * 4 + [False] * 6
    assert [blend_active(0.2, s, 10) for s in range(4)] == [False, False, True, True]
    assert [step_index(s, SIGMAS) for s in SIGMAS[:-1]] == list(range(10))
    assert step_index(3.0, SIGMAS) == 2  # an intermediate evaluation of step 2 (sigma 4 -> 2)


def test_after_the_replace_window_the_target_is_untouched():
    spec = spec_for(["a photo of a cat", "a photo of a dog"], reweight=[("dog", 2.0)])
    c = controller(spec, step=9, cross_replace=0.5)
    q, k, v = qkv(4)
    assert torch.equal(c.cross(q, k, v, HEADS, [0, 1], basic_attention), basic_attention(q, k, v, HEADS))


def test_identical_prompts_with_full_replacement_give_the_source_row():
    spec = spec_for(["a red car", "a red car"])
    c = controller(spec, cross_replace=1.0, self_replace=1.0)
    q, k, v = qkv(2)
    k[1], v[1] = k[0], v[0]  # identical prompts: identical keys and values
    out = c.cross(q, k, v, HEADS, [0], basic_attention)
    assert torch.equal(out[1], out[0])
    x = q.clone()
    x[1] = q[0] * 3.0  # different queries; keys and values equal (the same latent so far)
    kv = q[:1].expand(2, -1, -1).clone()
    out = c.self_attention(x, kv, kv.clone(), HEADS, [0], basic_attention)
    assert torch.equal(out[1], out[0])


def test_reweight_scales_only_the_chosen_columns():
    spec = spec_for(["a smiling bunny doll"] * 2, "reweight", reweight=[("smiling", 2.5)])
    unit = spec_for(["a smiling bunny doll"] * 2, "reweight")
    q, k, v = qkv(2)
    out = controller(spec).cross(q, k, v, HEADS, [0], basic_attention)
    base = controller(unit).cross(q, k, v, HEADS, [0], basic_attention)
    a_src = probs(q[0], k[0])
    col = (spec.weights[0] != 1).float()  # the tokens of "smiling"
    assert col.nonzero().flatten().tolist() == [2, 3]  # after <start> and "a"; two word pieces
    only_smiling = out_of(a_src * col, v[1])
    torch.testing.assert_close(out[1] - base[1], 1.5 * only_smiling, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base[1], out_of(a_src, v[1]), rtol=1e-5, atol=1e-5)


def test_several_targets_are_edited_each_with_its_own_map():
    spec = spec_for(["a photo of a cat", "a photo of a dog", "a photo of a fox"])
    c = controller(spec)
    q, k, v = qkv(3)
    out = c.cross(q, k, v, HEADS, [0], basic_attention)
    a_src = probs(q[0], k[0])
    alpha = cross_alpha(spec, 0.8, 0, 10)
    for t in (1, 2):
        expected = out_of(paper_target(spec, t - 1, a_src, probs(q[t], k[t]), alpha), v[t])
        torch.testing.assert_close(out[t], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", [[1, 0], [0], [1], [0, 0]])
def test_conditional_chunks_are_found_wherever_they_are(layout):
    spec = spec_for(["a photo of a cat", "a photo of a fat cat"], "refine")
    c = controller(spec)
    q, k, v = qkv(2 * len(layout))
    out = c.cross(q, k, v, HEADS, layout, basic_attention)
    plain = basic_attention(q, k, v, HEADS)
    alpha = cross_alpha(spec, 0.8, 0, 10)
    for j, kind in enumerate(layout):
        s = 2 * j
        assert torch.equal(out[s], plain[s])
        if kind == 1:
            assert torch.equal(out[s + 1], plain[s + 1])
        else:
            expected = out_of(paper_target(spec, 0, probs(q[s], k[s]), probs(q[s + 1], k[s + 1]), alpha), v[s + 1])
            torch.testing.assert_close(out[s + 1], expected, rtol=1e-5, atol=1e-5)


def test_keys_repeated_to_a_longer_negative_prompt_give_the_same_edit():
    spec = spec_for(["a photo of a cat", "a photo of a fat cat"], "refine", reweight=[("fat", 2.0)])
    q, k, v = qkv(4)
    out77 = controller(spec).cross(q, k, v, HEADS, [0, 1], basic_attention)
    out154 = controller(spec).cross(q, k.repeat(1, 2, 1), v.repeat(1, 2, 1), HEADS, [0, 1], basic_attention)
    torch.testing.assert_close(out154, out77, rtol=1e-5, atol=1e-5)


def test_self_attention_replacement_only_at_small_layers_and_inside_its_window():
    spec = spec_for(["a photo of a cat", "a photo of a dog"])
    q, k, v = qkv(4, pixels=16, keys=16)
    c = controller(spec, step=0, self_replace=0.4, self_max_tokens=16)
    out = c.self_attention(q, k, v, HEADS, [0, 1], basic_attention)
    plain = basic_attention(q, k, v, HEADS)
    a_src = attention_probs(q[:1], k[:1], HEADS)[0]
    expected = (a_src @ v[1].reshape(16, HEADS, DIM).transpose(0, 1)).transpose(0, 1).reshape(16, -1)
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], plain[0]) and torch.equal(out[2:], plain[2:])
    # too many query tokens for the limit, or past the window: untouched
    c_big = controller(spec, step=0, self_replace=0.4, self_max_tokens=15)
    assert torch.equal(c_big.self_attention(q, k, v, HEADS, [0, 1], basic_attention), plain)
    c_late = controller(spec, step=4, self_replace=0.4, self_max_tokens=16)
    assert torch.equal(c_late.self_attention(q, k, v, HEADS, [0, 1], basic_attention), plain)


def test_maps_are_stored_only_at_the_chosen_resolution_and_only_for_conditional_rows():
    spec = spec_for(["a photo of a cat", "a photo of a dog"], blend_words=["cat", "dog"])
    c = P2PController(spec, ControlSettings(map_size=4), levels=[1, 2])
    run = c.new_run(2, (8, 8))  # levels: 8x8 (64 tokens) and 4x4 (16 tokens): 4 is nearest map_size 4
    assert run.grid == (4, 4)
    q, k, v = qkv(4, pixels=64)
    c.cross(q, k, v, HEADS, [1, 0], Step(0, 10), basic_attention, run)
    assert run.maps is None
    q, k, v = qkv(4, pixels=16)
    c.cross(q, k, v, HEADS, [1, 0], Step(0, 10), basic_attention, run)
    expected = attention_probs(q[2:], k[2:], HEADS).mean(1)
    torch.testing.assert_close(run.maps, expected)
    latent = torch.randn(2, 4, 8, 8)
    record = c.finish(run, latent)
    assert record.maps.shape == (2, 16, L) and record.grid == (4, 4)
    assert c.maps_for(latent.clone()) is record  # found by the latent's values, not by the object


def test_two_runs_of_one_controller_keep_their_own_maps_whatever_finished_last():
    """Run state belongs to the run: interleaved runs do not mix their maps, and each output latent
    finds the maps of the run that produced it."""
    spec = spec_for(["a photo of a cat", "a photo of a dog"])
    c = P2PController(spec, ControlSettings(map_size=4), levels=[1])
    copy_of_c = copy.deepcopy(c)  # a downstream clone of the controlled model: the same controller
    run_a, run_b = c.new_run(2, (4, 4)), copy_of_c.new_run(2, (4, 4))
    qa, ka, va = qkv(2, pixels=16, seed=1)
    qb, kb, vb = qkv(2, pixels=16, seed=2)
    c.cross(qa, ka, va, HEADS, [0], Step(0, 10), basic_attention, run_a)
    copy_of_c.cross(qb, kb, vb, HEADS, [0], Step(0, 10), basic_attention, run_b)
    c.cross(qa, ka, va, HEADS, [0], Step(1, 10), basic_attention, run_a)
    out_a, out_b = torch.zeros(2, 4, 4, 4), torch.ones(2, 4, 4, 4)
    c.finish(run_a, out_a)
    copy_of_c.finish(run_b, out_b)  # b finished last
    torch.testing.assert_close(c.maps_for(out_a).maps, attention_probs(qa, ka, HEADS).mean(1))
    torch.testing.assert_close(c.maps_for(out_b).maps, attention_probs(qb, kb, HEADS).mean(1))
    assert run_a.map_calls == 2 and run_b.map_calls == 1
    assert c.maps_for(out_a + 2) is None  # a latent no run produced
    assert isinstance(c.maps_for(out_b), MapsRecord)


def test_old_records_are_dropped_after_the_last_runs():
    spec = spec_for(["a photo of a cat", "a photo of a dog"])
    c = P2PController(spec, ControlSettings(map_size=4), levels=[1])
    outs = []
    for i in range(P2PController.RECORDS + 1):
        run = c.new_run(2, (4, 4))
        q, k, v = qkv(2, pixels=16, seed=i)
        c.cross(q, k, v, HEADS, [0], Step(0, 10), basic_attention, run)
        outs.append(torch.full((2, 4, 4, 4), float(i)))
        c.finish(run, outs[-1])
    assert c.maps_for(outs[0]) is None and all(c.maps_for(o) is not None for o in outs[1:])


def test_blend_mask_follows_the_blend_words_and_unites_source_and_target():
    maps = torch.full((2, 16, L), 1e-3)
    maps[0, 0, 5] = 1.0    # source word "cat" (token 5) attends at the top-left pixel
    maps[1, 15, 5] = 1.0   # target word "dog" attends at the bottom-right pixel
    blend = torch.zeros(2, L)
    blend[:, 5] = 1.0
    mask = blend_mask(maps, (4, 4), blend, (8, 8), threshold=0.3)
    assert mask.shape == (2, 1, 8, 8)
    # max-pool 3x3 grows each hot pixel to its neighbours; nearest upsampling doubles it
    assert mask[0, 0, :4, :4].eq(1).all() and mask[0, 0, 4:, 4:].eq(0).all()
    assert mask[1, 0, :4, :4].eq(1).all() and mask[1, 0, 4:, 4:].eq(1).all()
    assert mask[1, 0, :4, 4:].eq(0).all()
    # a row without blend words contributes nothing (no NaN from a zero maximum)
    blend[1] = 0
    assert blend_mask(maps, (4, 4), blend, (8, 8), 0.3)[1].equal(mask[0])


def test_blended_denoised_makes_an_euler_step_land_on_the_blended_latent():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 8, 8, generator=g)
    d = torch.randn(3, 4, 8, 8, generator=g)
    mask = (torch.rand(3, 1, 8, 8, generator=g) > 0.5).float()
    mask = torch.maximum(mask, mask[:1])
    sigma, sigma_next = 2.0, 1.2
    r = sigma_next / sigma
    d2 = blended_denoised(x, d, mask, r)
    euler = lambda den: x + (sigma_next - sigma) * (x - den) / sigma  # noqa: E731
    step = euler(d)
    blended = step[:1] + mask * (step - step[:1])
    torch.testing.assert_close(euler(d2), blended, rtol=1e-5, atol=1e-5)
    assert torch.equal(d2[0], d[0])
    # the last step (sigma_next = 0): the result is exactly the source outside the mask
    last = blended_denoised(x, d, mask, 0.0)
    outside = mask[1:].expand_as(last[1:]) == 0
    assert torch.equal(last[1:][outside], d[:1].expand_as(last[1:])[outside])


def test_controller_blend_uses_the_current_step_and_start_blend():
    spec = spec_for(["a photo of a cat", "a photo of a dog"], blend_words=["cat", "dog"])
    c = P2PController(spec, ControlSettings(map_size=4, start_blend=0.2), levels=[2])
    run = c.new_run(2, (8, 8))
    x = torch.randn(2, 4, 8, 8)
    d = torch.randn(2, 4, 8, 8)
    q, k, v = qkv(4, pixels=16)
    c.cross(q, k, v, HEADS, [0, 1], Step(0, 10), basic_attention, run)
    assert torch.equal(c.blend(run, x, d, SIGMAS[0], SIGMAS), d)  # step 0 < start
    out = c.blend(run, x, d, SIGMAS[2], SIGMAS)
    assert torch.equal(out[0], d[0]) and not torch.equal(out[1], d[1]) and run.mask is not None
    # the step is read from the schedule it is given: SIGMAS[2] is step 0 of the tail SIGMAS[2:]
    fresh = c.new_run(2, (8, 8))
    c.cross(q, k, v, HEADS, [0, 1], Step(0, 8), basic_attention, fresh)
    assert torch.equal(c.blend(fresh, x, d, SIGMAS[2], SIGMAS[2:]), d)


def test_bad_batches_are_refused_with_the_fix():
    spec = spec_for(["a photo of a cat", "a photo of a dog"])
    c = P2PController(spec, ControlSettings(), levels=[1])
    with pytest.raises(EditLabError, match=r"latent batch is 3 but the edit has 2 prompts.*P2P Latent Batch"):
        c.new_run(3, (8, 8))
    with pytest.raises(EditLabError, match="3 rows per conditioning but the edit has 2 prompts"):
        chunk_layout(6, [0, 1], 2)
    q, k, v = qkv(4, keys=70)
    with pytest.raises(EditLabError, match="70 tokens per row"):
        c.cross(q, k, v, HEADS, [0, 1], Step(0, 10), basic_attention, c.new_run(2, (8, 8)))
    with pytest.raises(EditLabError, match="at least one step"):
        step_of(1.0, [0.0])


def test_the_controller_survives_deep_copies_and_holds_no_run_state():
    spec = spec_for(["a photo of a cat", "a photo of a dog"], blend_words=["cat"])
    c = P2PController(spec, ControlSettings(map_size=4), levels=[1])
    holder = {"transformer_options": {"p2p": c}}
    assert copy.deepcopy(holder)["transformer_options"]["p2p"] is c
    first = c.new_run(2, (4, 4))
    q, k, v = qkv(2, pixels=16)
    c.cross(q, k, v, HEADS, [0], Step(3, 10), basic_attention, first)
    second = c.new_run(2, (4, 4))
    assert first.map_calls == 1 and second.map_calls == 0 and second.maps is None
    # without a run (a model call outside a sampling run) the edit is applied and nothing is stored
    plain = c.cross(q, k, v, HEADS, [0], Step(3, 10), basic_attention)
    torch.testing.assert_close(plain, c.cross(q, k, v, HEADS, [0], Step(3, 10), basic_attention, second))


def test_the_step_is_that_of_the_schedule_given():
    assert step_of(SIGMAS[3], SIGMAS) == Step(3, 10)
    assert step_of(SIGMAS[3], SIGMAS[3:]) == Step(0, 7)
    assert step_of(3.0, SIGMAS) == Step(2, 10)  # an intermediate evaluation of step 2 (sigma 4 -> 2)
    assert math.isclose(SIGMAS[0], 14.0)
