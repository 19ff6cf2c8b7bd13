"""Vocabularies for open-vocabulary panoptic segmentation.

A vocabulary is an ordered list of :class:`Category` objects. Each category has a stable integer id
(written into annotations), a display name, a list of synonyms (the classifier embeds every synonym
with the CLIP text tower and keeps the max logit over a class's synonyms) and a thing/stuff flag.
The order of the categories is the order of the classifier's logits.

Sources (see :func:`load_vocabulary`): a built-in name (``"coco_panoptic"``, ``"ade20k_150"``), a
local ``classes.txt``, any fsspec URL, a list of strings, or a :class:`Vocabulary`.

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

This module imports no torch; ``fsspec`` is imported only to read URLs.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from odise_model.resources import config_file

__all__ = [
    "BUILTIN_VOCABULARIES",
    "Category",
    "Vocabulary",
    "VocabularyError",
    "coco_seen_synonyms",
    "load_vocabulary",
    "matching_builtin_vocabulary",
    "parse_vocabulary",
]

logger = logging.getLogger(__name__)

BUILTIN_VOCABULARIES: tuple[str, ...] = ("coco_panoptic", "ade20k_150")
"""Names accepted by :func:`load_vocabulary`; data in ``configs/vocabularies/<name>.txt``."""

_HASH_VERSION = "odise-vocabulary-v1"
_ID_PREFIX = re.compile(r"^(\d+)\s*:(.*)$", re.DOTALL)
_TRAILING_TAG = re.compile(r"\[([^\[\]]*)\]\s*$")
_MARKERS = {"thing": True, "stuff": False}
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class VocabularyError(ValueError):
    """A vocabulary that cannot be used; the message names the source and the 1-based line.

    Attributes:
        source: the file path, URL or description (``"<string>"``, ``"<list>"``) the text came from,
            or None when the error is not tied to a source.
        line: 1-based line number (for a list of strings: 1-based index) of the offending entry, or
            None when no single line is to blame (e.g. an empty vocabulary).
    """

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.reason = message
        where = ""
        if source is not None:
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
    Ids, display names (case-insensitive) and synonyms (case-insensitive, across classes) are
    unique. Two vocabularies are equal when their categories are equal; ``source`` is not compared.

    Attributes:
        categories: the classes, in classifier order.
        source: where the vocabulary came from (path, URL, built-in name, ``"<list>"``, ...).
    """

    categories: tuple[Category, ...]
    source: str = field(default="<memory>", compare=False)
    _by_id: dict[int, Category] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(self.categories))
        _check_categories(self.categories, self.source, lines=None)
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
        needed to keep a last synonym that itself ends in ``[...]`` from being read as a marker.
        """
        lines = []
        for c in self.categories:
            line = f"{c.id}: " + ", ".join(c.synonyms)
            if not c.isthing:
                line += " [stuff]"
            elif _TRAILING_TAG.search(c.synonyms[-1]):
                line += " [thing]"
            lines.append(line)
        return "\n".join(lines) + "\n"

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

        ``self``'s ids and order never change, so annotations made with ``self`` stay valid.
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
        return Vocabulary(tuple(merged), source=f"{self.source}+{other.source}")


# --- validation and parsing --------------------------------------------------------------------------
def _check_categories(categories: Sequence[Category], source: str, lines: Sequence[int] | None) -> None:
    """Raise :class:`VocabularyError` unless ids, names and synonyms are unique across classes.

    ``lines[k]`` is the 1-based line of ``categories[k]`` (None: no line numbers known).
    """
    if not categories:
        raise VocabularyError("empty vocabulary (no classes)", source=source)
    ids: dict[int, int] = {}
    names: dict[str, int] = {}
    owners: dict[str, int] = {}

    def where(j: int) -> str:
        return f"line {lines[j]}" if lines is not None else f"position {j}"

    for k, c in enumerate(categories):
        if not isinstance(c, Category):
            raise VocabularyError(f"expected a Category, got {type(c).__name__}", source=source)
        line = lines[k] if lines is not None else None
        if c.id in ids:
            raise VocabularyError(
                f"duplicate class id {c.id} ({c.name!r}; already used by "
                f"{categories[ids[c.id]].name!r} on {where(ids[c.id])})",
                source=source,
                line=line,
            )
        key = c.name.casefold()
        if key in names:
            raise VocabularyError(
                f"duplicate class {c.name!r} (already defined on {where(names[key])})",
                source=source,
                line=line,
            )
        for synonym in dict.fromkeys(s.casefold() for s in c.synonyms):
            if synonym in owners:
                j = owners[synonym]
                raise VocabularyError(
                    f"synonym {synonym!r} of class {c.name!r} is also a synonym of class "
                    f"{categories[j].name!r} ({where(j)})",
                    source=source,
                    line=line,
                )
        ids[c.id] = k
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


def _split_synonyms(body: str, source: str, line: int) -> tuple[str, ...]:
    synonyms = tuple(s.strip() for s in body.split(","))
    if any(not s for s in synonyms):
        raise VocabularyError(
            f"empty synonym in {body.strip()!r} (two commas in a row, or a leading/trailing comma)",
            source=source,
            line=line,
        )
    return synonyms


def _split_marker(line: str, source: str, number: int) -> tuple[str, bool]:
    """``(text without its trailing [thing] / [stuff] marker, isthing)``; default thing."""
    tag = _TRAILING_TAG.search(line)
    if not tag:
        return line, True
    marker = tag.group(1).strip().lower()
    if marker not in _MARKERS:
        raise VocabularyError(
            f"unknown tag [{tag.group(1)}]; only [thing] and [stuff] are allowed", source=source, line=number
        )
    text = line[: tag.start()].strip()
    if not text:
        raise VocabularyError(f"a [{marker}] marker without a class name", source=source, line=number)
    return text, _MARKERS[marker]


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
    # Split on "\n" only (not str.splitlines) so line numbers match editors and the byte count above.
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
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

        # 2. optional trailing marker
        line, isthing = _split_marker(line, source, number)
        if not line:
            raise VocabularyError("an id without a class name", source=source, line=number)

        # 3. synonyms
        synonyms = _split_synonyms(line, source, number)
        category_id = cat_id if cat_id is not None else len(categories) + 1
        try:
            categories.append(Category(category_id, synonyms[0], synonyms, isthing))
        except VocabularyError as exc:  # e.g. a lone "\r" inside a line
            raise VocabularyError(exc.reason, source=source, line=number) from None
        lines.append(number)

    _check_categories(categories, source, lines)
    return Vocabulary(tuple(categories), source=source)


def _from_list(items: Sequence[str]) -> Vocabulary:
    """One class per string as a ``classes.txt`` line without an id: commas separate synonyms, an optional
    trailing ``[stuff]`` / ``[thing]`` marker (default thing); ids 1..n in list order."""
    source = "<list>"
    categories = []
    for number, item in enumerate(items, start=1):
        if not isinstance(item, str):
            raise VocabularyError(f"expected a string, got {type(item).__name__}", source=source, line=number)
        if "\n" in item or "\r" in item:
            raise VocabularyError("a class name must not contain a line break", source=source, line=number)
        text, isthing = _split_marker(item.strip(), source, number)
        synonyms = _split_synonyms(text, source, number)
        categories.append(Category(number, synonyms[0], synonyms, isthing))
    _check_categories(categories, source, list(range(1, len(categories) + 1)))
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
            - a list/tuple of strings: one class per string, commas separate synonyms, an optional
              trailing ``[stuff]`` / ``[thing]`` marker (default thing), ids 1..n (no explicit ids).
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
        return _from_list(spec)
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
