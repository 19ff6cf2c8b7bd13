"""Tests for odise_model.vocabulary: the classes.txt format, built-in vocabularies, loading, merging."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from odise_model.vocabulary import (
    BUILTIN_VOCABULARIES,
    DEMO_VOCABULARIES,
    Category,
    Vocabulary,
    VocabularyError,
    coco_seen_synonyms,
    compose_vocabulary,
    demo_vocabulary,
    inline_classes,
    load_vocabulary,
    parse_inline_vocabulary,
    parse_vocabulary,
)


def write(tmp_path: Path, text: str | bytes, name: str = "classes.txt") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def load_error(tmp_path: Path, text: str | bytes) -> tuple[VocabularyError, Path]:
    path = write(tmp_path, text)
    with pytest.raises(VocabularyError) as info:
        load_vocabulary(path)
    return info.value, path


# --- the format --------------------------------------------------------------------------------------
def test_plain_file_comments_blank_lines_synonyms(tmp_path):
    path = write(
        tmp_path,
        "# my classes\n\n  person ,  man,woman  \n   # indented comment\n\nsky, clouds [stuff]\ncar [thing]\n",
    )
    vocab = load_vocabulary(path)
    assert vocab.source == str(path)
    assert len(vocab) == 3
    assert vocab.names == ["person", "sky", "car"]
    assert vocab.ids == [1, 2, 3]
    assert vocab[0] == Category(1, "person", ("person", "man", "woman"), True)
    assert vocab[1].synonyms == ("sky", "clouds") and not vocab[1].isthing
    assert vocab[2].synonyms == ("car",) and vocab[2].isthing
    assert [c.name for c in vocab] == vocab.names
    assert vocab.by_id(2).name == "sky"
    with pytest.raises(KeyError, match="99"):
        vocab.by_id(99)


def test_explicit_ids_markers_and_crlf_bom(tmp_path):
    text = "\ufeff# header\r\n12: fire hydrant\r\n 3 :car,cars\r\n200: rug [STUFF]\r\n7: tv [old], crt\r\n"
    vocab = load_vocabulary(write(tmp_path, text))
    assert vocab.ids == [12, 3, 200, 7]
    assert vocab.names == ["fire hydrant", "car", "rug", "tv [old]"]
    assert vocab.by_id(3).synonyms == ("car", "cars")
    assert not vocab.by_id(200).isthing
    assert vocab.by_id(7).synonyms == ("tv [old]", "crt")


@pytest.mark.parametrize(
    ("text", "line", "pattern"),
    [
        ("# only comments\n\n", None, "empty vocabulary"),
        ("", None, "empty vocabulary"),
        ("cat\ndog\n\nCat, kitty\n", 4, "duplicate class 'Cat'"),
        ("1: cat\n2: dog\n1: bird\n", 3, "duplicate class id 1"),
        ("cat, kitty\ndog, puppy\nbird, Kitty\n", 3, "synonym 'kitty'"),
        ("cat\ndog,,puppy\n", 2, "empty synonym"),
        ("cat\ndog, puppy,\n", 2, "empty synonym"),
        ("cat\n, dog\n", 2, "empty synonym"),
        ("cat\n  [stuff]\n", 2, "marker without a class name"),
        ("1: cat\n2: [thing]\n", 2, "marker without a class name"),
        ("cat\ndog [animal]\n", 2, r"unknown tag \[animal\]"),
        ("cat\ndog []\n", 2, r"unknown tag \[\]"),
        ("1: cat\ndog\n", 2, "mixed explicit ids"),
        ("cat\n2: dog\n", 2, "mixed explicit ids"),
        ("1: cat\n2:\n", 2, "id without a class name"),
        ("0: cat\n", 1, "id must be >= 1"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, line, pattern):
    error, path = load_error(tmp_path, text)
    assert isinstance(error, ValueError)
    assert error.source == str(path)
    assert error.line == line
    assert str(path) in str(error)
    if line is not None:
        assert f"{path}:{line}:" in str(error)
    assert re.search(pattern, str(error)), str(error)


def test_non_utf8_reports_line_of_first_bad_byte(tmp_path):
    data = b"cat\ndog\n" + b"caf\xe9\n" + b"bad\xff\n"
    error, path = load_error(tmp_path, data)
    assert error.line == 3
    assert f"{path}:3:" in str(error)
    assert "UTF-8" in str(error)


def test_duplicate_synonym_within_one_class_is_kept():
    vocab = parse_vocabulary("stove, kitchen range, kitchen range\n")
    assert vocab[0].synonyms == ("stove", "kitchen range", "kitchen range")


def test_parse_string_source_in_errors():
    with pytest.raises(VocabularyError, match=r"^<string>:2: ") as info:
        parse_vocabulary("a\na\n")
    assert info.value.source == "<string>" and info.value.line == 2


# --- built-in vocabularies -----------------------------------------------------------------------------
def test_coco_panoptic_builtin():
    coco = load_vocabulary("coco_panoptic")
    assert coco.source == "coco_panoptic"
    assert len(coco) == 133
    assert sum(c.isthing for c in coco) == 80
    assert sum(not c.isthing for c in coco) == 53
    synonyms, class_index = coco.flat_synonyms()
    assert len(synonyms) == 254 == len(class_index)  # official text_embed buffer is [254, 768]
    assert class_index[:3] == [0, 0, 0] and class_index[-1] == 132
    # official COCO panoptic ids (panopticapi / detectron2 COCO_CATEGORIES)
    assert coco.ids == sorted(coco.ids) and coco.ids[0] == 1 and coco.ids[-1] == 200
    assert all(c.isthing == (c.id <= 90) for c in coco)
    expected = {
        1: "person",
        11: "fire hydrant",
        13: "stop sign",
        55: "orange fruit",
        67: "dining table",
        72: "tv",
        90: "toothbrush",
        92: "banner",
        145: "playingfield",
        187: "sky",
        199: "wall",
        200: "rug",
    }
    for cat_id, name in expected.items():
        assert coco.by_id(cat_id).name == name
    for missing in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91):
        with pytest.raises(KeyError):
            coco.by_id(missing)
    assert coco.by_id(1).synonyms[:4] == ("person", "child", "girl", "boy")
    assert coco.by_id(1).synonyms[-1] == "clothes"
    assert coco.by_id(145).synonyms == (
        "playingfield",
        "tennis court",
        "baseball feild",
        "soccer field",
        "tennis field",
    )
    assert not coco.by_id(92).isthing and coco.by_id(90).isthing


def test_ade20k_150_builtin():
    ade = load_vocabulary("ade20k_150")
    assert len(ade) == 150
    assert ade.ids == list(range(1, 151))
    assert sum(c.isthing for c in ade) == 100
    assert ade.by_id(1).name == "wall" and not ade.by_id(1).isthing
    assert ade.by_id(13).name == "person" and ade.by_id(13).isthing
    assert ade.by_id(150).synonyms == ("flag", "flags")
    assert ade.by_id(72).synonyms.count("kitchen range") == 2  # kept exactly as in OpenSeg's list
    assert not ade.by_id(146).isthing  # shower: stuff in Mask2Former's metadata
    assert len(ade.flat_synonyms()[0]) == 403


def test_builtins_are_cached_and_listed():
    assert BUILTIN_VOCABULARIES == (
        "coco_panoptic",
        "ade20k_150",
        "lvis_1203",
        "ade20k_847",
        "pascal_context_459",
        "pascal_context_59",
        "pascal_voc_21",
    )
    assert load_vocabulary("coco_panoptic") is load_vocabulary("coco_panoptic")


def test_coco_seen_synonyms():
    seen = coco_seen_synonyms()
    assert isinstance(seen, frozenset) and len(seen) == 254
    assert {"person", "childeren", "wall", "rug", "tv remote"} <= seen
    assert "flag" not in seen
    ade = load_vocabulary("ade20k_150")
    unseen = [c.name for c in ade if not any(s in seen for s in c.synonyms)]
    assert "flag" in unseen and "person" not in unseen


def test_import_is_light():
    code = "import sys, odise_model.vocabulary; print('torch' in sys.modules, 'fsspec' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --- hashing and canonical text --------------------------------------------------------------------------
def test_sha256_ignores_formatting_but_not_content():
    a = parse_vocabulary("person, man\nsky [stuff]\n")
    b = parse_vocabulary("# comment\n\n1:person ,man [thing]\n  2 :  sky   [Stuff]  \n", source="other")
    assert a == b and a.sha256() == b.sha256()
    assert len(a.sha256()) == 64
    different = [
        "person, men\nsky [stuff]\n",  # synonym
        "person, man\nsky\n",  # flag
        "1: person, man\n3: sky [stuff]\n",  # id
        "sky [stuff]\nperson, man\n",  # order (= classifier order)
        "man, person\nsky [stuff]\n",  # synonym order / display name
    ]
    hashes = {parse_vocabulary(t).sha256() for t in different}
    assert len(hashes) == len(different) and a.sha256() not in hashes


@pytest.mark.parametrize("name", BUILTIN_VOCABULARIES)
def test_to_text_round_trip_builtins(name):
    vocab = load_vocabulary(name)
    again = parse_vocabulary(vocab.to_text())
    assert again == vocab and again.sha256() == vocab.sha256()


def test_to_text_round_trip_tricky_names():
    vocab = Vocabulary(
        (
            Category(5, "tv [old]", ("tv [old]",)),  # needs an explicit [thing] to survive
            Category(2, "#hashtag", ("#hashtag", "3: odd")),
            Category(9, "sky", ("sky",), isthing=False),
        )
    )
    text = vocab.to_text()
    assert text.splitlines()[0] == "5: tv [old] [thing]"
    assert parse_vocabulary(text) == vocab


def test_coco_categories_export():
    cats = load_vocabulary("coco_panoptic").coco_categories()
    assert cats[0] == {"id": 1, "name": "person", "isthing": 1, "synonyms": list(cats[0]["synonyms"])}
    assert cats[-1]["id"] == 200 and cats[-1]["isthing"] == 0
    assert sum(c["isthing"] for c in cats) == 80


def test_category_and_vocabulary_validation():
    with pytest.raises(VocabularyError, match="first synonym"):
        Category(1, "cat", ("kitty", "cat"))
    with pytest.raises(VocabularyError, match="id must be"):
        Category(0, "cat", ("cat",))
    with pytest.raises(VocabularyError, match="comma"):
        Category(1, "a,b", ("a,b",))
    assert Category(1, "cat", ["cat", "kitty"]).synonyms == ("cat", "kitty")
    with pytest.raises(VocabularyError, match="duplicate class id 1"):
        Vocabulary((Category(1, "a", ("a",)), Category(1, "b", ("b",))))
    with pytest.raises(VocabularyError, match="empty vocabulary"):
        Vocabulary(())


# --- loading -------------------------------------------------------------------------------------------
def test_list_of_strings():
    vocab = load_vocabulary(["cat, kitty", " dog ", "traffic cone"])
    assert vocab.source == "<list>"
    assert vocab.ids == [1, 2, 3]
    assert vocab.names == ["cat", "dog", "traffic cone"]
    assert vocab[0].synonyms == ("cat", "kitty")
    assert all(c.isthing for c in vocab)
    assert load_vocabulary(("a", "b")).names == ["a", "b"]
    with pytest.raises(VocabularyError, match=r"^<list>: class 2 \('dog,'\): .*empty synonym"):
        load_vocabulary(["cat", "dog,"])
    with pytest.raises(VocabularyError, match=r"^<list>: class 3 \('CAT'\): .*duplicate class"):
        load_vocabulary(["cat", "dog", "CAT"])
    marked = load_vocabulary(["cat", "sky, clouds [stuff]", "grass [STUFF]", "tv [old] [thing]"])
    assert [c.isthing for c in marked] == [True, False, False, True]
    assert marked[1].synonyms == ("sky", "clouds") and marked[3].name == "tv [old]"
    with pytest.raises(VocabularyError, match=r"^<list>: class 2 .*unknown tag \[other\]"):
        load_vocabulary(["cat", "sky [other]"])
    with pytest.raises(VocabularyError, match=r"^<list>: class 1 .*marker without a class name"):
        load_vocabulary(["[stuff]"])
    with pytest.raises(VocabularyError, match="empty vocabulary"):
        load_vocabulary([])


def test_vocabulary_returned_as_is_and_bad_types():
    vocab = parse_vocabulary("a\n")
    assert load_vocabulary(vocab) is vocab
    with pytest.raises(TypeError):
        load_vocabulary(42)  # type: ignore[arg-type]


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt") as info:
        load_vocabulary(missing)
    assert info.value.filename == str(missing)
    with pytest.raises(FileNotFoundError, match="built-in vocabularies"):
        load_vocabulary("coco_panoptik")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_vocabulary((tmp_path / "nope.txt").as_uri())


def test_load_from_file_url(tmp_path):
    path = write(tmp_path, "1: cat, kitty\n5: grass [stuff]\n")
    url = path.as_uri()
    assert url.startswith("file://")
    vocab = load_vocabulary(url)
    assert vocab.source == url
    assert vocab == load_vocabulary(path)
    assert load_vocabulary(str(path)) == vocab
    bad = write(tmp_path, "cat\ncat\n", name="bad.txt")
    with pytest.raises(VocabularyError, match=r"bad\.txt:2: ") as info:
        load_vocabulary(bad.as_uri())
    assert info.value.source == bad.as_uri()


# --- merging -------------------------------------------------------------------------------------------
def test_merge_rules():
    mine = parse_vocabulary("3: traffic cone\n7: Kitty, house cat\n", source="mine")
    other = parse_vocabulary(
        "1: person\n3: cone, pylon\n7: cat, kitty\n8: sky [stuff]\n9: dog\n", source="other"
    )
    merged = mine.merge(other)
    assert merged.source == "mine+other"
    # self first and unchanged; 'cat, kitty' dropped (kitty ~ Kitty); colliding id 3 -> max(7, 1, 8, 9) + 1
    assert [(c.id, c.name) for c in merged] == [
        (3, "traffic cone"),
        (7, "Kitty"),
        (1, "person"),
        (10, "cone"),
        (8, "sky"),
        (9, "dog"),
    ]
    assert not merged.by_id(8).isthing
    assert merged.by_id(10).synonyms == ("cone", "pylon")


def test_merge_with_builtin(tmp_path):
    path = write(tmp_path, "traffic cone, pylon\nperson, pedestrian\nforklift\n")
    merged = load_vocabulary(path, merge_with="coco_panoptic")
    coco = load_vocabulary("coco_panoptic")
    assert merged.names[:3] == ["traffic cone", "person", "forklift"]
    assert merged.ids[:3] == [1, 2, 3]
    assert len(merged) == 3 + 132  # COCO 'person' dropped: same synonym as the user's class
    assert merged.by_id(4).name == "motorcycle"  # no collision: COCO id kept
    assert merged.by_id(201).name == "bicycle"  # COCO 2 and 3 collide with the user's ids
    assert merged.by_id(202).name == "car"
    assert merged.by_id(200).name == "rug"
    both = load_vocabulary(["forklift"], merge_with=["coco_panoptic", "ade20k_150"])
    assert both.names[0] == "forklift" and len(both) > len(coco)
    assert "flag" in both.names and both.names.count("person") == 1


def test_pickle_round_trip():
    import pickle

    coco = load_vocabulary("coco_panoptic")
    again = pickle.loads(pickle.dumps(coco))
    assert again == coco and again.source == coco.source and again.by_id(200).name == "rug"
    assert hash(again) == hash(coco)


def test_load_from_s3_with_storage_options(s3_bucket, s3_storage_options):
    import fsspec

    url = f"s3://{s3_bucket}/vocab/classes.txt"
    with fsspec.open(url, "wb", **s3_storage_options) as f:
        f.write(b"1: cat, kitty\n2: grass [stuff]\n")
    vocab = load_vocabulary(url, storage_options=s3_storage_options)
    assert vocab.names == ["cat", "grass"] and vocab.source == url
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_vocabulary(f"s3://{s3_bucket}/missing.txt", storage_options=s3_storage_options)


# COCO's own panoptic category names where they differ from the built-in's first synonym
# (panopticapi panoptic_coco_categories.json); the rest are equal.
_COCO_NAMES = {
    171: "wall-brick", 175: "wall-stone", 176: "wall-tile", 177: "wall-wood", 178: "water-other",
    180: "window-blind", 181: "window-other", 184: "tree-merged", 185: "fence-merged", 186: "ceiling-merged",
    187: "sky-other-merged", 188: "cabinet-merged", 189: "table-merged", 190: "floor-other-merged",
    191: "pavement-merged", 192: "mountain-merged", 193: "grass-merged", 194: "dirt-merged",
    195: "paper-merged", 196: "food-other-merged", 197: "building-other-merged", 198: "rock-merged",
    199: "wall-other-merged", 200: "rug-merged",
}  # fmt: skip


def test_matching_builtin_vocabulary_recognises_coco_and_ade_categories():
    from odise_model.vocabulary import matching_builtin_vocabulary

    coco = load_vocabulary("coco_panoptic")
    cats = {c.id: {"name": _COCO_NAMES.get(c.id, c.name), "isthing": int(c.isthing)} for c in coco}
    assert matching_builtin_vocabulary(cats) == "coco_panoptic"
    as_list = [{"id": i, **v} for i, v in cats.items()]
    assert matching_builtin_vocabulary(as_list) == "coco_panoptic"
    ade = load_vocabulary("ade20k_150")
    assert (
        matching_builtin_vocabulary({c.id: {"name": c.name, "isthing": c.isthing} for c in ade})
        == "ade20k_150"
    )
    # One id more or less, a flipped thing/stuff flag, or unrelated names: not the built-in.
    assert matching_builtin_vocabulary({i: v for i, v in cats.items() if i != 1}) is None
    assert matching_builtin_vocabulary({**cats, 201: {"name": "extra", "isthing": 1}}) is None
    assert matching_builtin_vocabulary({**cats, 1: {"name": "person", "isthing": 0}}) is None
    assert (
        matching_builtin_vocabulary(
            {i: {"name": f"class {i}", "isthing": v["isthing"]} for i, v in cats.items()}
        )
        is None
    )
    assert matching_builtin_vocabulary({}) is None


def test_training_vocabulary_prefers_given_then_builtin_then_categories(tmp_path):
    from pipeline.train.data import training_vocabulary

    coco = load_vocabulary("coco_panoptic")
    cats = {c.id: {"name": _COCO_NAMES.get(c.id, c.name), "isthing": int(c.isthing)} for c in coco}
    chosen = training_vocabulary(None, cats)
    assert chosen.sha256 == coco.sha256  # the prompt-engineered synonyms, as the official model trains
    assert len(chosen[0].synonyms) > 1
    # categories with their own synonyms are used as they are
    own = {i: {**v, "synonyms": [v["name"]]} for i, v in cats.items()}
    assert training_vocabulary(None, own)[-1].synonyms == ("rug-merged",)
    # an explicit vocabulary wins
    path = tmp_path / "classes.txt"
    path.write_text("1: person\n2: bicycle\n")
    assert [c.name for c in training_vocabulary(str(path), cats)] == ["person", "bicycle"]
    # unknown categories: names only
    small = {1: {"name": "square", "isthing": 1}, 2: {"name": "grass texture", "isthing": 0}}
    assert [c.synonyms for c in training_vocabulary(None, small)] == [("square",), ("grass texture",)]


# --- the benchmark built-ins (from the official OpenSeg lists) -------------------------------------------
REFERENCE = [
    Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "vocabularies",
    Path("/work/shared/reference/vocabularies"),
]


@pytest.mark.parametrize(
    ("name", "classes", "first", "last", "synonyms", "stuff", "repeats"),
    [
        ("lvis_1203", 1203, "aerosol can", "zucchini", 1825, 0, False),
        ("ade20k_847", 847, "wall", "adding machine", 1342, 61, True),  # 848 lines - invalid_class_id
        ("pascal_context_459", 459, "accordion", "wool", 559, 33, True),
        ("pascal_context_59", 59, "aeroplane", "wood piece", 160, 15, False),
        ("pascal_voc_21", 21, "background", "tvmonitor", 153, 1, False),
    ],
)
def test_benchmark_builtins(name, classes, first, last, synonyms, stuff, repeats):
    vocab = load_vocabulary(name)
    assert vocab.source == name
    assert len(vocab) == classes
    assert (vocab.names[0], vocab.names[-1]) == (first, last)
    assert len(vocab.flat_synonyms()[0]) == synonyms  # the official synonym count, repeats included
    assert sum(not c.isthing for c in vocab) == stuff
    assert vocab.has_repeats() == repeats == vocab.allow_repeats
    if name == "pascal_voc_21":  # background keeps its place (classifier order) but not id 0
        assert vocab.ids == [21, *range(1, 21)] and not vocab[0].isthing
        assert vocab.by_id(1).name == "aeroplane" and vocab.by_id(15).synonyms[:2] == ("person", "child")
    else:
        assert vocab.ids == list(range(1, classes + 1))
    assert "invalid_class_id" not in vocab.names
    assert parse_vocabulary(vocab.to_text()) == vocab  # what the annotate actors re-parse


def test_benchmark_builtins_keep_official_repeats():
    a847 = load_vocabulary("ade20k_847")
    owners = [c.id for c in a847 if "dog" in c.synonyms]
    assert owners == [105, 260, 797]  # animal, dog, andiron: as in OpenSeg's list
    assert [c.id for c in a847 if c.name == "pot"] == [131, 189]
    pc459 = load_vocabulary("pascal_context_459")
    assert "rug" in pc459.by_id(158).synonyms and pc459.by_id(330).name == "rug"
    assert all(c.isthing for c in load_vocabulary("lvis_1203"))


def test_benchmark_builtins_thing_stuff_rule():
    """A-847 / PC-459 / PC-59: stuff exactly when the display name is a COCO / ADE-150 stuff synonym and
    no thing synonym there (the rule the file headers state); VOC: only background."""
    stuff, thing = set(), set()
    for name in ("coco_panoptic", "ade20k_150"):
        for c in load_vocabulary(name):
            (thing if c.isthing else stuff).update(s.casefold() for s in c.synonyms)
    for name in ("ade20k_847", "pascal_context_459", "pascal_context_59"):
        for c in load_vocabulary(name):
            key = c.name.casefold()
            assert c.isthing == (key not in stuff or key in thing), (name, c.name)
    assert [c.name for c in load_vocabulary("pascal_voc_21") if not c.isthing] == ["background"]


@pytest.mark.parametrize(
    "name", ["lvis_1203", "ade20k_847", "pascal_context_459", "pascal_context_59", "pascal_voc_21"]
)
def test_benchmark_builtins_equal_the_reference_files(name):
    """Class for class and synonym for synonym what the official ``get_openseg_labels`` reads."""
    folder = next((p for p in REFERENCE if (p / f"{name}_with_prompt_eng.txt").is_file()), None)
    if folder is None:
        pytest.skip("the reference label lists (../shared/reference/vocabularies) are not on this machine")
    official = []
    for line in (folder / f"{name}_with_prompt_eng.txt").read_text(encoding="utf-8").splitlines():
        index, text = line.split(":", 1)
        if text != "invalid_class_id":  # as the official loader
            official.append((int(index), text.split(",")))
    vocab = load_vocabulary(name)
    assert [list(c.synonyms) for c in vocab] == [syns for _, syns in official]
    expected_ids = [21 if i == 0 else i for i, _ in official]  # VOC background: 0 is "unlabeled" here
    assert vocab.ids == expected_ids


# --- repeats -----------------------------------------------------------------------------------------------
def test_allow_repeats_directive(tmp_path):
    text = "1: animal, dog, cat\n2: dog, puppy\n3: pot\n4: pot, flowerpot\n"
    error, path = load_error(tmp_path, text)
    assert error.line == 2 and "synonym 'dog'" in str(error)
    vocab = load_vocabulary(write(tmp_path, "# A-847 style\n#! allow-repeats\n" + text, "r.txt"))
    assert vocab.allow_repeats and vocab.has_repeats() and vocab.names == ["animal", "dog", "pot", "pot"]
    text_out = vocab.to_text()
    assert text_out.startswith("#! allow-repeats\n")
    assert parse_vocabulary(text_out) == vocab
    assert "#! allow-repeats" not in load_vocabulary("coco_panoptic").to_text()
    assert parse_vocabulary("#!  ALLOW-REPEATS \na, b\nb\n").allow_repeats  # case and spaces
    assert not parse_vocabulary("#! allow repeats, please\na\n").allow_repeats  # only the exact directive
    with pytest.raises(VocabularyError, match="duplicate class id 1"):
        parse_vocabulary("#! allow-repeats\n1: a\n1: b\n")  # ids stay unique
    # merging keeps the permission: other's kept classes may share synonyms among themselves
    merged = parse_vocabulary("zebra\n").merge(vocab)
    assert merged.allow_repeats and len(merged) == 5


# --- inline vocabularies ---------------------------------------------------------------------------------
def test_inline_vocabulary_like_the_demo():
    vocab = parse_inline_vocabulary("person,man;sky [stuff]")
    assert vocab.source == "vocab"
    assert [(c.id, c.synonyms, c.isthing) for c in vocab] == [
        (1, ("person", "man"), True),
        (2, ("sky",), False),
    ]
    # the demo's own example, whitespace trimmed around classes and synonyms
    demo = parse_inline_vocabulary(" black pickup truck, pickup truck ;  blue sky, sky ")
    assert demo.names == ["black pickup truck", "blue sky"]
    assert demo[0].synonyms == ("black pickup truck", "pickup truck")
    # a list (the flow parameter) is the same; an item may hold several classes; one trailing ';'
    as_list = parse_inline_vocabulary(["person, man", "sky [stuff]"])
    assert as_list == parse_inline_vocabulary("person, man; sky [stuff];") == vocab
    assert parse_inline_vocabulary(["a; b", "c"]).names == ["a", "b", "c"]
    assert inline_classes(["a ;b ", " c"]) == ["a", "b", "c"]
    assert parse_inline_vocabulary("sky [STUFF]; tv [old] [thing]").names == ["sky", "tv [old]"]


@pytest.mark.parametrize(
    ("spec", "position", "text", "pattern"),
    [
        ("cat;;dog", 2, "", "empty class"),
        (";cat", 1, "", "empty class"),
        ("cat; ", None, None, None),  # one trailing separator (with spaces) is fine
        ("cat;dog,,puppy", 2, "dog,,puppy", "empty synonym"),
        ("cat;dog,", 2, "dog,", "empty synonym"),
        ("cat;dog [animal]", 2, "dog [animal]", r"unknown tag \[animal\]"),
        ("cat;[stuff]", 2, "[stuff]", "marker without a class name"),
        ("cat;dog;Cat", 3, "Cat", "duplicate class 'Cat'"),
        ("cat, kitty;dog, Kitty", 2, "dog, Kitty", "synonym 'kitty'"),
        (["cat", "dog\nbird"], 2, "dog\nbird", "line break"),
        (["cat", ""], 2, "", "empty class"),
        ("", 1, "", "empty class"),
    ],
)
def test_inline_vocabulary_errors_name_position_and_text(spec, position, text, pattern):
    if pattern is None:
        assert parse_inline_vocabulary(spec).names == ["cat"]
        return
    with pytest.raises(VocabularyError) as info:
        parse_inline_vocabulary(spec)
    error = info.value
    assert (error.source, error.line, error.item) == ("vocab", position, text)
    assert str(error).startswith(f"vocab: class {position} ({text!r}): ")
    assert re.search(pattern, str(error)), str(error)


def test_inline_vocabulary_bad_types():
    with pytest.raises(VocabularyError, match=r"class 2 .*expected a string"):
        parse_inline_vocabulary(["cat", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        parse_inline_vocabulary(3)  # type: ignore[arg-type]
    with pytest.raises(VocabularyError, match="empty vocabulary"):
        parse_inline_vocabulary([])


# --- the demo's merged list and the run's vocabulary -------------------------------------------------------
def test_demo_vocabulary_is_the_official_label_list():
    coco, ade, lvis = (load_vocabulary(n) for n in DEMO_VOCABULARIES)
    user = parse_inline_vocabulary("black pickup truck, pickup truck; blue sky, sky [stuff]")
    demo = demo_vocabulary(user)
    # 2 user classes + COCO 133 + ADE 150 + LVIS 1203: "about 1.5k classes", nothing dropped
    assert len(demo) == 2 + 133 + 150 + 1203 == 1488
    assert demo.ids == list(range(1, 1489))  # the demo's contiguous ids (+1: 0 is unlabeled here)
    assert demo.allow_repeats and demo.has_repeats()
    # 1. things: user (all things, even a [stuff] one), COCO things, ADE things, LVIS; 2. stuff: COCO, ADE
    things = [c for c in demo if c.isthing]
    assert len(things) == 2 + 80 + 100 + 1203 and demo.categories[: len(things)] == tuple(things)
    expected = (
        [c.synonyms for c in user]
        + [c.synonyms for c in coco if c.isthing]
        + [c.synonyms for c in ade if c.isthing]
        + [c.synonyms for c in lvis]
        + [c.synonyms for c in coco if not c.isthing]
        + [c.synonyms for c in ade if not c.isthing]
    )
    assert [c.synonyms for c in demo] == expected
    assert (demo[0].name, demo[1].name, demo[2].name, demo[82].name) == (
        "black pickup truck",
        "blue sky",
        "person",
        "bed",
    )
    assert demo[182].name == "aerosol can" and demo[1385].name == "banner" and not demo[1385].isthing
    assert demo[-1].name == [c.name for c in ade if not c.isthing][-1]
    # repeats kept as in the demo: COCO's, ADE's and LVIS's person are three classes
    ade_person = [c.name for c in ade if c.isthing].index("person")
    lvis_person = lvis.names.index("person")
    assert [c.id for c in demo if c.name == "person"] == [
        3,
        2 + 80 + ade_person + 1,
        2 + 180 + lvis_person + 1,
    ]
    assert len(demo.flat_synonyms()[0]) == 4 + 254 + 403 + 1825
    assert parse_vocabulary(demo.to_text()) == demo  # survives the trip to the annotate actors
    assert len(demo_vocabulary()) == 1486 and demo_vocabulary()[0].name == "person"
    assert demo_vocabulary(lists=["coco_panoptic"]).names == [c.name for c in coco if c.isthing] + [
        c.name for c in coco if not c.isthing
    ]


def test_compose_vocabulary_sources_and_precedence(tmp_path):
    path = write(tmp_path, "3: forklift\n7: pallet, pallets\n")
    vocab = compose_vocabulary(
        file=str(path), inline="pallet; safety vest", caption="A man driving a forklift."
    )
    # file first (its ids kept), then the inline classes, then the caption's nouns; repeats dropped;
    # Vocabulary.merge's id rule: a kept class keeps its own id (1..n) when it is free
    assert vocab.names == ["forklift", "pallet", "safety vest", "man"]
    assert vocab.ids == [3, 7, 2, 1]
    clash = compose_vocabulary(
        file=str(write(tmp_path, "1: crate\n2: pallet jack\n", "c.txt")), inline="a; b"
    )
    assert clash.ids == [1, 2, 3, 4]
    with_builtin = compose_vocabulary(inline="forklift", merge_with=["coco_panoptic"])
    assert with_builtin.names[0] == "forklift" and len(with_builtin) == 134
    assert compose_vocabulary(merge_with=["coco_panoptic", "ade20k_150"]) == load_vocabulary(
        "coco_panoptic", merge_with="ade20k_150"
    )
    demo = compose_vocabulary(inline="forklift [stuff]", caption="a dog on the beach", demo=True)
    assert len(demo) == 3 + 1486 and demo.names[:3] == ["forklift", "dog", "beach"] and demo[0].isthing
    assert len(compose_vocabulary(demo=True)) == 1486
    assert len(compose_vocabulary(demo=True, merge_with=["ade20k_150"])) == 150  # lists replaced
    with pytest.raises(VocabularyError, match="no vocabulary"):
        compose_vocabulary()
    with pytest.raises(VocabularyError, match=r"vocab: class 1"):
        compose_vocabulary(inline=";")
