"""Recall and precision of the caption noun extractor (``--caption``), and what it misses.

Runs :func:`odise_model.vocabulary.extract_nouns` over the hand-labelled captions of ``tests/data``
(``dev``: 50 captions; ``heldout``: 25 captions written after the lexicon was frozen, the honest number)
with two lexicons: the built-in vocabularies' synonyms only, and the default (plus
``configs/vocabularies/caption_nouns.txt``). Scoring rules: ``tests/caption_nouns_eval.py``.

    PYTHONPATH=$PWD python bench/caption_nouns.py      # -> bench/results/caption_nouns.json
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _common import machine, write_result  # noqa: E402
from caption_nouns_eval import load_cases, score  # noqa: E402

from odise_model.vocabulary import extract_nouns, noun_lexicon  # noqa: E402


def main() -> None:
    lexicons = {
        "builtin_synonyms_only": noun_lexicon(caption_nouns=False),
        "default": noun_lexicon(),
    }
    results = {}
    for name, lexicon in lexicons.items():
        results[name] = {"lexicon_phrases": len(lexicon)}
        for split in ("dev", "heldout"):
            results[name][split] = score(load_cases(split), lexicon)
            r = results[name][split]
            print(
                f"{name:24s} {split:8s} recall {r['recall']:.3f} ({r['found']}/{r['expected']})  "
                f"precision {r['precision']:.3f} ({r['correct']}/{r['extracted']})  "
                f"missed: {', '.join(m['noun'] for m in r['missed'])}"
            )
    captions = [c["caption"] for split in ("dev", "heldout") for c in load_cases(split)]
    lexicon = lexicons["default"]
    t0 = time.perf_counter()
    rounds = 20
    for _ in range(rounds):
        for caption in captions:
            extract_nouns(caption, lexicon)
    per_caption_ms = (time.perf_counter() - t0) / (rounds * len(captions)) * 1e3
    print(f"extract_nouns: {per_caption_ms:.3f} ms per caption")
    write_result(
        "caption_nouns",
        {
            "what": "caption noun extractor (odise_model.vocabulary.extract_nouns) vs hand-labelled captions",
            "command": "PYTHONPATH=$PWD python bench/caption_nouns.py",
            "machine": machine(),
            "notes": "dev: 50 captions (the supplementary noun list was written knowing them, so its dev "
            "numbers are optimistic); heldout: 25 captions written after the lexicon was frozen. Matching: "
            "plural base forms, or a shared head noun (brick wall ~ wall).",
            "results": results,
            "extract_ms_per_caption": round(per_caption_ms, 4),
        },
    )


if __name__ == "__main__":
    main()
