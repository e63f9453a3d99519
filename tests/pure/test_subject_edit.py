"""Subject-driven editing spec (docs/methods.md §7: DDIM inversion + refine + local blend on the subject word).

The target row is the source prompt with the subject's vectors inserted before the subject word; the
refine alignment must keep every source token's attention (shifted past the vectors) and give the
vectors, and a renamed class word, their own.
"""
from __future__ import annotations

import pytest
import torch

from editlab.guidance.p2p import (
    SUBJECT_WORD,
    ControlSettings,
    P2PController,
    Step,
    attention_probs,
    basic_attention,
    subject_edit_spec,
)
from editlab.errors import EditLabError
from fake_tokenizer import BOS, EOS, FakeTokenizer

N = 16


def spec_for(source, word="dog", target_class="", **kw):
    return subject_edit_spec(source, word, target_class, N, FakeTokenizer(), bos=BOS, eos=EOS, **kw)


def source_to_target_columns(spec):
    """{source column: target column} from the spec's gather matrix, for columns kept from the source."""
    base, keep = spec.base[0], spec.keep[0]
    out = {}
    for j in range(spec.length):
        if keep[j] == 1.0:
            (src,) = torch.nonzero(base[:, j]).flatten().tolist()
            out[src] = j
    return out


def test_subject_sits_after_a_for_the_reference_prompt_and_source_tokens_shift_past_it():
    spec = spec_for("a dog sitting on the grass")
    subject = [w for w in spec.words[1] if w.text == SUBJECT_WORD][0]
    assert subject.positions == list(range(2, 2 + N))  # after BOS and "a": the reference position
    assert [w.text for w in spec.words[1]] == ["a", SUBJECT_WORD, "dog", "sitting", "on", "the", "grass"]
    cols = source_to_target_columns(spec)
    n_src = 1 + sum(len(w.tokens) for w in spec.words[0]) + 1  # BOS + words + EOS
    for p in range(n_src):
        assert cols[p] == (p if p < 2 else p + N), p
    assert spec.keep[0, subject.positions].eq(0).all()  # the vectors attend with their own maps


def test_subject_goes_before_the_subject_word_anywhere_in_the_prompt():
    spec = spec_for("a photo of my old teddy bear on a sofa", word="teddy bear")
    words = [w.text for w in spec.words[1]]
    assert words[words.index(SUBJECT_WORD) + 1: words.index(SUBJECT_WORD) + 3] == ["teddy", "bear"]
    assert words.index(SUBJECT_WORD) == 5


def test_renamed_class_is_new_in_the_target_and_the_old_word_is_dropped():
    spec = spec_for("a dog sitting on the grass", target_class="cat")
    tgt = {w.text: w for w in spec.words[1]}
    assert "dog" not in tgt
    assert spec.keep[0, tgt["cat"].positions].eq(0).all()
    cols = source_to_target_columns(spec)
    dog = [w for w in spec.words[0] if w.text == "dog"][0]
    assert all(p not in cols for p in dog.positions)
    sitting = [w for w in spec.words[0] if w.text == "sitting"][0]
    assert [cols[p] for p in sitting.positions] == tgt["sitting"].positions
    punctuated = spec_for("a dog, sitting", target_class="small cat")
    assert punctuated.prompts[1] == f"a {SUBJECT_WORD} small cat, sitting"


def test_local_blend_marks_the_subject_word_in_both_rows_and_the_vectors():
    spec = spec_for("a dog sitting on the grass", target_class="cat")
    src_dog = [w for w in spec.words[0] if w.text == "dog"][0].positions
    tgt = {w.text: w.positions for w in spec.words[1]}
    assert torch.nonzero(spec.blend[0]).flatten().tolist() == src_dog
    assert torch.nonzero(spec.blend[1]).flatten().tolist() == sorted(tgt[SUBJECT_WORD] + tgt["cat"])
    assert not spec_for("a dog sitting on the grass", blend=False).has_blend


def test_subject_weight_scales_only_the_vectors():
    spec = spec_for("a dog on the grass", subject_weight=1.5)
    subject = [w for w in spec.words[1] if w.text == SUBJECT_WORD][0].positions
    expected = torch.ones(spec.length)
    expected[subject] = 1.5
    assert torch.equal(spec.weights[0], expected)


def test_the_controlled_target_attends_to_source_words_exactly_as_the_source():
    """Inside the cross-replace window, the target's attention on every kept column equals the source's
    on the matching column, and the subject columns keep the target's own attention."""
    spec = spec_for("a dog sitting on the grass")
    c = P2PController(spec, ControlSettings(cross_replace=1.0), levels=[1])
    torch.manual_seed(0)
    heads, dim = 2, 8
    q, k, v = (torch.randn(2, n, heads * dim) for n in (16, spec.length, spec.length))
    out = c.cross(q, k, v, heads, [0], Step(0, 2), basic_attention)
    a_src = attention_probs(q[:1], k[:1], heads)[0]
    a_tgt = attention_probs(q[1:], k[1:], heads)[0]
    subject = [w for w in spec.words[1] if w.text == SUBJECT_WORD][0].positions
    a_new = torch.zeros_like(a_tgt)  # the refine formula written column by column
    for s, t in source_to_target_columns(spec).items():
        a_new[..., t] = a_src[..., s]
    a_new[..., subject] = a_tgt[..., subject]
    vh = v[1].reshape(spec.length, heads, dim).transpose(0, 1)
    expected = (a_new @ vh).transpose(0, 1).reshape(16, heads * dim)
    torch.testing.assert_close(out[1], expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], basic_attention(q, k, v, heads)[0])


@pytest.mark.parametrize("source, word, match", [
    ("a dog on the grass", "cat", "not in the source prompt"),
    ("a dog on the grass", "  ", "subject word is empty"),
    (" ".join(["word"] * 60) + " dog", "dog", "subject's 16 vectors"),
])
def test_bad_input_is_refused_with_the_fix(source, word, match):
    with pytest.raises(EditLabError, match=match):
        spec_for(source, word=word)
