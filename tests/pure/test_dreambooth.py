"""DreamBooth's pure core: Eq. 2 in the model's target, the 1:1 streams, the loop, the identifier."""
from __future__ import annotations


import pytest
import torch

from editlab.errors import EditLabError
from editlab.training.dreambooth import (
    INSTANCE, PRIOR, DreamBoothConfig, LossHistory, Model, draw_rows, prior_preservation_loss, target_weight, train,
)
from editlab.training.identifier import check_identifier, pick_identifier, rare_identifiers


def test_model_target_is_the_eps_mse_for_an_eps_model():
    g = torch.Generator().manual_seed(0)
    x0, eps, eps_pred = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    sigma = torch.tensor([0.3, 2.0, 9.0])
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + s * eps
    d = x - s * eps_pred               # an eps model's denoised prediction, c_out = -sigma
    total, inst, prior = prior_preservation_loss(d, x0, target_weight(-sigma, "model"), 3, 1.0)
    want = (eps_pred - eps).pow(2).flatten(1).mean(1).mean()
    assert inst.item() == pytest.approx(want.item(), rel=1e-5)
    assert prior.item() == 0.0 and total.item() == inst.item()
    x0_loss = prior_preservation_loss(d, x0, target_weight(-sigma, "x0"), 3, 1.0)[1]
    assert x0_loss.item() == pytest.approx((d - x0).pow(2).flatten(1).mean(1).mean().item(), rel=1e-6)


def test_prior_term_sees_only_class_rows():
    pred = torch.randn(4, 2, 3, 3, requires_grad=True)
    target = torch.randn(4, 2, 3, 3)
    _, inst, prior = prior_preservation_loss(pred, target, torch.ones(4), 2, 1.0)
    (g_prior,) = torch.autograd.grad(prior, pred, retain_graph=True)
    (g_inst,) = torch.autograd.grad(inst, pred)
    assert g_prior[:2].abs().max() == 0 and g_prior[2:].abs().min() > 0
    assert g_inst[2:].abs().max() == 0 and g_inst[:2].abs().min() > 0
    total = prior_preservation_loss(pred, target, torch.ones(4), 2, 0.5)[0]
    assert total.item() == pytest.approx(inst.item() + 0.5 * prior.item(), rel=1e-6)


def test_streams_are_independent_and_reproducible():
    latents = torch.randn(5, 4, 2, 2)
    a = draw_rows(latents, 2, seed=3, stream=INSTANCE, step=7)
    b = draw_rows(latents, 2, seed=3, stream=INSTANCE, step=7)
    c = draw_rows(latents, 2, seed=3, stream=PRIOR, step=7)
    d = draw_rows(latents, 2, seed=3, stream=INSTANCE, step=8)
    assert torch.equal(a.noise, b.noise) and torch.equal(a.index, b.index) and torch.equal(a.u, b.u)
    assert not torch.equal(a.noise, c.noise) and not torch.equal(a.noise, d.noise)
    assert a.index.unique().numel() == 2  # without replacement while the set is large enough
    many = draw_rows(latents, 12, seed=3, stream=INSTANCE, step=0)
    assert many.index.numel() == 12 and int(many.index.max()) < 5


class _Toy:
    """A k-space eps 'model' whose denoised prediction is ``x * a / (1 + sigma^2)`` per row's stream."""

    def __init__(self):
        self.a = torch.nn.Parameter(torch.tensor([0.2, 0.2]))
        self.calls = []

    def model(self) -> Model:
        def predict_x0(x, sigma, rows):
            self.calls.append(rows)
            scale = torch.stack([self.a[s] for s, _ in rows]).view(-1, 1, 1, 1)
            return x * scale / (1 + sigma.view(-1, 1, 1, 1) ** 2)
        return Model(predict_x0=predict_x0, sigma_of=lambda u: 0.1 + 3.0 * u,
                     noise_scaling=lambda s, n, x0: x0 + s.view(-1, 1, 1, 1) * n, c_out=lambda s: -s)


def _run(toy, config, instance, classes, **kw):
    opt = torch.optim.AdamW([toy.a], lr=0.05)
    return opt, train(toy.model(), opt, instance, classes, config, **kw)


def test_loop_learns_and_keeps_the_prior_rows_apart():
    g = torch.Generator().manual_seed(0)
    instance, classes = torch.randn(3, 2, 2, 2, generator=g), torch.randn(6, 2, 2, 2, generator=g)
    toy = _Toy()
    _, hist = _run(toy, DreamBoothConfig(steps=60, batch_size=2, seed=1), instance, classes)
    assert len(hist.total) == 60
    assert sum(hist.instance[-10:]) < sum(hist.instance[:10])
    assert all(len(rows) == 4 and [s for s, _ in rows] == [INSTANCE] * 2 + [PRIOR] * 2 for rows in toy.calls)
    only = _Toy()
    _, hist0 = _run(only, DreamBoothConfig(steps=5, prior_loss_weight=0.0, seed=1), instance, classes)
    assert all(len(rows) == 1 for rows in only.calls)  # lambda = 0 skips the class rows
    assert set(hist0.prior) == {0.0}


def test_resumed_loop_equals_the_uninterrupted_one():
    g = torch.Generator().manual_seed(2)
    instance, classes = torch.randn(3, 2, 2, 2, generator=g), torch.randn(4, 2, 2, 2, generator=g)
    full = _Toy()
    _, hist_full = _run(full, DreamBoothConfig(steps=8, seed=4), instance, classes)
    # run to step 3, then resume a fresh toy from its weights and optimizer state
    first = _Toy()
    opt1 = torch.optim.AdamW([first.a], lr=0.05)
    hist1 = train(first.model(), opt1, instance, classes, DreamBoothConfig(steps=3, seed=4))
    resumed = _Toy()
    with torch.no_grad():
        resumed.a.copy_(first.a)
    opt2 = torch.optim.AdamW([resumed.a], lr=0.05)
    opt2.load_state_dict(opt1.state_dict())
    hist2 = train(resumed.model(), opt2, instance, classes, DreamBoothConfig(steps=8, seed=4), start_step=3,
                  history=LossHistory(list(hist1.total), list(hist1.instance), list(hist1.prior)))
    assert hist2.total == pytest.approx(hist_full.total, rel=1e-6)
    assert torch.allclose(resumed.a, full.a)


def test_checkpoints_are_offered_every_n_steps():
    instance, classes = torch.randn(2, 2, 2, 2), torch.randn(2, 2, 2, 2)
    steps = []
    _run(_Toy(), DreamBoothConfig(steps=7, save_every=3), instance, classes, on_checkpoint=lambda s, h: steps.append(s))
    assert steps == [3, 6]


def test_bad_configs_and_missing_class_images_are_refused():
    with pytest.raises(EditLabError, match="loss_target"):
        DreamBoothConfig(steps=1, loss_target="eps")
    with pytest.raises(EditLabError, match="prior_loss_weight"):
        DreamBoothConfig(steps=1, prior_loss_weight=-1)
    with pytest.raises(EditLabError, match="class images"):
        _run(_Toy(), DreamBoothConfig(steps=1), torch.randn(2, 2, 2, 2), None)


# -- identifier -----------------------------------------------------------------------------------

def _vocab():
    words = ["a</w>", "dog</w>", "the</w>", "qx</w>", "vzk</w>", "ab", "zzzz</w>", "kx</w>", "sks</w>", "9z</w>"]
    vocab = {w: i * 10 for i, w in enumerate(words)}
    inverse = {w[:-4]: i for w, i in vocab.items() if w.endswith("</w>")}

    def encode(text: str) -> list[int]:
        return [inverse[text]] if text in inverse else [1, 2]

    return vocab, encode


def test_rare_identifiers_come_from_the_band_and_skip_words():
    vocab, encode = _vocab()
    found = rare_identifiers(vocab, encode, band=(0.3, 1.0))
    assert [t for t, _ in found] == ["qx", "vzk", "kx"]  # not: words, non-final, >3 chars, digits, 'sks'
    assert pick_identifier(vocab, encode, 0) == pick_identifier(vocab, encode, 0)
    assert {pick_identifier(vocab, encode, s)[0] for s in range(20)} <= {"qx", "vzk", "kx"}


def test_user_identifiers_are_checked():
    _, encode = _vocab()
    assert check_identifier("qx", encode) == [30]
    with pytest.raises(EditLabError, match="common word"):
        check_identifier("dog", encode)
    with pytest.raises(EditLabError, match="2 tokens"):
        check_identifier("unknownword", encode)
    with pytest.raises(EditLabError, match="without spaces"):
        check_identifier("a b", encode)
