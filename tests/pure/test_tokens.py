"""Word <-> token alignment for prompt-to-prompt with a tiny fake word-piece tokenizer (docs/methods.md §5)."""
from __future__ import annotations

import pytest
import torch

from editlab.errors import EditLabError
from editlab.guidance.p2p import build_edit_spec, parse_word_values
from editlab.guidance.tokens import (
    find_words,
    global_align,
    refine_map,
    refine_matrix,
    replace_map,
    split_words,
    token_ids,
)

from fake_tokenizer import BOS, EOS, FakeTokenizer


@pytest.fixture
def tok():
    return FakeTokenizer()


def test_words_get_consecutive_positions_after_the_start_token(tok):
    words = split_words("a hippopotamus, swimming", tok)
    assert [w.text for w in words] == ["a", "hippopotamus,", "swimming"]
    assert [w.positions for w in words] == [[1], [2, 3, 4], [5, 6]]  # hippop otamus</w> , / swimmi ng</w>
    assert find_words(words, "hippopotamus") == [2, 3, 4]
    assert find_words(words, "Hippopotamus swimming") == [2, 3, 4, 5, 6]
    assert find_words(words, "dog") == []


def test_repeated_words_are_all_found(tok):
    words = split_words("a cat and a cat", tok)
    assert find_words(words, "cat") == [2, 5]


def test_prompts_longer_than_one_chunk_are_refused(tok):
    with pytest.raises(EditLabError, match="one 77-token CLIP chunk"):
        split_words(" ".join(["word"] * 80), tok)


def test_replace_map_single_token_swap_is_a_permutation_identity(tok):
    m = replace_map(split_words("a photo of a cat", tok), split_words("a photo of a dog", tok))
    torch.testing.assert_close(m, torch.eye(77))


def test_replace_map_multi_token_words_share_weight(tok):
    src = split_words("a cat on grass", tok)          # cat: 1 token at 2
    tgt = split_words("a hippopotamus on grass", tok)  # hippopotamus: 2 tokens at 2, 3
    m = replace_map(src, tgt)
    assert m[2, 2:4].tolist() == [0.5, 0.5] and m[2].sum() == 1.0
    # words after the swap follow the offset: "on" (src 3) -> tgt 4, "grass" (src 4) -> tgt 5, end 5 -> 6
    assert m[3, 4] == 1 and m[4, 5] == 1 and m[5, 6] == 1 and m[0, 0] == 1
    assert m[3].sum() == 1 and m[:, 4].sum() == 1
    # the other way round: two source tokens pour into one (ratio 1 / len(target) = 1)
    m2 = replace_map(tgt, src)
    assert m2[2:4, 2].tolist() == [1.0, 1.0]
    assert m2[4, 3] == 1 and m2[5, 4] == 1


def test_replace_refuses_unequal_word_counts_and_suggests_refine(tok):
    with pytest.raises(EditLabError, match=r"word count \(5 vs 6\).*use refine"):
        replace_map(split_words("a photo of a cat", tok), split_words("a photo of a fat cat", tok))


def test_global_alignment_added_word_in_the_middle(tok):
    src = token_ids(split_words("a photo of a cat", tok), BOS, EOS)
    tgt = token_ids(split_words("a photo of a fat cat", tok), BOS, EOS)
    mapper, alphas = refine_map(src, tgt)
    # target: BOS a photo of a fat cat EOS -> source positions, the new word maps nowhere (alpha 0)
    assert alphas[:8].tolist() == [1, 1, 1, 1, 1, 0, 1, 1]
    assert mapper[[0, 1, 2, 3, 4, 6, 7]].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert mapper[8:].tolist() == list(range(8, 77)) and alphas[8:].eq(1).all()


@pytest.mark.parametrize("src,tgt,new", [
    ("a cat", "photo of a cat", [1, 2]),           # words added at the start
    ("a cat", "a cat in the snow", [3, 4, 5]),     # words added at the end
    ("a cat", "a hippopotamus cat", [2, 3]),       # a multi-token word
])
def test_global_alignment_added_words_at_the_start_end_and_multi_token(tok, src, tgt, new):
    s = token_ids(split_words(src, tok), BOS, EOS)
    t = token_ids(split_words(tgt, tok), BOS, EOS)
    mapper, alphas = refine_map(s, t)
    assert [j for j in range(len(t)) if alphas[j] == 0] == new
    kept = [j for j in range(len(t)) if alphas[j] == 1]
    assert [s[mapper[j]] for j in kept] == [t[j] for j in kept]  # kept tokens map to equal tokens
    assert mapper[kept].tolist() == sorted(mapper[kept].tolist())  # in order


def test_global_alignment_repeated_words_follow_the_references_tie_breaks():
    # x = "a cat", y = "a cat a cat": ties prefer a gap in x while tracing back from the end, so the
    # *first* "a cat" of y is the aligned one and the repeat is new
    pairs = global_align([0, 5, 6, 9], [0, 5, 6, 5, 6, 9])
    assert pairs == [(0, 0), (1, 1), (2, 2), (3, -1), (4, -1), (5, 3)]
    # a word added before a repeated word: the alignment skips the new tokens
    assert global_align([0, 1, 2, 9], [0, 3, 4, 1, 2, 9]) == [(0, 0), (1, -1), (2, -1), (3, 1), (4, 2), (5, 3)]


def test_refine_matrix_is_the_gather():
    mapper = torch.tensor([0, 2, 1] + list(range(3, 77)))
    a = torch.rand(2, 5, 77)
    torch.testing.assert_close(a @ refine_matrix(mapper), a[..., mapper])


def test_edit_spec_places_reweight_blend_and_override_words(tok):
    spec = build_edit_spec(["a photo of a cat", "a photo of a dog"], "replace", tok, bos=BOS, eos=EOS,
                           reweight=[("dog", 2.0)], blend_words=["cat", "dog"], replace_overrides=[("dog", 0.3)])
    assert spec.rows == 2 and spec.targets == 1
    assert spec.weights[0, 5] == 2.0 and (spec.weights[0, :5] == 1).all() and (spec.weights[0, 6:] == 1).all()
    assert spec.blend[0].nonzero().flatten().tolist() == [5] and spec.blend[1].nonzero().flatten().tolist() == [5]
    assert spec.replace_until[0, 5] == pytest.approx(0.3) and torch.isnan(spec.replace_until[0, 4])
    assert [label for label, _ in spec.labels(0)] == ["<start>", "a", "photo", "of", "a", "cat", "<end>"]


def test_edit_spec_errors_name_the_word_and_the_fix(tok):
    prompts = ["a photo of a cat", "a photo of a dog"]
    with pytest.raises(EditLabError, match="blend word 'horse' is in none"):
        build_edit_spec(prompts, "replace", tok, bos=BOS, eos=EOS, blend_words=["horse"])
    with pytest.raises(EditLabError, match="reweight word 'cat' is not in the target"):
        build_edit_spec(prompts, "replace", tok, bos=BOS, eos=EOS, reweight=[("cat", 2.0)])
    with pytest.raises(EditLabError, match="use refine"):
        build_edit_spec(["a cat", "a fat cat"], "replace", tok, bos=BOS, eos=EOS)
    with pytest.raises(EditLabError, match="reweight alone"):
        build_edit_spec(prompts, "reweight", tok, bos=BOS, eos=EOS)
    with pytest.raises(EditLabError, match="at least one target"):
        build_edit_spec(prompts[:1], "replace", tok, bos=BOS, eos=EOS)
    with pytest.raises(EditLabError, match="word:number"):
        parse_word_values("cat:lots", 2.0, "reweight")
    assert parse_word_values("cat, red car:0.5,", 2.0, "reweight") == [("cat", 2.0), ("red car", 0.5)]
