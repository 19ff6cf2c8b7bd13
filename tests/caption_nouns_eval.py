"""Scoring of the caption noun extractor against hand-labelled captions (used by tests and bench).

Data: ``tests/data/caption_nouns.json`` (50 captions, the development set) and
``tests/data/caption_nouns_heldout.json`` (25 captions written after the lexicon was frozen). Each case is
``{"caption": str, "nouns": [expected noun, ...]}`` with nouns in singular base form.

Matching: an extracted phrase matches an expected noun when one of the phrase's base forms (plural rules
of :func:`odise_model.vocabulary.singular_forms` on its last word) equals the noun, or when the two share
their head, i.e. one is the last words of the other (``brick wall`` ~ ``wall``, ``player`` ~
``tennis player``): a more or less specific name for the same thing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from odise_model.vocabulary import extract_nouns, singular_forms

DATA = Path(__file__).resolve().parent / "data"
SETS = {"dev": DATA / "caption_nouns.json", "heldout": DATA / "caption_nouns_heldout.json"}


def load_cases(name: str) -> list[dict[str, Any]]:
    """The cases of set ``name`` (``dev`` or ``heldout``)."""
    return json.loads(SETS[name].read_text(encoding="utf-8"))["captions"]


def _bases(phrase: str) -> set[str]:
    words = phrase.split(" ")
    return {" ".join([*words[:-1], form]) for form in singular_forms(words[-1])}


def matches(extracted: str, expected: str) -> bool:
    """Whether an extracted phrase names the expected noun (see the module doc)."""
    for base in _bases(extracted):
        if base == expected or base.endswith(" " + expected) or expected.endswith(" " + base):
            return True
    return False


def score(cases: list[dict[str, Any]], lexicon: frozenset[str]) -> dict[str, Any]:
    """Recall and precision of :func:`extract_nouns` over ``cases``.

    Returns:
        ``{"captions", "expected", "found", "recall", "extracted", "correct", "precision",
        "missed": [{"noun", "caption", "in_lexicon"}], "false_positives": [{"phrase", "caption"}]}``;
        recall = expected nouns matched / expected nouns, precision = extracted phrases that match an
        expected noun / extracted phrases.
    """
    expected = found = extracted = correct = 0
    missed, false_positives = [], []
    for case in cases:
        got = extract_nouns(case["caption"], lexicon)
        for noun in case["nouns"]:
            expected += 1
            if any(matches(g, noun) for g in got):
                found += 1
            else:
                missed.append({"noun": noun, "caption": case["caption"], "in_lexicon": noun in lexicon})
        for phrase in got:
            extracted += 1
            if any(matches(phrase, noun) for noun in case["nouns"]):
                correct += 1
            else:
                false_positives.append({"phrase": phrase, "caption": case["caption"]})
    return {
        "captions": len(cases),
        "expected": expected,
        "found": found,
        "recall": round(found / max(1, expected), 4),
        "extracted": extracted,
        "correct": correct,
        "precision": round(correct / max(1, extracted), 4),
        "missed": missed,
        "false_positives": false_positives,
    }
