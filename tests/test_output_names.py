"""What the command and the flow's report say about the output's files: the COCO parts (``coco/index.json``
once the export is split), the PNG and overlay names, the copied images."""

from __future__ import annotations

from pipeline.config import AnnotateConfig, RunSummary


def _summary(parts: int, out: str = "/data/out") -> RunSummary:
    coco = {"panoptic": f"{out}/coco/panoptic.json", "instances": f"{out}/coco/instances.json",
            "index": f"{out}/coco/index.json"}  # fmt: skip
    if parts > 1:
        coco.update(panoptic=f"{out}/coco/panoptic-*.json", instances=f"{out}/coco/instances-*.json")
    return RunSummary(run_id="r", output=out, images=3, labelled=3, coco=coco, coco_parts=parts)


def test_end_of_run_summary_points_at_the_index_when_the_export_has_parts(capsys):
    from flows.cli import _print_summary

    _print_summary(_summary(1), "/data/out")
    one = capsys.readouterr().out
    assert "COCO:        /data/out/coco/panoptic.json, /data/out/coco/instances.json" in one
    assert "index.json" not in one and "images:" not in one

    _print_summary(_summary(3, "s3://b/out"), "s3://b/out", copied_images=True)
    three = capsys.readouterr().out
    assert "COCO:        s3://b/out/coco/index.json lists 3 parts" in three
    assert "panoptic.json," not in three
    assert "images:      s3://b/out/images  (copies of the inputs" in three


def test_flow_report_layout_names_the_current_files():
    from flows.annotate import _layout

    config = AnnotateConfig(input="x", output="/data/out")
    one = _layout(_summary(1), config)
    assert "`coco/panoptic.json` + `coco/instances.json`" in one
    assert "`coco/panoptic/<shard>/<name>.png` (the image's name with its extension replaced" in one
    assert "<key>.png" not in one and "images/" not in one
    many = _layout(_summary(4), config.model_copy(update={"copy_images": True}))
    assert "`coco/index.json` listing 4 parts" in many and "`images/<shard>/<name>`" in many
    assert "coco/panoptic.json" not in many
    no_coco = _layout(RunSummary(run_id="r", output="/data/out"), config)
    assert "coco/" not in no_coco and "`overlays/<shard>/<name>.jpg`" in no_coco


def test_output_format_page_documents_every_column_kind_and_file():
    """docs/output-format.md stays exact: every Parquet column, every error kind with its retryable flag,
    every provenance key and every marker field is in it."""
    import dataclasses
    import re
    from pathlib import Path

    from pipeline.annotate.commit import CommitInfo
    from pipeline.errors import KINDS
    from pipeline.schema import COLUMNS, RunProvenance

    page = (Path(__file__).resolve().parents[1] / "docs" / "output-format.md").read_text()
    section = page[page.index("## 1. An annotate output") : page.index("## 2. Exports")]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    for column in COLUMNS:
        assert any(re.match(rf"\| [^|]*`{column}`", r) for r in rows), column
    for kind, spec in KINDS.items():
        (row,) = [r for r in rows if re.match(rf"\| [^|]*`{kind}`", r) and re.search(r"\| (yes|no) \|", r)]
        assert re.search(r"\| (yes|no) \|", row).group(1) == ("yes" if spec.retryable else "no"), kind
    for key in (f.name for f in dataclasses.fields(RunProvenance)):
        assert f"`{key}`" in section, key
    for name in {f.name for f in dataclasses.fields(CommitInfo)} - {"category_counts"}:
        assert f"`{name}`" in section, name
    for path in ("parquet/", "coco/index.json", "coco/_parts/", "overlays/", "images/", "_commits/", "_members/",
                 "_replacing/", "_staging/", "_lease.json"):  # fmt: skip
        assert path in section, path
