"""COCO exports of an annotate output: per-shard fragments written at commit, merged incrementally into parts.

Layout under ``<output>/coco/``::

    panoptic/<shard_id>/<name>.png     COCO panoptic PNGs of one shard (names: :func:`png_names`)
    _parts/<shard_id>.jsonl            fragment of one committed shard: one JSON line per labelled image,
                                       ``{"image": {...}, "panoptic": {...}, "instances": [...]}``
    panoptic.json, instances.json      the export while it fits one part (<= ``max_images_per_file`` images)
    panoptic-00000.json, instances-00000.json, ...
                                       numbered parts once it does not
    index.json                         the parts: file names, seq range, shards, image and annotation
                                       counts, and the digest of the commit markers each was built from

**Ids** (all < 2**53, so JavaScript JSON readers keep them exact): ``images[].id`` is the row's ``image_id``
(``seq << 28 | rank of the key among the shard's sorted keys``); instance annotation ids are ``seq << 28 |
running index of the instance within its shard`` (in the shard's Parquet row order). Panoptic annotations
are keyed by ``image_id`` (COCO panoptic has no annotation ids); their segment ids are the PNG's ids.

**Image references**: ``images[].coco_url`` is where the image is (the row's ``image_url``: the file's URL for
image folders, ``tar://<member>::<tar URL>`` for tar members, which ``fsspec.open`` opens as it is; derived
the same way for rows that lack it). ``images[].file_name`` is a path relative to an image root: by default,
for image folders, the path relative to the folder that was labelled (the sample key, ``cats/001.jpg``), and
for tar members ``<tar stem>/<member>`` (``shard-000/cats/001.jpg``: the layout you get by extracting each
tar into a folder named after it). With ``image_root`` (``--image-root``), images under that root are named
relative to it (tar members: ``<tar path relative to the root, without .tar>/<member>``); images outside it
keep the default name. With ``copy_images`` (``--copy-images``; recorded in ``provenance.json`` as
``settings.copy_images``) the read stage copies every image's original bytes to ``<output>/images/`` and
``file_name`` is the copy's path relative to that folder, :func:`copied_image_name`
(``<shard_id>/<name>``); ``index.json``'s ``image_root`` is then that folder's URL.

**Parts.** Committed shards are grouped by their commit sequence number ``seq``: part *i* holds the shards
with ``seq_start[i] <= seq < seq_start[i + 1]``. Existing boundaries are kept from ``index.json``; new shards
(higher seqs) fill the last, open part up to ``max_images_per_file`` labelled images, then open new parts (a
single shard larger than that is a part of its own). A part is rebuilt only when the digest of its markers
changed (a shard added, replaced by ``--retry-errors`` / ``--relabel-changed``, or removed), its file names
changed (the export grew from one part to several), a file is missing, or the export settings (categories,
image root, part size) changed. A rerun with nothing new reads the markers (given) and ``index.json`` and
lists ``coco/``: no fragment, no Parquet, and nothing is written.

**Crash safety.** Each part file is assembled by streaming the fragments through local temporary files
(memory does not grow with the dataset) and published atomically (temp + rename locally, one PUT or multipart
upload on object stores); ``index.json`` is written after every rebuilt part, and files no longer referenced
are deleted after it. A crash (even SIGKILL) during assembly leaves every file either as it was or complete and
new; the index then no longer matches and the next run rebuilds what is stale.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.encode import category_colour, coco_instance_annotation, coco_segment_info
from pipeline.schema import SCHEMA_VERSION, image_id
from pipeline.storage import (
    JsonArraySpool,
    cat_many,
    delete,
    fs_root,
    list_children,
    open_atomic,
    read_bytes,
    utc_now,
    write_bytes,
    write_json_object,
)
from pipeline.storage import json_bytes as _json_bytes

__all__ = [
    "DEFAULT_MAX_IMAGES_PER_FILE",
    "COPIED_IMAGES_DIR",
    "copied_image_name",
    "default_coco_url",
    "default_file_name",
    "finalize_coco",
    "fragment_record",
    "image_stem",
    "key_to_filename",
    "marker_digest",
    "png_names",
    "test_pause",
]

log = logging.getLogger(__name__)

COCO_DIR = "coco"
PARTS_DIR = "coco/_parts"
PNG_DIR = "coco/panoptic"
INDEX_FILE = "coco/index.json"
COPIED_IMAGES_DIR = "images"
"""Folder of the output that ``--copy-images`` copies the images into (the COCO image root then)."""
FRAGMENT_SUFFIX = ".jsonl"
DEFAULT_MAX_IMAGES_PER_FILE = 50_000
INDEX_FORMAT = 1
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*$")
_EXPORT_NAME = re.compile(r"^(panoptic|instances)(-\d{5})?\.json$")
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def test_pause(point: str, detail: str = "") -> None:
    """TEST-ONLY hook: when ``$ODISE_TEST_PAUSE_AT`` equals ``point`` (``"commit"``: a shard's outputs are
    written, its marker is not; ``"coco"``: one COCO file of a part is published, the index is not), write
    ``detail`` to ``$ODISE_TEST_PAUSE_FILE`` (if set) and sleep ``$ODISE_TEST_PAUSE_S`` seconds (default 600),
    so a test can SIGKILL the process exactly there. Production never sets these variables."""
    if os.environ.get("ODISE_TEST_PAUSE_AT") != point:
        return
    import time

    flag = os.environ.get("ODISE_TEST_PAUSE_FILE")
    if flag:
        with open(f"{flag}.tmp-{os.getpid()}", "w") as f:
            f.write(f"{point} {detail}\n")
        os.replace(f"{flag}.tmp-{os.getpid()}", flag)
    log.warning("TEST HOOK: pausing at %s (%s)", point, detail)
    time.sleep(float(os.environ.get("ODISE_TEST_PAUSE_S", "600")))


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def key_to_filename(key: str) -> str:
    """File-safe relative name for a sample key (no extension added).

    Keys made of safe ``/``-separated components (``[A-Za-z0-9._+=,@-]``, none starting with ``.``)
    are used as they are, sub-folders included; anything else (``..``, absolute paths, spaces,
    ``#``, non-ASCII, > 200 chars) becomes ``<sanitised>-<first 8 hex of sha1(key)>`` in one component.
    """
    parts = key.split("/")
    if key and len(key) <= 200 and all(_SAFE_COMPONENT.match(p) for p in parts):
        return key
    flat = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-")[:100] or "key"
    return f"{flat}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def image_stem(key: str, ext: str | None) -> str:
    """The key without its image extension (``astronaut.jpg`` -> ``astronaut``); tar keys have none."""
    if ext and key.lower().endswith("." + ext.lower()) and len(key) > len(ext) + 1:
        return key[: -len(ext) - 1]
    return key


def png_names(entries: Iterable[tuple[str, str | None]]) -> dict[str, str]:
    """``{key: PNG file name}`` under ``coco/panoptic/<shard_id>/`` for the ``(key, image_ext)`` of one shard.

    The PNG REPLACES the image's extension: ``astronaut.jpg`` -> ``astronaut.png``, tar key ``cats/001`` ->
    ``cats/001.png`` (unsafe keys: :func:`key_to_filename`). Names that would collide (compared
    case-insensitively, so case-insensitive filesystems are safe too), e.g. ``a.jpg`` and ``a.png`` in one
    shard, become ``<stem>-<ext>.png`` (``a-jpg.png``, ``a-png.png``); any name that still collides becomes
    ``<stem>-<first 8 hex of sha1(key)>.png``. Deterministic for a given set of keys.
    """
    entries = list(entries)
    stems = {key: key_to_filename(image_stem(key, ext)) for key, ext in entries}
    names = {key: stems[key] + ".png" for key, _ in entries}

    def collisions(current: dict[str, str]) -> set[str]:
        seen: dict[str, list[str]] = {}
        for key, name in current.items():
            seen.setdefault(name.casefold(), []).append(key)
        return {k for keys in seen.values() if len(keys) > 1 for k in keys}

    clash = collisions(names)
    for key, ext in entries:
        if key in clash:
            names[key] = f"{stems[key]}-{key_to_filename(ext or 'noext')}.png"
    clash = collisions(names)
    for key, _ in entries:
        if key in clash:
            names[key] = f"{stems[key]}-{hashlib.sha1(key.encode()).hexdigest()[:8]}.png"
    return names


def _tar_base(url: str) -> str:
    for suffix in _TAR_SUFFIXES:
        if url.lower().endswith(suffix):
            return url[: -len(suffix)]
    return url


def _member(key: str, ext: str | None) -> str:
    return f"{key}.{ext}" if ext else key


def default_file_name(kind: str, shard_url: str, key: str, ext: str | None) -> str:
    """COCO ``file_name`` without an image root: the key for image folders, ``<tar stem>/<member>`` for tars."""
    if kind == "images":
        return key
    return f"{posixpath.basename(_tar_base(shard_url.split('::')[-1]))}/{_member(key, ext)}"


def copied_image_name(kind: str, shard_id: str, key: str, ext: str | None) -> str:
    """Where ``--copy-images`` puts an image, relative to ``<output>/images/`` (= its COCO ``file_name``).

    ``<shard_id>/<stem><extension>``: the image's own name (the key for image folders, ``<key>.<ext>`` for tar
    members), its stem (:func:`image_stem`) made file-safe as the PNG names are (:func:`key_to_filename`:
    unchanged when safe, sub-folders included), its extension kept as it is. So a copy and its panoptic PNG
    share a stem (``<shard_id>/astronaut.jpg`` beside ``coco/panoptic/<shard_id>/astronaut.png``, the pairing
    detectron2's panoptic loader assumes; except where :func:`png_names` had to rename a colliding PNG).
    Deterministic, and unique within a shard (keys are), so a rerun or a retry rewrites the same file.
    """
    member = key if kind == "images" else _member(key, ext)
    stem = image_stem(key, ext)
    return f"{shard_id}/{key_to_filename(stem)}{member[len(stem) :]}"


def default_coco_url(kind: str, shard_url: str, root: str, key: str, ext: str | None) -> str:
    """Where an image is when its row has no ``image_url``: ``<folder>/<key>`` or ``tar://<member>::<tar URL>``."""
    if kind == "images":
        folder = root or shard_url.split("#", 1)[0]
        return f"{folder.rstrip('/')}/{key}"
    return f"tar://{_member(key, ext)}::{shard_url}"


def _normalise_root(image_root: str | None) -> str | None:
    if not image_root:
        return None
    if "://" not in image_root:
        image_root = "file://" + os.path.abspath(image_root)
    return image_root.rstrip("/") + "/"


def _rooted_file_name(image: Mapping[str, Any], root: str | None) -> str:
    """``file_name`` relative to ``root`` (normalised URL ending in ``/``) when the image lies under it."""
    url = str(image.get("coco_url") or "")
    if root:
        if url.startswith("tar://") and "::" in url:
            member, tar = url[len("tar://") :].split("::", 1)
            base = _tar_base(tar)
            if base.startswith(root):
                return f"{base[len(root) :]}/{member}"
        elif url.startswith(root):
            return url[len(root) :]
    return str(image["file_name"])


# --------------------------------------------------------------------------------------------------
# Fragments (written by the commit)
# --------------------------------------------------------------------------------------------------


def fragment_record(
    row: Mapping[str, Any],
    *,
    seq: int,
    first_instance: int,
    file_name: str,
    coco_url: str,
    png_file: str,
) -> dict[str, Any]:
    """One fragment line for a labelled row.

    Args:
        row: the output row (``image_id``, ``width``, ``height``, ``segments``, ``instances``), ids final.
        seq: the shard's commit sequence number; instance ids are ``seq << 28 | first_instance + j``.
        first_instance: running index, within the shard, of this row's first instance.
        file_name, coco_url: the image reference (:func:`default_file_name`, the row's ``image_url``).
        png_file: the panoptic PNG's name relative to ``coco/panoptic/`` (``<shard_id>/<name>.png``).

    Returns:
        ``{"image": {id, file_name, coco_url, width, height}, "panoptic": {image_id, file_name, segments_info},
        "instances": [{id, image_id, category_id, segmentation (RLE), area, bbox, iscrowd, score}]}``.
    """
    iid, width, height = int(row["image_id"]), int(row["width"]), int(row["height"])
    instances = [
        coco_instance_annotation(inst, ann_id=image_id(seq, first_instance + j), image_id=iid)
        for j, inst in enumerate(row["instances"] or ())
    ]
    return {
        "image": {"id": iid, "file_name": file_name, "coco_url": coco_url, "width": width, "height": height},
        "panoptic": {
            "image_id": iid,
            "file_name": png_file,
            "segments_info": [coco_segment_info(s) for s in row["segments"] or ()],
        },
        "instances": instances,
    }


def json_bytes(obj: Any) -> bytes:
    """Compact, deterministic JSON (sorted keys, UTF-8)."""
    return _json_bytes(obj, sort_keys=True)


def marker_digest(marker: Mapping[str, Any]) -> str:
    """sha256 of a commit marker's content (a replaced shard gets a new marker, so a new digest)."""
    return hashlib.sha256(json_bytes(dict(marker))).hexdigest()


# --------------------------------------------------------------------------------------------------
# Assembly
# --------------------------------------------------------------------------------------------------


def _write_export(fs, dest: str, head: dict, arrays: dict[str, JsonArraySpool], tail: dict) -> None:
    with open_atomic(fs, dest) as out:
        write_json_object(out, head, arrays, tail, sort_keys=True)


@dataclass
class _Part:
    seq_start: int
    markers: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (shard_id, marker) by seq

    @property
    def n_images(self) -> int:
        return sum(int(m.get("n_labelled", 0)) for _, m in self.markers)


def _categories(categories: list[dict[str, Any]]) -> tuple[list[dict], list[dict], set[int]]:
    pan = []
    for i, c in enumerate(categories):
        missing = {"id", "name", "isthing"} - set(c)
        if missing:
            raise ValueError(f"category {i} {c!r} lacks {sorted(missing)}")
        pan.append(
            {
                "id": int(c["id"]),
                "name": str(c["name"]),
                "supercategory": str(c.get("supercategory", "")),
                "isthing": int(bool(c["isthing"])),
                "color": list(category_colour(int(c["id"]))),
            }
        )
    inst = [{k: c[k] for k in ("id", "name", "supercategory", "isthing")} for c in pan]
    return pan, inst, {c["id"] for c in pan}


def _plan_parts(markers: list[tuple[str, dict[str, Any]]], starts: list[int], max_images: int) -> list[_Part]:
    """Group ``(shard_id, marker)`` sorted by seq into parts: keep ``starts``, fill the last part, open new ones."""
    if not markers:
        return []
    starts = sorted(set(starts)) or [int(markers[0][1].get("seq", 0))]
    if int(markers[0][1].get("seq", 0)) < starts[0]:  # a shard below the first part: that part grows down
        starts[0] = int(markers[0][1].get("seq", 0))
    parts = [_Part(s) for s in starts]
    for sid, marker in markers:
        parts[bisect.bisect_right(starts, int(marker.get("seq", 0))) - 1].markers.append((sid, marker))
    parts = [p for p in parts if p.markers]
    # the open (last) part takes new shards up to max_images; the rest opens new parts
    last = parts.pop()
    current = _Part(last.seq_start)
    for sid, marker in last.markers:
        n = int(marker.get("n_labelled", 0))
        if current.markers and current.n_images + n > max_images:
            parts.append(current)
            current = _Part(int(marker.get("seq", 0)))
        current.markers.append((sid, marker))
    parts.append(current)
    return parts


def _file_names(n_parts: int, i: int) -> dict[str, str]:
    if n_parts == 1:
        return {"panoptic": "panoptic.json", "instances": "instances.json"}
    return {"panoptic": f"panoptic-{i:05d}.json", "instances": f"instances-{i:05d}.json"}


def _part_digest(part: _Part, settings: str) -> str:
    h = hashlib.sha256(settings.encode())
    for sid, marker in part.markers:
        h.update(f"{sid}:{marker_digest(marker)}\n".encode())
    return h.hexdigest()


def _fragments(fs, root: str, part: _Part, batch_images: int = 5000):
    """``(shard_id, line bytes)`` of every fragment of a part, in seq order; small fragments are fetched
    concurrently in batches of about ``batch_images`` images, large ones streamed line by line."""
    pending: list[tuple[str, str]] = []
    pending_images = 0

    def flush():
        paths = [p for _, p in pending]
        got = dict(cat_many(fs, paths, chunk=64, what="COCO fragment"))
        for sid, path in pending:
            if path not in got:
                raise FileNotFoundError(f"COCO fragment {path} of committed shard {sid} is missing")
            for line in got[path].splitlines():
                if line.strip():
                    yield sid, line

    for sid, marker in part.markers:
        path = posixpath.join(root, marker["coco_part"])
        n = int(marker.get("n_labelled", 0))
        if n > batch_images:
            yield from flush()
            pending, pending_images = [], 0
            with fs.open(path, "rb") as f:
                for line in f:
                    if line.strip():
                        yield sid, line
            continue
        pending.append((sid, path))
        pending_images += n
        if pending_images >= batch_images:
            yield from flush()
            pending, pending_images = [], 0
    if pending:
        yield from flush()


def _build_part(fs, root: str, part: _Part, names: dict[str, str], ctx: dict[str, Any]) -> dict[str, int]:
    """Stream a part's fragments into its two files; returns its counts."""
    known: set[int] = ctx["known"]
    image_root = ctx["image_root"]
    with tempfile.TemporaryDirectory(prefix="odise-coco-") as tmp:
        images, pan_anns, inst_anns = (JsonArraySpool(tmp, sort_keys=True) for _ in range(3))
        unknown: set[int] = set()
        for sid, line in _fragments(fs, root, part):
            rec = json.loads(line)
            image = rec["image"]
            if image_root:
                image = {**image, "file_name": _rooted_file_name(image, image_root)}
            images.add(image)
            unknown |= {s["category_id"] for s in rec["panoptic"]["segments_info"]} - known
            pan_anns.add(rec["panoptic"])
            for ann in rec["instances"]:
                if ann["category_id"] not in known:
                    unknown.add(ann["category_id"])
                inst_anns.add(ann)
            if unknown:
                raise ValueError(
                    f"committed labels of shard {sid} use category ids {sorted(unknown)[:10]} missing from "
                    "`categories`"
                )
        head = {"info": ctx["info"], "licenses": []}
        _write_export(
            fs,
            posixpath.join(root, COCO_DIR, names["panoptic"]),
            head,
            {"images": images, "annotations": pan_anns},
            {"categories": ctx["pan_cats"]},
        )
        test_pause("coco", names["panoptic"])
        _write_export(
            fs,
            posixpath.join(root, COCO_DIR, names["instances"]),
            head,
            {"images": images, "annotations": inst_anns},
            {"categories": ctx["inst_cats"]},
        )
        return {"n_images": images.count, "n_panoptic_annotations": pan_anns.count,
                "n_instance_annotations": inst_anns.count}  # fmt: skip


def read_index(out_url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The export's ``coco/index.json``, or None when there is none (or it is unreadable)."""
    fs, root = fs_root(out_url, storage_options)
    raw = read_bytes(fs, posixpath.join(root, INDEX_FILE))
    if raw is None:
        return None
    try:
        index = json.loads(raw)
    except ValueError:
        log.warning("unreadable %s; the COCO export is rebuilt", INDEX_FILE)
        return None
    return index if isinstance(index, dict) and index.get("format") == INDEX_FORMAT else None


def finalize_coco(
    out_url: str,
    storage_options: dict[str, Any] | None,
    categories: list[dict[str, Any]],
    *,
    markers: Mapping[str, Mapping[str, Any]] | None = None,
    max_images_per_file: int = DEFAULT_MAX_IMAGES_PER_FILE,
    image_root: str | None = None,
    copied_images: bool = False,
    description: str = "ODISE open-vocabulary panoptic pseudo-labels",
) -> dict[str, Any]:
    """Bring the COCO export up to date with the committed shards, rebuilding only stale parts (module doc).

    Files (``coco/`` under the output; per part):

    * ``panoptic[-NNNNN].json``: ``images`` (``id``, ``file_name``, ``coco_url``, ``width``, ``height``),
      ``annotations`` (``image_id``, ``file_name`` = ``<shard_id>/<name>.png`` under ``coco/panoptic/``,
      ``segments_info`` [``id``, ``category_id``, ``area``, ``bbox``, ``iscrowd`` 0]), ``categories`` (``id``,
      ``name``, ``supercategory``, ``isthing`` 0/1, ``color`` [r, g, b]);
    * ``instances[-NNNNN].json``: the same ``images``; ``annotations`` with ``id``, RLE ``segmentation``,
      ``area``, ``bbox``, ``iscrowd`` 0, ``score``; ``categories`` = *all* categories (things and stuff, with
      ``isthing``) so category ids mean the same in both files;
    * ``index.json``: ``{"format", "schema_version", "max_images_per_file", "image_root", "images_copied",
      "settings_digest", "digest", "n_images", "n_panoptic_annotations", "n_instance_annotations", "parts": [{"index",
      "panoptic", "instances", "seq_start", "seq_range": [lo, hi], "n_shards", "n_images",
      "n_panoptic_annotations", "n_instance_annotations", "digest"}], "written_at"}``.

    Error rows are not exported. Shards committed without COCO output are skipped (logged).

    Args:
        markers: ``{shard_id: marker}`` of every committed shard (default: read them all).
        max_images_per_file: labelled images per part before the export is split into numbered parts.
        image_root: base that ``file_name`` is made relative to (module doc); default: per-source defaults.
        copied_images: the images were copied to ``<output>/images/`` (``--copy-images``): the fragments'
            ``file_name`` is relative to that folder, which ``index.json`` records as the image root.

    Returns:
        ``{"panoptic": URL, "instances": URL, "index": URL, "parts": "N", "rebuilt": "K"}``; with several parts
        ``panoptic`` / ``instances`` are the ``panoptic-*.json`` / ``instances-*.json`` patterns.

    Raises:
        ValueError: a committed shard uses a category id that is not in ``categories``; both
            ``image_root`` and ``copied_images``.
    """
    if max_images_per_file < 1:
        raise ValueError(f"max_images_per_file must be >= 1, got {max_images_per_file}")
    if image_root and copied_images:
        raise ValueError(
            f"image_root ({image_root}) and copied_images exclude each other: copies are under images/"
        )
    fs, root = fs_root(out_url, storage_options)
    if markers is None:
        from pipeline.annotate.commit import committed_shards

        markers = committed_shards(out_url, storage_options)
    pan_cats, inst_cats, known = _categories(categories)
    norm_root = _normalise_root(image_root)
    recorded_root = norm_root
    if copied_images:  # file_name is already relative to <output>/images/ (the fragments say so)
        recorded_root = fs.unstrip_protocol(posixpath.join(root, COPIED_IMAGES_DIR)).rstrip("/") + "/"
    settings = json_bytes(
        {
            "categories": pan_cats,
            "image_root": norm_root,
            **(
                {"copied_images": True} if copied_images else {}
            ),  # absent otherwise: older digests stay valid
            "max_images_per_file": max_images_per_file,
            "description": description,
            "schema_version": SCHEMA_VERSION,
        }  # fmt: skip
    ).decode()
    settings_digest = hashlib.sha256(settings.encode()).hexdigest()
    usable = []
    for sid, marker in markers.items():
        if marker.get("coco_part") is None:
            log.warning("shard %s was committed without COCO output; not in the COCO exports", sid)
            continue
        usable.append((sid, dict(marker)))
    usable.sort(key=lambda item: (int(item[1].get("seq", 0)), item[0]))

    index = read_index(out_url, storage_options)
    compatible = index is not None and index.get("settings_digest") == settings_digest
    old_parts = {int(p["seq_start"]): p for p in index["parts"]} if compatible else {}
    parts = _plan_parts(usable, list(old_parts), max_images_per_file) or [_Part(0)]  # empty: categories only
    existing = set(list_children(fs, posixpath.join(root, COCO_DIR)))

    info = {"description": description, "date_created": utc_now(), "version": str(SCHEMA_VERSION)}
    ctx = {
        "known": known,
        "image_root": norm_root,
        "info": info,
        "pan_cats": pan_cats,
        "inst_cats": inst_cats,
    }
    entries, rebuilt = [], []
    for i, part in enumerate(parts):
        names = _file_names(len(parts), i)
        digest = _part_digest(part, settings)
        old = old_parts.get(part.seq_start)
        current = (
            old is not None
            and old.get("digest") == digest
            and old.get("panoptic") == names["panoptic"]
            and old.get("instances") == names["instances"]
            and names["panoptic"] in existing
            and names["instances"] in existing
        )
        if current:
            counts = {k: old[k] for k in ("n_images", "n_panoptic_annotations", "n_instance_annotations")}
        else:
            counts = _build_part(fs, root, part, names, ctx)
            rebuilt.append(i)
        seqs = [int(m.get("seq", 0)) for _, m in part.markers]
        entries.append(
            {
                "index": i,
                **names,
                "seq_start": part.seq_start,
                "seq_range": [min(seqs), max(seqs)] if seqs else None,
                "n_shards": len(part.markers),
                **counts,
                "digest": digest,
            }  # fmt: skip
        )
    names_now = {e[k] for e in entries for k in ("panoptic", "instances")}
    digest = hashlib.sha256(
        "".join(e["digest"] for e in entries).encode() + settings_digest.encode()
    ).hexdigest()
    if rebuilt or index is None or index.get("digest") != digest:
        new_index = {
            "format": INDEX_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "max_images_per_file": max_images_per_file,
            "image_root": recorded_root,
            "images_copied": copied_images,
            "settings_digest": settings_digest,
            "digest": digest,
            "n_images": sum(e["n_images"] for e in entries),
            "n_panoptic_annotations": sum(e["n_panoptic_annotations"] for e in entries),
            "n_instance_annotations": sum(e["n_instance_annotations"] for e in entries),
            "parts": entries,
            "written_at": utc_now(),
        }
        write_bytes(fs, posixpath.join(root, INDEX_FILE), (json.dumps(new_index, indent=1) + "\n").encode())
        log.info("COCO export: %d part(s), rebuilt %s", len(entries), rebuilt)
    stale = sorted(n for n in existing if _EXPORT_NAME.match(n) and n not in names_now)
    delete(fs, [posixpath.join(root, COCO_DIR, n) for n in stale])

    def url(name: str) -> str:
        return fs.unstrip_protocol(posixpath.join(root, COCO_DIR, name))

    single = len(entries) <= 1
    return {
        "panoptic": url("panoptic.json" if single else "panoptic-*.json"),
        "instances": url("instances.json" if single else "instances-*.json"),
        "index": url("index.json"),
        "parts": str(max(1, len(entries))),
        "rebuilt": str(len(rebuilt)),
    }
