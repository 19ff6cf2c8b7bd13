"""Vocabularies for open-vocabulary panoptic segmentation.

A vocabulary is an ordered list of :class:`Category` objects. Each category has a stable integer id
(written into annotations), a display name, a list of synonyms (the classifier embeds every synonym
with the CLIP text tower and keeps the max logit over a class's synonyms) and a thing/stuff flag.
The order of the categories is the order of the classifier's logits.

Sources (see :func:`load_vocabulary`): a built-in name (:data:`BUILTIN_VOCABULARIES`: ``coco_panoptic``,
``ade20k_150``, ``lvis_1203``, ``ade20k_847``, ``pascal_context_459``, ``pascal_context_59``,
``pascal_voc_21``), a local ``classes.txt``, any fsspec URL, a list of strings, or a :class:`Vocabulary`.
Also: an inline string as the official demo's ``--vocab`` (:func:`parse_inline_vocabulary`), the nouns of a
caption (:func:`caption_vocabulary`), the official demo's merged list (:func:`demo_vocabulary`), and all of
these combined the way ``odise-annotate`` does (:func:`compose_vocabulary`).

The ``classes.txt`` format
--------------------------
UTF-8 text (a leading byte-order mark is allowed), one class per line::

    # comment lines and blank lines are ignored
    person, child, man, woman          <- synonyms separated by commas; the first is the display name
    sky, clouds [stuff]                <- trailing marker: [stuff], or [thing] (the default)

or, with explicit ids (all lines of a file, or none)::

    1: person, child, man, woman
    12: fire hydrant
    187: sky, clouds [stuff]

Rules:

- Whitespace around synonyms, ids and markers is stripped; whitespace inside a synonym is kept.
- ``<digits>:`` at the start of a line is an explicit id (>= 1). Without explicit ids, classes get the
  ids 1, 2, ... in file order. Mixing lines with and without an id in one file is an error. (So a
  name that itself starts with ``<digits>:``, like ``3:10 train``, needs an explicit id: ``1: 3:10 train``.)
- Markers are case-insensitive; only ``[thing]`` and ``[stuff]`` exist and only at the end of a line.
  Brackets elsewhere are part of the synonym (``"tv [old], crt"`` is fine).
- Errors (:class:`VocabularyError`, naming the source and the 1-based line): no classes at all; two
  classes with the same display name (case-insensitive) or the same id; one synonym in two classes
  (case-insensitive, as the CLIP tokenizer lower-cases text); an empty synonym (``a,,b``, a trailing
  comma, an id with no name); bytes that are not UTF-8 (the line of the first bad byte); a line
  that is only a marker; an unknown ``[tag]``.
- A synonym repeated *within* one class is allowed and kept (the official OpenSeg ADE20K list has
  ``kitchen range`` twice in class 72; keeping it keeps the synonym count equal to the official one).
- The directive line ``#! allow-repeats`` (anywhere in the file) lets classes share synonyms and display
  names. Some official lists do (ADE20K-847: ``dog`` is a synonym of 3 classes and ``pot`` the name of 2;
  PASCAL-Context-459: ``rug``, ``stone``) and so does the demo's concatenation of COCO + ADE + LVIS;
  the classifier then gives every class that holds a synonym the same logit for it. Without the
  directive a repeat is an error: in a hand-written list it is almost always a mistake.

Inline vocabularies and lists
-----------------------------
As the official demo's ``--vocab "a1,a2;b1,b2"``: ``;`` separates classes, ``,`` separates synonyms (the
first is the display name), an optional trailing ``[stuff]`` / ``[thing]`` marker, whitespace trimmed, ids
1..n in order (no ``<id>:`` prefix, no comments). A list of strings is the same: each string holds one or
more ``;``-separated classes (``["person, man", "sky [stuff]"]`` == ``"person, man; sky [stuff]"``). One
trailing ``;`` is allowed; any other empty class is an error. Errors name the class's 1-based position
and its text (``vocab: class 2 ('dog,,puppy'): empty synonym ...``). Every line of a file and every
inline class goes through the same class parser (:func:`_parse_class`).

Caption nouns
-------------
:func:`extract_nouns` finds the nouns of a caption without any download (the official demo runs NLTK's
tagger and chunker, whose models are downloaded at run time). It matches the caption's words against a
lexicon (:func:`noun_lexicon`): every synonym of the built-in vocabularies (about 2,900 phrases;
parenthesised qualifiers such as ``bat (animal)`` dropped) plus ``configs/vocabularies/caption_nouns.txt``
(about 160 frequent caption nouns no list has: places, people by role, body parts, food), longest phrase
first (``fire hydrant`` before ``fire``), with English plurals (``-s``, ``-es``, ``-ies``, ``-ves``,
irregular ones such as ``men``, ``children``, ``feet``) and possessives (``dog's``). It skips a few words
that are mostly verbs in captions when the context says so (``a man stands on``, ``people watch the``,
``can``) and place / quantity nouns (``side``, ``top``, ``group``).

Measured by ``bench/caption_nouns.py`` (``bench/results/caption_nouns.json``) on 25 held-out COCO-style
captions written after the lexicon was frozen: recall 0.91, precision 0.95 (built-in synonyms alone: recall
0.72). Known misses: nouns outside the lexicon (held-out: ``square``, ``motorcyclist``, ``spaghetti``,
``sailboat``, ``barn``, ``traffic``, ``tulip``, ``fireman``; any rarer noun likewise); adjectives are
not kept (``black dog`` gives ``dog``, where the demo's NLTK chunks keep ``black dog``); a noun used as a
modifier becomes a class of its own (``brick building`` gives ``brick`` and ``building``); a word that is
both a verb and a noun is only guessed from its neighbours.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from odise_model.resources import config_file

__all__ = [
    "BUILTIN_VOCABULARIES",
    "DEMO_VOCABULARIES",
    "Category",
    "Vocabulary",
    "VocabularyError",
    "caption_vocabulary",
    "coco_seen_synonyms",
    "compose_vocabulary",
    "demo_vocabulary",
    "extract_nouns",
    "inline_classes",
    "load_vocabulary",
    "matching_builtin_vocabulary",
    "noun_lexicon",
    "parse_inline_vocabulary",
    "parse_vocabulary",
    "singular_forms",
]

logger = logging.getLogger(__name__)

BUILTIN_VOCABULARIES: tuple[str, ...] = (
    "coco_panoptic",
    "ade20k_150",
    "lvis_1203",
    "ade20k_847",
    "pascal_context_459",
    "pascal_context_59",
    "pascal_voc_21",
)
"""Names accepted by :func:`load_vocabulary`; data in ``configs/vocabularies/<name>.txt`` (each file's
header states its source, ids, thing/stuff rule and licence)."""

DEMO_VOCABULARIES: tuple[str, ...] = ("coco_panoptic", "ade20k_150", "lvis_1203")
"""The official demo's default label sets (``--label COCO ADE LVIS``), in its order."""

_HASH_VERSION = "odise-vocabulary-v1"
_ID_PREFIX = re.compile(r"^(\d+)\s*:(.*)$", re.DOTALL)
_TRAILING_TAG = re.compile(r"\[([^\[\]]*)\]\s*$")
_MARKERS = {"thing": True, "stuff": False}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_ALLOW_REPEATS = re.compile(r"^#!\s*allow-repeats\s*$", re.IGNORECASE)


class VocabularyError(ValueError):
    """A vocabulary that cannot be used; the message names the source and the 1-based line.

    Attributes:
        source: the file path, URL or description (``"<string>"``, ``"<list>"``) the text came from,
            or None when the error is not tied to a source.
        line: 1-based line number (for an inline vocabulary or a list: the class's 1-based position) of
            the offending entry, or None when no single line is to blame (e.g. an empty vocabulary).
        item: for an inline vocabulary or a list, the offending class's text (the message then reads
            ``"<source>: class <line> (<text>): ..."``); None for files.
    """

    def __init__(
        self, message: str, *, source: str | None = None, line: int | None = None, item: str | None = None
    ) -> None:
        self.source = source
        self.line = line
        self.item = item
        self.reason = message
        where = ""
        if item is not None:
            where = f"{source or 'vocabulary'}: class {line} ({item!r}): "
        elif source is not None:
            where = f"{source}:{line}: " if line is not None else f"{source}: "
        elif line is not None:
            where = f"line {line}: "
        super().__init__(where + message)


@dataclass(frozen=True)
class Category:
    """One class of a vocabulary.

    Attributes:
        id: stable integer id (>= 1) written into annotations; 0 is left for "unlabeled".
        name: display name; always equal to ``synonyms[0]``.
        synonyms: the text prompts embedded by the classifier, display name first. Each is a
            non-empty string without surrounding whitespace, commas or line breaks.
        isthing: True for countable objects (one segment per instance), False for stuff
            (one segment per class and image).
    """

    id: int
    name: str
    synonyms: tuple[str, ...]
    isthing: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.synonyms, str) or not isinstance(self.synonyms, Sequence):
            raise VocabularyError(f"category {self.name!r}: synonyms must be a sequence of strings")
        object.__setattr__(self, "synonyms", tuple(self.synonyms))
        if isinstance(self.id, bool) or not isinstance(self.id, int) or self.id < 1:
            raise VocabularyError(f"category {self.name!r}: id must be an integer >= 1, got {self.id!r}")
        if not isinstance(self.isthing, bool):
            raise VocabularyError(f"category {self.name!r}: isthing must be a bool, got {self.isthing!r}")
        if not self.synonyms:
            raise VocabularyError(f"category {self.name!r}: needs at least one synonym")
        for synonym in self.synonyms:
            if not isinstance(synonym, str) or not synonym.strip():
                raise VocabularyError(f"category {self.name!r}: empty synonym {synonym!r}")
            if synonym != synonym.strip() or any(c in synonym for c in ",\r\n"):
                raise VocabularyError(
                    f"category {self.name!r}: synonym {synonym!r} has surrounding whitespace, "
                    "a comma or a line break"
                )
        if self.name != self.synonyms[0]:
            raise VocabularyError(
                f"category {self.name!r}: the name must be the first synonym, got {self.synonyms[0]!r}"
            )


@dataclass(frozen=True)
class Vocabulary:
    """An ordered, validated list of categories.

    The order is the order of the classifier's outputs (logit ``k`` belongs to ``categories[k]``).
    Ids are unique. Display names (case-insensitive) and synonyms (case-insensitive, across classes)
    are unique too unless ``allow_repeats`` (see the module doc). Two vocabularies are equal when
    their categories are equal; ``source`` and ``allow_repeats`` are not compared.

    Attributes:
        categories: the classes, in classifier order.
        source: where the vocabulary came from (path, URL, built-in name, ``"<list>"``, ...).
        allow_repeats: classes may share synonyms and display names (``#! allow-repeats`` in a file).
    """

    categories: tuple[Category, ...]
    source: str = field(default="<memory>", compare=False)
    allow_repeats: bool = field(default=False, compare=False)
    _by_id: dict[int, Category] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(self.categories))
        _check_categories(self.categories, self.source, lines=None, allow_repeats=self.allow_repeats)
        object.__setattr__(self, "_by_id", {c.id: c for c in self.categories})

    # --- sequence protocol -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __getitem__(self, index: int) -> Category:
        """The category at position ``index`` (classifier order), not the one with id ``index``."""
        return self.categories[index]

    # --- views -------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Display names in classifier order."""
        return [c.name for c in self.categories]

    @property
    def ids(self) -> list[int]:
        """Category ids in classifier order (``ids[k]`` is the id of logit ``k``)."""
        return [c.id for c in self.categories]

    def by_id(self, cat_id: int) -> Category:
        """The category with id ``cat_id``; ``KeyError`` naming the id and source if there is none."""
        try:
            return self._by_id[cat_id]
        except KeyError:
            raise KeyError(f"no category with id {cat_id} in vocabulary {self.source}") from None

    def flat_synonyms(self) -> tuple[list[str], list[int]]:
        """All synonyms in order, and for each the index (classifier order) of its category.

        This is the layout of the classifier's text-embedding table: ``len(synonyms)`` rows, and
        the class logit ``k`` is the max over rows ``i`` with ``class_index[i] == k``.
        """
        synonyms: list[str] = []
        class_index: list[int] = []
        for k, category in enumerate(self.categories):
            synonyms.extend(category.synonyms)
            class_index.extend([k] * len(category.synonyms))
        return synonyms, class_index

    # --- serialisation -----------------------------------------------------------------------------
    def sha256(self) -> str:
        """Hex SHA-256 of the canonical content: order, ids, synonyms and thing/stuff flags.

        Independent of how the file was written (comments, blank lines, spacing, explicit or implicit
        ids, an explicit ``[thing]``) and of ``source``. Use it as a cache key for text embeddings
        and to record which vocabulary produced an annotation.
        """
        content = [[c.id, list(c.synonyms), c.isthing] for c in self.categories]
        payload = json.dumps([_HASH_VERSION, content], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def to_text(self) -> str:
        """Canonical ``classes.txt`` text: ``"<id>: syn1, syn2 [stuff]"`` per line, ids explicit.

        ``parse_vocabulary(v.to_text()) == v`` always holds. ``[thing]`` is written only where it is
        needed to keep a last synonym that itself ends in ``[...]`` from being read as a marker;
        ``#! allow-repeats`` only when classes do share synonyms or display names.
        """
        lines = ["#! allow-repeats"] if self.has_repeats() else []
        for c in self.categories:
            line = f"{c.id}: " + ", ".join(c.synonyms)
            if not c.isthing:
                line += " [stuff]"
            elif _TRAILING_TAG.search(c.synonyms[-1]):
                line += " [thing]"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def has_repeats(self) -> bool:
        """True when two classes share a synonym or a display name (case-insensitive)."""
        names = [c.name.casefold() for c in self.categories]
        if len(set(names)) < len(names):
            return True
        seen: set[str] = set()
        for c in self.categories:
            own = {s.casefold() for s in c.synonyms}
            if own & seen:
                return True
            seen |= own
        return False

    def as_things(self) -> Vocabulary:
        """The same classes, every one a thing (the demo treats the user's classes as things)."""
        cats = tuple(dataclasses.replace(c, isthing=True) for c in self.categories)
        return Vocabulary(cats, source=self.source, allow_repeats=self.allow_repeats)

    def coco_categories(self) -> list[dict[str, Any]]:
        """Categories for a COCO / COCO-panoptic JSON export, in classifier order.

        Returns:
            ``[{"id": int, "name": str, "isthing": 0 | 1, "synonyms": [str, ...]}, ...]``.
            No ``supercategory`` is written: vocabularies do not carry one.
        """
        return [
            {"id": c.id, "name": c.name, "isthing": int(c.isthing), "synonyms": list(c.synonyms)}
            for c in self.categories
        ]

    # --- combination -------------------------------------------------------------------------------
    def merge(self, other: Vocabulary) -> Vocabulary:
        """``self``'s classes, then those of ``other`` that are new.

        Rules, applied to ``other``'s classes in order:

        1. A class of ``other`` that shares any synonym (case-insensitive; the display name is a
           synonym) with a class of ``self`` is dropped as a whole: ``self`` wins.
        2. A kept class keeps its id unless ``self`` already uses that id; such colliding classes get
           fresh ids ``max + 1, max + 2, ...`` in ``other``'s order, where ``max`` is the largest id
           among ``self``'s classes and ``other``'s kept classes that did not collide.

        ``self``'s ids and order never change, so annotations made with ``self`` stay valid. The result
        allows repeats when either side does (``other``'s kept classes may share synonyms among
        themselves, as in ``ade20k_847``).
        """
        if not isinstance(other, Vocabulary):
            raise TypeError(f"merge expects a Vocabulary, got {type(other).__name__}")
        taken_synonyms = {s.casefold() for c in self.categories for s in c.synonyms}
        self_ids = {c.id for c in self.categories}
        kept: list[Category] = []
        dropped: list[str] = []
        for c in other.categories:
            if any(s.casefold() in taken_synonyms for s in c.synonyms):
                dropped.append(c.name)
            else:
                kept.append(c)
        if dropped:
            logger.info(
                "merging %s into %s: dropped %d class(es) whose synonyms are already present: %s",
                other.source,
                self.source,
                len(dropped),
                ", ".join(dropped),
            )
        next_id = max(self_ids | {c.id for c in kept if c.id not in self_ids}) + 1
        merged = list(self.categories)
        for c in kept:
            if c.id in self_ids:
                c = dataclasses.replace(c, id=next_id)
                next_id += 1
            merged.append(c)
        return Vocabulary(
            tuple(merged),
            source=f"{self.source}+{other.source}",
            allow_repeats=self.allow_repeats or other.allow_repeats,
        )


# --- validation and parsing --------------------------------------------------------------------------
def _check_categories(
    categories: Sequence[Category],
    source: str,
    lines: Sequence[int] | None,
    *,
    allow_repeats: bool = False,
    items: Sequence[str] | None = None,
) -> None:
    """Raise :class:`VocabularyError` unless ids are unique, and names and synonyms too (unless
    ``allow_repeats``).

    ``lines[k]`` is the 1-based line of ``categories[k]`` (None: no line numbers known); with ``items``
    (inline vocabularies and lists) ``lines[k]`` is the class's position and ``items[k]`` its text.
    """
    if not categories:
        raise VocabularyError("empty vocabulary (no classes)", source=source)
    ids: dict[int, int] = {}
    names: dict[str, int] = {}
    owners: dict[str, int] = {}
    unit = "class" if items is not None else "line"

    def where(j: int) -> str:
        return f"{unit} {lines[j]}" if lines is not None else f"position {j}"

    for k, c in enumerate(categories):
        if not isinstance(c, Category):
            raise VocabularyError(f"expected a Category, got {type(c).__name__}", source=source)
        line = lines[k] if lines is not None else None
        item = items[k] if items is not None else None
        if c.id in ids:
            raise VocabularyError(
                f"duplicate class id {c.id} ({c.name!r}; already used by "
                f"{categories[ids[c.id]].name!r} on {where(ids[c.id])})",
                source=source,
                line=line,
                item=item,
            )
        ids[c.id] = k
        if allow_repeats:
            continue
        key = c.name.casefold()
        if key in names:
            raise VocabularyError(
                f"duplicate class {c.name!r} (already defined on {where(names[key])})",
                source=source,
                line=line,
                item=item,
            )
        for synonym in dict.fromkeys(s.casefold() for s in c.synonyms):
            if synonym in owners:
                j = owners[synonym]
                raise VocabularyError(
                    f"synonym {synonym!r} of class {c.name!r} is also a synonym of class "
                    f"{categories[j].name!r} ({where(j)})",
                    source=source,
                    line=line,
                    item=item,
                )
        names[key] = k
        for synonym in c.synonyms:
            owners[synonym.casefold()] = k


def _decode(data: bytes, source: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise VocabularyError(
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            source=source,
            line=line,
        ) from None
    return text.removeprefix("\ufeff")


def _split_synonyms(body: str, source: str, line: int, item: str | None = None) -> tuple[str, ...]:
    synonyms = tuple(s.strip() for s in body.split(","))
    if any(not s for s in synonyms):
        raise VocabularyError(
            f"empty synonym in {body.strip()!r} (two commas in a row, or a leading/trailing comma)",
            source=source,
            line=line,
            item=item,
        )
    return synonyms


def _split_marker(line: str, source: str, number: int, item: str | None = None) -> tuple[str, bool]:
    """``(text without its trailing [thing] / [stuff] marker, isthing)``; default thing."""
    tag = _TRAILING_TAG.search(line)
    if not tag:
        return line, True
    marker = tag.group(1).strip().lower()
    if marker not in _MARKERS:
        raise VocabularyError(
            f"unknown tag [{tag.group(1)}]; only [thing] and [stuff] are allowed",
            source=source,
            line=number,
            item=item,
        )
    text = line[: tag.start()].strip()
    if not text:
        raise VocabularyError(
            f"a [{marker}] marker without a class name", source=source, line=number, item=item
        )
    return text, _MARKERS[marker]


def _parse_class(text: str, cat_id: int, source: str, number: int, item: str | None = None) -> Category:
    """One class from ``"syn1, syn2 [stuff]"`` (no id prefix): the body of a file line or an inline class.

    ``number`` is the line (files) or the class position (inline / lists, with ``item`` = its text), for
    errors.
    """
    # 1. optional trailing marker
    text, isthing = _split_marker(text.strip(), source, number, item)
    # 2. synonyms
    synonyms = _split_synonyms(text, source, number, item)
    try:
        return Category(cat_id, synonyms[0], synonyms, isthing)
    except VocabularyError as exc:  # e.g. a lone "\r" inside a line
        raise VocabularyError(exc.reason, source=source, line=number, item=item) from None


def parse_vocabulary(text: str | bytes, source: str = "<string>") -> Vocabulary:
    """Parse ``classes.txt`` content (see the module docstring for the format).

    Args:
        text: the file content; bytes must be UTF-8.
        source: the file path or URL, used in error messages and kept as ``Vocabulary.source``.

    Raises:
        VocabularyError: with ``.source`` and ``.line`` set, on any format or uniqueness error.
    """
    if isinstance(text, bytes | bytearray):
        text = _decode(bytes(text), source)
    elif isinstance(text, str):
        text = text.removeprefix("\ufeff")
    else:
        raise TypeError(f"parse_vocabulary expects str or bytes, got {type(text).__name__}")

    categories: list[Category] = []
    lines: list[int] = []
    explicit_mode: bool | None = None
    allow_repeats = False
    # Split on "\n" only (not str.splitlines) so line numbers match editors and the byte count above.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if line.startswith("#"):
            allow_repeats = allow_repeats or bool(_ALLOW_REPEATS.match(line))
            continue
        if not line:
            continue

        # 1. optional explicit id
        cat_id: int | None = None
        match = _ID_PREFIX.match(line)
        if match:
            cat_id = int(match.group(1))
            line = match.group(2).strip()
            if cat_id < 1:
                raise VocabularyError(f"class id must be >= 1, got {cat_id}", source=source, line=number)
        explicit = cat_id is not None
        if explicit_mode is None:
            explicit_mode = explicit
        elif explicit != explicit_mode:
            raise VocabularyError(
                "mixed explicit ids ('<id>: name') and lines without an id; use one style per file",
                source=source,
                line=number,
            )
        if not line:
            raise VocabularyError("an id without a class name", source=source, line=number)

        # 2. marker and synonyms
        category_id = cat_id if cat_id is not None else len(categories) + 1
        categories.append(_parse_class(line, category_id, source, number))
        lines.append(number)

    _check_categories(categories, source, lines, allow_repeats=allow_repeats)
    return Vocabulary(tuple(categories), source=source, allow_repeats=allow_repeats)


def inline_classes(spec: str | Sequence[str], source: str = "vocab") -> list[str]:
    """The class texts of an inline vocabulary: ``"a1, a2; b1 [stuff]"`` -> ``["a1, a2", "b1 [stuff]"]``.

    ``spec`` is one string or a list of strings, each holding one or more ``;``-separated classes; every
    class is stripped. One trailing ``;`` (per string) is allowed; any other empty class is an error.

    Raises:
        VocabularyError: an empty class, a line break or a non-string item (naming its position).
        TypeError: ``spec`` is neither a string nor a list of strings.
    """
    if isinstance(spec, str):
        parts: list[Any] = [spec]
    elif isinstance(spec, Sequence) and not isinstance(spec, bytes | bytearray):
        parts = list(spec)
    else:
        raise TypeError(f"an inline vocabulary is a string or a list of strings, got {type(spec).__name__}")
    classes: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise VocabularyError(
                f"expected a string, got {type(part).__name__}",
                source=source,
                line=len(classes) + 1,
                item=str(part),
            )
        pieces = part.split(";")
        if len(pieces) > 1 and not pieces[-1].strip():
            pieces = pieces[:-1]  # "a; b;" - one trailing separator
        for piece in pieces:
            position = len(classes) + 1
            if not piece.strip():
                raise VocabularyError(
                    "empty class (two ';' in a row, a leading ';' or an empty string)",
                    source=source,
                    line=position,
                    item=piece,
                )
            if "\n" in piece or "\r" in piece:
                raise VocabularyError(
                    "a class must not contain a line break", source=source, line=position, item=piece
                )
            classes.append(piece.strip())
    return classes


def parse_inline_vocabulary(spec: str | Sequence[str], source: str = "vocab") -> Vocabulary:
    """An inline vocabulary, as the official demo's ``--vocab "a1,a2;b1,b2"`` (format: module doc).

    Args:
        spec: ``"person, man; sky [stuff]"`` or ``["person, man", "sky [stuff]"]`` (a list item may hold
            several ``;``-separated classes).
        source: the name used in errors and kept as ``Vocabulary.source`` (``vocab``, ``<list>``).

    Returns:
        the classes with ids 1..n in order; a class is a thing unless marked ``[stuff]``.

    Raises:
        VocabularyError: naming the class position and its text (``vocab: class 2 ('dog,,puppy'): ...``);
            also for two classes with the same name or synonym, and for no class at all.
    """
    classes = inline_classes(spec, source)
    categories = [
        _parse_class(text, number, source, number, item=text) for number, text in enumerate(classes, start=1)
    ]
    _check_categories(categories, source, list(range(1, len(categories) + 1)), items=classes)
    return Vocabulary(tuple(categories), source=source)


# --- loading -----------------------------------------------------------------------------------------
@functools.cache
def _builtin(name: str) -> Vocabulary:
    path = config_file("vocabularies", name + ".txt")
    vocabulary = parse_vocabulary(path.read_bytes(), source=str(path))
    return dataclasses.replace(vocabulary, source=name)


def _read_url(url: str, storage_options: dict | None) -> bytes:
    import fsspec  # lazy: only URLs need it

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise FileNotFoundError(errno.ENOENT, "vocabulary file not found", url) from exc


def load_vocabulary(
    spec: str | os.PathLike | Sequence[str] | Vocabulary,
    *,
    merge_with: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
) -> Vocabulary:
    """Load a vocabulary from any supported source.

    Args:
        spec: one of
            - a :class:`Vocabulary`: returned as is;
            - a built-in name from :data:`BUILTIN_VOCABULARIES` (checked before paths, so a local
              file must be given with a suffix or a directory, e.g. ``./coco_panoptic``);
            - a URL ``scheme://...`` read with fsspec (``s3://``, ``gs://``, ``https://``, ``file://``);
            - a local path to a ``classes.txt`` file;
            - a list/tuple of strings: classes as in an inline vocabulary (:func:`parse_inline_vocabulary`:
              commas separate synonyms, ``;`` classes, an optional trailing ``[stuff]`` / ``[thing]``
              marker, default thing), ids 1..n (no explicit ids).
        merge_with: built-in names (or paths/URLs) whose classes are merged after ``spec``'s with
            :meth:`Vocabulary.merge`, in the given order.
        storage_options: fsspec options for URLs (credentials, endpoint); ignored for local paths.

    Raises:
        FileNotFoundError: a path or URL that does not exist (the error names it).
        VocabularyError: malformed content (the error names the source and the line).
        TypeError: an unsupported ``spec`` type.
    """
    vocabulary = _load_one(spec, storage_options)
    if merge_with is not None:
        extras = [merge_with] if isinstance(merge_with, str | os.PathLike) else list(merge_with)
        for extra in extras:
            vocabulary = vocabulary.merge(_load_one(extra, storage_options))
    return vocabulary


def _load_one(spec: Any, storage_options: dict | None) -> Vocabulary:
    if isinstance(spec, Vocabulary):
        return spec
    if isinstance(spec, str | os.PathLike):
        text = os.fspath(spec)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        if isinstance(spec, str) and spec in BUILTIN_VOCABULARIES:
            return _builtin(spec)
        if _URL.match(text):
            return parse_vocabulary(_read_url(text, storage_options), source=text)
        path = Path(text)
        if not path.is_file():
            hint = ""
            if os.sep not in text and "." not in path.name:
                hint = f" (built-in vocabularies: {', '.join(BUILTIN_VOCABULARIES)})"
            reason = "is a directory, not a vocabulary file" if path.is_dir() else "vocabulary file not found"
            raise FileNotFoundError(errno.ENOENT, reason + hint, text)
        return parse_vocabulary(path.read_bytes(), source=text)
    if isinstance(spec, Sequence) and not isinstance(spec, bytes | bytearray):
        return parse_inline_vocabulary(spec, source="<list>")
    raise TypeError(
        "load_vocabulary expects a built-in name, a path or URL, a list of strings or a Vocabulary; "
        f"got {type(spec).__name__}"
    )


@functools.lru_cache(maxsize=1)
def coco_seen_synonyms() -> frozenset[str]:
    """Every synonym of the built-in COCO panoptic vocabulary (254 strings).

    ODISE is trained on COCO; a test class counts as *seen* when any of its synonyms is in this set
    (the classifier then fuses with the "seen" weight alpha, otherwise with beta).
    """
    return frozenset(s for c in _builtin("coco_panoptic") for s in c.synonyms)


_NAME_NOISE = frozenset({"merged", "other", "stuff", "things", "thing"})


def _name_words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.lower()) if w and w not in _NAME_NOISE}


def matching_builtin_vocabulary(categories: Any, *, min_name_agreement: float = 0.8) -> str | None:
    """The built-in vocabulary a dataset's categories are, or ``None``.

    ``categories`` is COCO-style: ``{id: {"name", "isthing"}}`` or a list of ``{"id", "name", "isthing"}``.
    A built-in matches when it has exactly the same category ids with the same thing / stuff flags,
    and for at least ``min_name_agreement`` of the categories the dataset name shares a word with one
    of the built-in synonyms (COCO's ``wall-other-merged`` agrees with ``wall``; suffixes such as
    ``-merged`` / ``-other`` / ``-stuff`` are ignored). Used to train and score with the built-in's
    prompt-engineered synonyms, as the official model does, when a dataset's ``categories.json``
    carries names only.
    """
    if isinstance(categories, Mapping):
        items = {int(k): v for k, v in categories.items()}
    else:
        items = {int(c["id"]): c for c in categories}
    if not items:
        return None
    for name in BUILTIN_VOCABULARIES:
        builtin = {c.id: c for c in _builtin(name)}
        if set(builtin) != set(items):
            continue
        if any(bool(items[i].get("isthing", 1)) != builtin[i].isthing for i in items):
            continue
        agree = 0
        for i, info in items.items():
            words = set().union(*(_name_words(s) for s in builtin[i].synonyms))
            agree += bool(_name_words(str(info.get("name", ""))) & words)
        if agree >= min_name_agreement * len(items):
            return name
    return None


# --- caption nouns -----------------------------------------------------------------------------------
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_QUALIFIER = re.compile(r"\([^()]*\)")
_IRREGULAR_PLURALS = {
    "men": "man",
    "women": "woman",
    "children": "child",
    "people": "person",
    "feet": "foot",
    "teeth": "tooth",
    "mice": "mouse",
    "geese": "goose",
    "oxen": "ox",
    "dice": "die",
    "cacti": "cactus",
}
# Determiners and numbers: the next word is a noun or an adjective, not a verb.
_DETERMINERS = frozenset(
    "a an the this that these those his her its their our my your some any each every another no "
    "one two three four five six seven eight nine ten several many few".split()
)
# After these a word is a verb ("to watch", "they stand", "can fly") ...
_VERB_BEFORE = frozenset("to can will would may might must should could they we i you he she it who".split())
# ... and before these it most likely is one ("stands on", "watch the", "cross the street").
_VERB_AFTER = _DETERMINERS | frozenset(
    "on in at into onto over under across through around near by with up down off out away while "
    "him them it".split()
)
# Lexicon words that are often verbs in captions; kept only when the context does not say "verb".
_VERB_OR_NOUN = frozenset(
    "stand stands watch watches fly flies cross crosses hold holds park parks plant plants board boards "
    "head heads face faces fish rest rests "
    "duck ducks bear bears sink sinks tie ties file files slide slides swing swings ski skis rock rocks "
    "light lights wave waves iron irons shower showers press presses fan fans pet pets box boxes "
    "train trains track tracks seat seats".split()
)
# Modal verbs that are also lexicon nouns: kept only right after a determiner ("a can of soda").
_MODAL_NOUNS = frozenset({"can"})
# Nouns of place and quantity that never name a thing to segment ("the side of the road").
_RELATIONAL = frozenset(
    "side sides top front back middle edge end part parts piece pieces lot lots couple pair group bunch "
    "view picture photo image close".split()
)


def singular_forms(word: str) -> list[str]:
    """Candidate base forms of an English word, the word itself first (simple rules, no dictionary).

    ``"benches"`` -> ``["benches", "bench", "benche"]``; ``"knives"`` -> ``[..., "knife"]``;
    ``"men"`` -> ``["men", "man"]``; ``"dog's"`` -> ``["dog's", "dog"]``. Callers keep the first form
    found in their lexicon.
    """
    out = [word]
    if word.endswith("'s") and len(word) > 2:
        word = word[:-2]
        out.append(word)
    if word in _IRREGULAR_PLURALS:
        out.append(_IRREGULAR_PLURALS[word])
    if len(word) > 3 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        out += [word[:-3] + "f", word[:-3] + "fe"]
    if len(word) > 3 and word.endswith("es"):
        out.append(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    return list(dict.fromkeys(out))


def _normalise_phrase(text: str) -> str:
    """Lower-cased words joined by single spaces, parenthesised qualifiers dropped: ``"Bat (animal)"`` -> ``"bat"``."""
    return " ".join(_WORD.findall(_QUALIFIER.sub(" ", text.lower())))


CAPTION_NOUNS_FILE = "caption_nouns"
"""``configs/vocabularies/caption_nouns.txt``: frequent caption nouns that no built-in list has (places,
people by role, body parts, food, ...), in the ``classes.txt`` format; part of the default lexicon."""


@functools.lru_cache(maxsize=8)
def _builtin_lexicon(names: tuple[str, ...], caption_nouns: bool) -> frozenset[str]:
    vocabularies = [_load_one(name, None) for name in names]
    if caption_nouns:
        path = config_file("vocabularies", CAPTION_NOUNS_FILE + ".txt")
        vocabularies.append(parse_vocabulary(path.read_bytes(), source=str(path)))
    phrases = (_normalise_phrase(s) for v in vocabularies for c in v for s in c.synonyms)
    return frozenset(p for p in phrases if p)


def noun_lexicon(
    builtin: Sequence[str] = BUILTIN_VOCABULARIES, extra: Iterable[str] = (), *, caption_nouns: bool = True
) -> frozenset[str]:
    """Phrases recognised as nouns by :func:`extract_nouns`: every synonym of the ``builtin`` vocabularies
    (by default all of them, about 2,900 phrases), the shipped :data:`CAPTION_NOUNS_FILE` list (about
    160 more) unless ``caption_nouns=False``, and ``extra``; lower-cased, words joined by one space,
    parenthesised qualifiers dropped (``bat (animal)`` -> ``bat``)."""
    extras = (_normalise_phrase(e) for e in extra)
    return _builtin_lexicon(tuple(builtin), caption_nouns) | frozenset(e for e in extras if e)


def _is_noun(word: str | None, lexicon: frozenset[str]) -> bool:
    return word is not None and any(form in lexicon for form in singular_forms(word))


def _looks_like_verb(word: str, before: str | None, after: str | None, lexicon: frozenset[str]) -> bool:
    """A guess from the neighbours: ``they watch``, ``to fly``; ``man stands on`` (noun, word, then a
    determiner or preposition); but not ``the stands``, ``a large wave in``."""
    if word in _MODAL_NOUNS:
        return before not in _DETERMINERS
    if word not in _VERB_OR_NOUN or before in _DETERMINERS:
        return False
    return before in _VERB_BEFORE or (after in _VERB_AFTER and _is_noun(before, lexicon))


def extract_nouns(caption: str, lexicon: frozenset[str] | None = None, max_words: int = 6) -> list[str]:
    """Lexicon phrases mentioned in ``caption``, longest match first, in caption order, without repeats.

    ``"Three kittens sit on benches near the fire hydrants."`` -> ``["kitten", "benches", "fire hydrant"]``:
    a plural is matched through its base form and the lexicon's form is returned (``benches`` is itself
    a synonym of COCO's bench, so it stays), ``fire hydrant`` is found before ``fire``. A noun used as
    a modifier counts too (``brick building`` gives ``brick`` and ``building``). A single word that is often a verb is skipped when its neighbours say it is one (``"a man stands on"``,
    ``"they watch the game"``); ``can`` counts only after a determiner; nouns such as ``side``,
    ``top``, ``group`` never count. See the module doc for what it misses.

    Args:
        caption: any English text.
        lexicon: phrases from :func:`noun_lexicon` (default: ``noun_lexicon()``).
        max_words: longest phrase tried, in words.
    """
    lexicon = noun_lexicon() if lexicon is None else lexicon
    tokens = _WORD.findall(caption.lower())
    found: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(max_words, len(tokens) - i), 0, -1):
            head, last = tokens[i : i + n - 1], tokens[i + n - 1]
            match = next(
                (" ".join([*head, s]) for s in singular_forms(last) if " ".join([*head, s]) in lexicon), None
            )
            if match is None:
                continue
            if n == 1:
                before = tokens[i - 1] if i > 0 else None
                after = tokens[i + 1] if i + 1 < len(tokens) else None
                if last in _RELATIONAL or _looks_like_verb(last, before, after, lexicon):
                    continue
            if match not in found:
                found.append(match)
            i += n
            break
        else:
            i += 1
    return found


def caption_vocabulary(
    caption: str, lexicon: frozenset[str] | None = None, source: str = "caption"
) -> Vocabulary:
    """One class per noun of ``caption`` (:func:`extract_nouns`), as the demo's ``--caption``: each noun
    is a one-synonym thing class, ids 1..n in caption order.

    Raises:
        VocabularyError: the caption names no noun of the lexicon (the message quotes the caption).
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption is a string, got {type(caption).__name__}")
    nouns = extract_nouns(caption, lexicon)
    if not nouns:
        raise VocabularyError(
            f"no known noun in caption {caption!r}: the caption extractor knows the synonyms of the built-in "
            "vocabularies and a list of common caption nouns only; give the classes inline instead "
            "(e.g. --vocab 'sand dune; dune buggy')",
            source=source,
        )
    return Vocabulary(tuple(Category(k, n, (n,)) for k, n in enumerate(nouns, start=1)), source=source)


# --- combining sources: what odise-annotate does ---------------------------------------------------------
def demo_vocabulary(
    user: Vocabulary | None = None,
    lists: Sequence[str | os.PathLike | Vocabulary] = DEMO_VOCABULARIES,
    *,
    storage_options: dict | None = None,
) -> Vocabulary:
    """The official demo's label list (``demo/demo.py``): the user's classes, then the ``lists``.

    As the demo builds it (facts from NVlabs/ODISE ``demo/demo.py``):

    1. thing classes first: the user's classes (every one made a thing, whatever its marker), then
       the thing classes of each list in order (COCO's 80, ADE20K-150's 100, LVIS's 1203);
    2. then the stuff classes of each list in order (COCO's 53, ADE20K-150's 50);
    3. ids are the positions 1..n in that order (the demo's contiguous ids, plus 1: 0 is unlabeled);
    4. nothing is deduplicated: a class whose synonyms repeat an earlier class's (COCO's and ADE's
       ``person``; 192 of the 1486 default classes share a synonym with an earlier one) is kept, as in
       the demo, so the classifier sees exactly the demo's labels. The result allows repeats.

    With the default lists and no user classes: 1486 classes (1383 things, then 103 stuff classes).
    :func:`compose_vocabulary` gathers the user's classes (file, inline, caption).
    """
    parts = [_load_one(x, storage_options) for x in lists]
    things: list[Category] = list(user.as_things()) if user is not None else []
    stuff: list[Category] = []
    for part in parts:
        things += [c for c in part if c.isthing]
        stuff += [c for c in part if not c.isthing]
    categories = tuple(dataclasses.replace(c, id=k) for k, c in enumerate(things + stuff, start=1))
    names = [user.source] if user is not None else []
    names += [p.source for p in parts]
    return Vocabulary(categories, source="demo(" + "+".join(names) + ")", allow_repeats=True)


def compose_vocabulary(
    *,
    file: str | os.PathLike | None = None,
    inline: str | Sequence[str] | None = None,
    caption: str | None = None,
    merge_with: Sequence[str] = (),
    demo: bool = False,
    storage_options: dict | None = None,
) -> Vocabulary:
    """The vocabulary of an annotation run, from every source the command line and the flow accept.

    1. The user's classes: ``file`` (a ``classes.txt`` path / URL or a built-in name), then ``inline``
       (:func:`parse_inline_vocabulary`), then the nouns of ``caption`` (:func:`caption_vocabulary`),
       combined with :meth:`Vocabulary.merge`: a later class sharing a synonym with an earlier one is
       dropped (logged), an id already taken is renumbered.
    2. ``demo=False``: the user's classes, then each of ``merge_with`` merged in order
       (:meth:`Vocabulary.merge`); with no user classes the first of ``merge_with`` is the base.
    3. ``demo=True``: :func:`demo_vocabulary` of the user's classes (may be none) and ``merge_with``
       (default: :data:`DEMO_VOCABULARIES`, COCO + ADE20K-150 + LVIS), concatenated as the demo does.

    Raises:
        VocabularyError: a malformed source (naming it), or no source at all.
        FileNotFoundError: a missing file.
    """
    parts: list[Vocabulary] = []
    if file:
        parts.append(_load_one(file, storage_options))
    if inline:
        parts.append(parse_inline_vocabulary(inline))
    if caption:
        parts.append(caption_vocabulary(caption))
    user: Vocabulary | None = None
    for part in parts:
        user = part if user is None else user.merge(part)
    if demo:
        return demo_vocabulary(user, list(merge_with) or DEMO_VOCABULARIES, storage_options=storage_options)
    extras = list(merge_with)
    if user is None:
        if not extras:
            raise VocabularyError(
                "no vocabulary: give a vocabulary file, inline classes, a caption or merge_with"
            )
        user, extras = _load_one(extras[0], storage_options), extras[1:]
    for extra in extras:
        user = user.merge(_load_one(extra, storage_options))
    return user
