"""DreamBooth's rare-token identifier [V] (Ruiz et al., CVPR 2023, §4.2).

The paper samples rare tokens — short (at most 3 characters), from a band of the vocabulary's ids where
tokens are rare and weakly meaningful — and uses their text as the identifier, so fine-tuning binds the
subject to a token the text encoder has no strong prior for. For CLIP's byte-level BPE vocabulary (ids
ordered roughly by merge frequency), the band defaults to the last part of the vocabulary.
"""
from __future__ import annotations

import random
from typing import Callable, Mapping

from ..errors import EditLabError

# Common short English words (and the community default "sks", which has a meaning: a rifle): a rare-token
# identifier must not be one of them. Short list on purpose; the id band does most of the filtering.
COMMON_WORDS = frozenset("""
a an the and or but if of to in on at by for with from up out off as is am are was were be been being do does
did has had have he she it we you me him her us them my your his its our their this that who what why how
all any one two six ten car cat dog man men boy sun sea sky red big old new hot day way eye arm leg ear
toy box bag cup hat pen art war law god oil gas air ice fly run set put get let see say use try buy pay
sit win cut eat fix mix hit top low end age bed bus job key map net pet pig cow ant bee fox owl rat yes no
not now off own per via etc ago far few lot may yet too how sks
""".split())


def is_rare_candidate(text: str) -> bool:
    return 1 <= len(text) <= 3 and text.isascii() and text.isalpha() and text.lower() not in COMMON_WORDS


def rare_identifiers(vocab: Mapping[str, int], encode: Callable[[str], list[int]],
                     band: tuple[float, float] = (0.55, 0.95)) -> list[tuple[str, int]]:
    """Every (text, token id) of a whole-word token in the id band that the tokenizer encodes back as
    exactly that one token, and that is not a common word; sorted by id."""
    size = max(vocab.values()) + 1
    lo, hi = int(band[0] * size), int(band[1] * size)
    found = []
    for token, tid in vocab.items():
        if not (lo <= tid < hi) or not token.endswith("</w>"):
            continue
        text = token[: -len("</w>")]
        if is_rare_candidate(text) and encode(text) == [tid]:
            found.append((text, tid))
    return sorted(found, key=lambda t: t[1])


def pick_identifier(vocab: Mapping[str, int], encode: Callable[[str], list[int]], seed: int) -> tuple[str, int]:
    """A rare identifier, deterministic by seed."""
    candidates = rare_identifiers(vocab, encode)
    if not candidates:
        raise EditLabError("no rare single-token identifier found in this tokenizer's vocabulary; "
                           "type one in 'identifier'")
    return candidates[random.Random(seed).randrange(len(candidates))]


def check_identifier(text: str, encode: Callable[[str], list[int]]) -> list[int]:
    """A user-chosen identifier must be one token and not a common word; returns its token ids."""
    text = text.strip()
    if not text or " " in text:
        raise EditLabError(f"identifier {text!r} must be one short word without spaces (e.g. leave it empty "
                           "to pick a rare token)")
    ids = encode(text)
    if len(ids) != 1:
        raise EditLabError(f"identifier {text!r} is {len(ids)} tokens {ids} for this CLIP; DreamBooth needs one "
                           "rare token — leave it empty to pick one")
    if text.lower() in COMMON_WORDS:
        raise EditLabError(f"identifier {text!r} is a common word with a strong meaning; pick a rare token "
                           "(leave it empty to pick one)")
    return ids
