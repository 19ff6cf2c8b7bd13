"""Console scripts: ``odise-annotate``, ``odise-evaluate``, ``odise-train``, ``odise-convert``.

Each runs its Prefect flow in this process: local files, a local Ray (unless ``--ray-address``), and
Prefect without a server (a temporary local API, "ephemeral mode") unless ``PREFECT_API_URL`` points at
one, in which case the run is recorded there. Parameters are validated and the inputs checked
*before* Prefect or Ray start, so a bad option, a missing file or unreachable weights stop the
command at once with a one-line message (exit code 2) instead of a traceback.

Exit codes: 0 success, 1 the run failed, 2 bad options or inputs (including missing weights),
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["annotate_main", "evaluate_main", "train_main", "convert_main", "build_annotate_parser"]

PLUMBING_BANNER = """\
============================================================================================
 PLUMBING CHECK: --model {model} builds the model with RANDOM weights (no checkpoint).
 Every label it writes is meaningless; this run only checks that the whole path works
 (read, Ray, model, encode, write). For real labels use the default model
 (odise_label_coco) with the official weights (see README.md).
============================================================================================"""


# --------------------------------------------------------------------------------------------------
# shared
# --------------------------------------------------------------------------------------------------
def _prepare_environment(log_level: str) -> None:
    """Settings for a local run; must happen before Prefect is imported. User settings win."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", log_level)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if log_level != "DEBUG":
        import logging

        for name in ("ray", "ray.data", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


INTERRUPT_GRACE_S = 12.0
"""After Ctrl-C, seconds the run gets to stop cleanly before the process exits anyway (code 130)."""


def _install_interrupt_guard(prog: str, grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Make Ctrl-C always end the command with exit code 130.

    A terminal's Ctrl-C reaches the whole process group, so the temporary Prefect server and the local Ray
    processes stop at the same moment as this process; Prefect's client would then retry reporting the
    crash to a server that is gone for minutes. The first SIGINT raises ``KeyboardInterrupt`` as usual and
    starts a timer; if the process has not exited ``grace_s`` later (or on a second Ctrl-C) it exits at once.
    That is safe: a shard is only committed by its marker, so a rerun redoes the unfinished ones.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    interrupts = []

    def hard_exit() -> None:
        print(f"{prog}: interrupted (committed shards are kept; rerun the same command to resume)", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)

    def on_sigint(signum: int, frame: Any) -> None:
        interrupts.append(signum)
        if len(interrupts) > 1:
            hard_exit()
        timer = threading.Timer(grace_s, hard_exit)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def _run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; known input errors -> one line + exit 2, other failures -> one line + exit 1."""
    from .params import user_errors

    _install_interrupt_guard(prog)
    try:
        return body()
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except user_errors() as exc:
        return _fail(prog, str(exc), 2)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is a message, not a traceback
        if os.environ.get("ODISE_DEBUG"):
            raise
        return _fail(prog, f"{type(exc).__name__}: {exc} (set ODISE_DEBUG=1 for the traceback)", 1)


def _add_common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("credentials and logging")
    group.add_argument(
        "--storage-block",
        metavar="NAME",
        help="Prefect Secret block (or json/NAME) holding fsspec credentials, e.g. "
        '{"key": ..., "secret": ...}; default: credentials from the environment (AWS_ACCESS_KEY_ID / '
        "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws) or fsspec config. Never pass credentials in --storage-options.",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show Prefect and Ray INFO logs (default: warnings and errors only)",
    )


# --------------------------------------------------------------------------------------------------
# odise-annotate
# --------------------------------------------------------------------------------------------------
_ANNOTATE_GROUPS = {
    "input / output": [
        "input",
        "output",
        "vocab_file",
        "merge_vocab",
        "storage_options",
        "output_storage_options",
    ],
    "model and weights": [
        "model",
        "checkpoint",
        "sd_weights",
        "clip_weights",
        "pretrained",
        "offline",
        "cache_dir",
    ],
    "compute": [
        "batch_size",
        "tile_batch_size",
        "num_actors",
        "gpus_per_actor",
        "cpus_per_actor",
        "device",
        "dtype",
        "ray_address",
        "num_cpus",
        "no_progress_timeout_s",
    ],
    "labels": ["object_mask_threshold", "overlap_threshold", "alpha", "beta"],
    "outputs": [
        "include_png",
        "write_coco",
        "overlays",
        "max_pixels",
        "images_per_virtual_shard",
        "allow_provenance_mismatch",
        "retry_errors",
        "relabel_changed",
        "coco_max_images_per_file",
        "image_root",
    ],
}

_EXTRA_HELP = {
    "input": "shards or a folder: folder of images, folder of .tar shards, glob ('shards/*.tar'), brace pattern "
    "('s3://bucket/shards/{000000..000099}.tar'), manifest file; several may be given",
    "output": "output folder or URL (out/, s3://bucket/labels/run1); rerunning into it labels only what is missing",
    "vocab_file": "classes.txt path or URL (one class per line, comma-separated synonyms, [stuff] marker, # comments) "
    "or a built-in vocabulary: coco_panoptic, ade20k_150",
    "model": "odise_label_coco (official, needs the weights), odise_caption_coco, or tiny / tiny_caption: random "
    "weights, a PLUMBING CHECK that runs offline in about a minute on a CPU; or a model JSON path",
    "storage_options": "fsspec options as JSON, WITHOUT credentials, e.g. "
    '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    "output_storage_options": "fsspec options (JSON, no credentials) for the output when they differ from the input's",
    "ray_address": "existing Ray cluster: auto, ray://head:10001; default: start a local Ray",
    "offline": "never touch the network for weights: a missing file stops the command at once, naming it "
    "(default: $ODISE_OFFLINE / $HF_HUB_OFFLINE)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _json_or_text(text: str) -> Any:
    """A JSON list / object when the text is one, else the text (a path or URL)."""
    if text.lstrip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    return text


def add_field_option(
    parser: Any,
    model_cls: Any,
    name: str,
    *,
    help_overrides: dict[str, str] | None = None,
    flag: str | None = None,
    required: bool | None = None,
    metavar: str | None = None,
) -> None:
    """Add the option for field ``name`` of the pydantic model ``model_cls``.

    Type, choices, default and help come from the field (so ``--help`` documents every field and stays in
    sync with the config). Every option defaults to ``None`` = "the config's default"; booleans get
    ``--x / --no-x``, lists ``nargs="+"``, dicts JSON.
    """
    field = model_cls.model_fields[name]
    ann = field.annotation
    args = (
        [a for a in typing.get_args(ann) if a is not type(None)]
        if isinstance(ann, types.UnionType)
        else [ann]
    )
    default = (
        None if field.is_required() else (field.default_factory() if field.default_factory else field.default)
    )
    help_text = (help_overrides or {}).get(name, field.description or name)
    if name.endswith("storage_options") and name not in (help_overrides or {}):
        help_text += "; as JSON, WITHOUT credentials (see --storage-block)"
    kwargs: dict[str, Any] = {"dest": name, "default": None}
    origins = {typing.get_origin(a) or a for a in args}
    if origins == {dict}:
        kwargs.update(type=_json_dict, metavar="JSON")
    elif list in origins and dict not in {typing.get_origin(x) for a in args for x in typing.get_args(a)}:
        kwargs.update(nargs="+", metavar=name.split("_")[-1].upper())
    elif list in origins:  # e.g. categories: a path/URL or a JSON list
        kwargs.update(type=_json_or_text, metavar="PATH|JSON")
    elif args[0] is bool:
        kwargs.update(action=argparse.BooleanOptionalAction)
        if default is not None:
            help_text += f" (default: {'yes' if default else 'no'})"
    elif typing.get_origin(args[0]) is typing.Literal:
        kwargs.update(choices=list(typing.get_args(args[0])))
    elif args[0] in (int, float):
        kwargs.update(type=args[0], metavar="N" if args[0] is int else "X")
    else:
        kwargs.update(metavar=name.split("_")[-1].upper())
    if default not in (None, [], {}) and args[0] is not bool:
        help_text += f" (default: {default})"
    is_required = field.is_required() and name != "storage_options" if required is None else required
    if is_required:
        kwargs["required"] = True
    if metavar and "action" not in kwargs:
        kwargs["metavar"] = metavar
    parser.add_argument(flag or _flag(name), help=help_text, **kwargs)


def _add_fields(
    parser: argparse.ArgumentParser, model_cls: Any, groups: dict[str, list[str]], **kwargs: Any
) -> None:
    """One option per field of ``model_cls``, in ``groups``; fields not listed go to an "other" group."""
    seen: set[str] = set()
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        for name in names:
            add_field_option(
                group, model_cls, name, **kwargs.get(name, {}), help_overrides=kwargs.get("help")
            )
            seen.add(name)
    rest = [n for n in model_cls.model_fields if n not in seen]
    if rest:
        group = parser.add_argument_group("other")
        for name in rest:
            add_field_option(
                group, model_cls, name, **kwargs.get(name, {}), help_overrides=kwargs.get("help")
            )


def _options_from(ns: argparse.Namespace, model_cls: Any) -> dict[str, Any]:
    """The fields of ``model_cls`` given on the command line (``[x]`` -> ``x`` for one shard spec)."""
    out = {}
    for name in model_cls.model_fields:
        value = getattr(ns, name, None)
        if value is not None:
            out[name] = _single(value) if name in ("input", "train", "val", "ground_truth_shards") else value
    return out


def _single(value: Any) -> Any:
    """``[x]`` -> ``x`` (one shard spec stays a string parameter)."""
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def build_annotate_parser() -> argparse.ArgumentParser:
    """The ``odise-annotate`` parser: one option per ``AnnotateConfig`` field, plus credentials and logging."""
    from pipeline.config import AnnotateConfig

    parser = argparse.ArgumentParser(
        prog="odise-annotate",
        description="Label images with open-vocabulary panoptic segmentation (ODISE): shards or a folder in, "
        "Parquet + COCO panoptic + overlays out. Runs the Prefect 'annotate' flow in this process "
        "(local Ray, no Prefect server needed).",
        epilog="Example (plumbing check on the shipped sample photos, ~1 min on a laptop CPU):\n"
        "  odise-annotate --input examples/images --vocab-file examples/classes.txt --output out/ --model tiny\n"
        "Real labels: drop --model tiny (official weights are downloaded into the cache, or pass --checkpoint / "
        "--sd-weights / --clip-weights; see README.md).\n"
        "Exit codes: 0 ok, 1 run failed, 2 bad options or inputs (e.g. missing weights), 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(
        parser,
        AnnotateConfig,
        _ANNOTATE_GROUPS,
        input={"metavar": "SHARDS"},
        output={"metavar": "URL"},
        help=_EXTRA_HELP,
    )
    _add_common(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on the terminal")
    return parser


class _ProgressBar:
    """tqdm bar over shards, fed by the flow's progress events; ticks every second while labelling."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled
        self.bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event.get("event") == "start" and self.bar is None:
            self.bar = tqdm(
                total=self.total, unit="shard", desc="labelling", dynamic_ncols=True, file=sys.stderr
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        elif event.get("event") == "shard" and self.bar is not None:
            self.bar.n = event["shards_done"]
            self.bar.set_postfix(
                images=event["images"], errors=event["errors"], segments=event["segments"], refresh=False
            )
            self.bar.refresh()
        elif event.get("event") == "images" and self.bar is not None:
            self.bar.set_postfix(images=event.get("images_staged", 0), errors=event["errors"], refresh=True)
        elif event.get("event") == "done":
            self.close()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_summary(summary: Any, output: str) -> None:
    join = (
        (lambda *p: "/".join([output.rstrip("/"), *p]))
        if "://" in output
        else (lambda *p: os.path.join(output, *p))
    )
    print(
        f"labelled {summary.labelled} image(s) ({summary.errors} errors, {summary.segments} segments) in "
        f"{summary.elapsed_s:.1f} s; shards: {summary.shards_committed} committed now, "
        f"{summary.shards_skipped} already done, {summary.shards_total} in total"
    )
    print(f"  output:      {output}")
    print(f"  parquet:     {join('parquet')}  (one row per image: segments, RLE masks, panoptic PNG)")
    if summary.coco:
        print(
            f"  COCO:        {join('coco', 'panoptic.json')}, {join('coco', 'instances.json')}, PNGs in {join('coco', 'panoptic')}"
        )
    shown = summary.overlays[:3]
    if shown:
        print(f"  overlays:    {len(summary.overlays)} written, e.g. {shown[0]}")
    print(f"  provenance:  {join('provenance.json')}, totals: {join('summary.json')}")
    for reason, n in list(summary.error_reasons.items())[:5]:
        print(f"  errors:      {n} x {reason}")


def annotate_main(argv: Sequence[str] | None = None) -> int:
    """``odise-annotate``: run the ``annotate`` flow locally (see ``--help``)."""
    parser = build_annotate_parser()
    ns = parser.parse_args(argv)
    _prepare_environment("INFO" if ns.verbose else "WARNING")
    prog = parser.prog

    def body() -> int:
        from pipeline.config import AnnotateConfig

        from .params import annotate_config

        params = _options_from(ns, AnnotateConfig)
        # 1. validate and check (no Prefect, no Ray): fails at once on bad options, inputs or weights
        config = annotate_config(params)
        if config.is_plumbing_check:
            print(PLUMBING_BANNER.format(model=config.model), file=sys.stderr)
        print(
            f"checking inputs (vocabulary, shards, output, model {config.model}, weights) ...",
            file=sys.stderr,
        )
        checked = _precheck(config, ns.storage_block)
        print(
            f"inputs OK: {len(checked['shards'])} shard(s), {len(checked['vocabulary'])} categories; "
            "starting the annotate flow (Prefect, local Ray) ...",
            file=sys.stderr,
        )
        # 2. the flow (check -> label -> report), with a progress bar fed by its progress events
        from .annotate import annotate, progress_listener

        bar = _ProgressBar(len(checked["shards"]), enabled=not ns.no_progress)
        try:
            with progress_listener(bar):
                summary = annotate(**params, storage_block=ns.storage_block)
        finally:
            bar.close()
        _print_summary(summary, config.output)
        if summary.plumbing_check:
            print(PLUMBING_BANNER.format(model=config.model), file=sys.stderr)
        return 0

    return _run_guarded(prog, body)


def _precheck(config: Any, storage_block: str | None) -> dict[str, Any]:
    from pipeline.annotate.checks import check_inputs

    if storage_block:
        from ._prefect import with_credentials

        config = with_credentials(config, storage_block)
    return check_inputs(config)


# --------------------------------------------------------------------------------------------------
# odise-evaluate
# --------------------------------------------------------------------------------------------------
_EVALUATE_GROUPS = {
    "ground truth": ["ground_truth", "ground_truth_png", "ground_truth_shards", "categories"],
    "predictions and results": [
        "predictions",
        "json_output",
        "match",
        "semantic",
        "instance_ap",
        "storage_options",
    ],
}


def build_evaluate_parser() -> argparse.ArgumentParser:
    """The ``odise-evaluate`` parser: one option per ``pipeline.evaluate.run.EvaluateConfig`` field."""
    from pipeline.config import EvaluateConfig

    parser = argparse.ArgumentParser(
        prog="odise-evaluate",
        description="Score an annotate output (PQ/SQ/RQ, mIoU, mask AP) against panoptic ground truth "
        "(a COCO panoptic JSON + PNG folder, or labeled shards). Runs the Prefect 'evaluate' flow in this process.",
        epilog="Example:\n  odise-evaluate --ground-truth panoptic_val2017.json --ground-truth-png panoptic_val2017/ "
        "--predictions out/ --json pq.json\n"
        "Exit codes: 0 ok, 1 run failed, 2 bad options or inputs, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(
        parser,
        EvaluateConfig,
        _EVALUATE_GROUPS,
        json_output={"flag": "--json", "metavar": "FILE"},
        ground_truth={"metavar": "JSON"},
        ground_truth_png={"metavar": "DIR"},
        ground_truth_shards={"metavar": "SHARDS"},
        predictions={"metavar": "URL"},
    )
    _add_common(parser)
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """``odise-evaluate``: run the ``evaluate`` flow locally; prints the headline metrics."""
    parser = build_evaluate_parser()
    ns = parser.parse_args(argv)
    _prepare_environment("INFO" if ns.verbose else "WARNING")

    def body() -> int:
        from pipeline.config import EvaluateConfig

        from .evaluate import evaluate_config

        params = _options_from(ns, EvaluateConfig)
        evaluate_config(params)  # validate before Prefect starts
        from .evaluate import evaluate, headline_rows, per_class_lines

        metrics = evaluate(**params, storage_block=ns.storage_block)
        for row in headline_rows(metrics):
            print(f"{row['metric']:>16s}  {row['value']}")
        table = per_class_lines(metrics)
        if table:
            print()
            print("\n".join(table))
        if ns.json_output:
            print(f"metrics written to {ns.json_output}")
        return 0

    return _run_guarded(parser.prog, body)


# --------------------------------------------------------------------------------------------------
# odise-train
# --------------------------------------------------------------------------------------------------
_TRAIN_GROUPS = {
    "data": ["train", "val", "output", "vocab", "storage_options"],
    "model and weights": [
        "model",
        "checkpoint",
        "sd_weights",
        "clip_weights",
        "pretrained",
        "offline",
        "cache_dir",
    ],
    "schedule": ["max_steps", "batch_size", "lr", "resume", "seed", "eval_every", "checkpoint_every"],
    "compute": [
        "num_workers",
        "use_gpu",
        "cpus_per_worker",
        "ray_address",
        "ray_storage_path",
        "amp",
        "tile_batch_size",
    ],
}


def build_train_parser() -> argparse.ArgumentParser:
    """The ``odise-train`` parser: one option per ``pipeline.train.run.TrainConfig`` field."""
    from pipeline.config import TrainConfig

    parser = argparse.ArgumentParser(
        prog="odise-train",
        description="Fine-tune ODISE on labeled WebDataset shards. Runs the Prefect 'train' flow in this process.",
        epilog="Example (a few steps of the tiny model, a plumbing check):\n"
        "  odise-train --train data/train --val data/val --output runs/tiny --model tiny --max-steps 4\n"
        "Exit codes: 0 ok, 1 run failed, 2 bad options or inputs, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(
        parser,
        TrainConfig,
        _TRAIN_GROUPS,
        train={"metavar": "SHARDS"},
        val={"metavar": "SHARDS"},
        output={"metavar": "URL"},
    )
    _add_common(parser)
    return parser


def train_main(argv: Sequence[str] | None = None) -> int:
    """``odise-train``: run the ``train`` flow locally; prints the training summary."""
    parser = build_train_parser()
    ns = parser.parse_args(argv)
    _prepare_environment("INFO" if ns.verbose else "WARNING")

    def body() -> int:
        import inspect

        from pipeline.config import TrainConfig

        from .train import train_config

        given = _options_from(ns, TrainConfig)
        train_config(given)  # validate before Prefect starts
        from .train import train_flow

        names = set(inspect.signature(train_flow.fn).parameters) - {"options", "storage_block"}
        params = {k: v for k, v in given.items() if k in names}
        options = {k: v for k, v in given.items() if k not in names}
        result = train_flow(**params, options=options or None, storage_block=ns.storage_block)
        for key, value in result.items():
            if isinstance(value, int | float | str | bool):
                print(f"{key:>16s}  {value}")
        return 0

    return _run_guarded(parser.prog, body)


# --------------------------------------------------------------------------------------------------
# odise-convert
# --------------------------------------------------------------------------------------------------
def build_convert_parser() -> argparse.ArgumentParser:
    """The ``odise-convert`` parser (``pipeline.groundtruth.convert_coco_panoptic_to_shards``)."""
    parser = argparse.ArgumentParser(
        prog="odise-convert",
        description="Convert a COCO panoptic dataset (JSON + PNG folder + images) to labeled WebDataset shards: "
        "the ground-truth input of odise-evaluate --ground-truth-shards and of odise-train --train / --val. "
        "Each sample holds the image bytes, the panoptic PNG and a segments JSON (with the caption, if any); "
        "categories.json is written next to the shards.",
        epilog="Example:\n  odise-convert --ground-truth panoptic_train2017.json --ground-truth-png panoptic_train2017/ "
        "--images train2017/ --output s3://bucket/coco-train/ --samples-per-shard 1000\n"
        "Exit codes: 0 ok, 1 failed, 2 bad options or inputs, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    group = parser.add_argument_group("input and output")
    group.add_argument("--ground-truth", required=True, metavar="JSON", help="COCO panoptic JSON (path or URL)")
    group.add_argument(
        "--ground-truth-png",
        metavar="DIR",
        help="folder of the COCO panoptic PNGs (default: the JSON's path without .json)",
    )
    group.add_argument("--images", required=True, metavar="DIR", help="folder of the images (path or URL)")
    group.add_argument(
        "--output", required=True, metavar="URL", help="folder for the shards (created; same-named shards overwritten)"
    )
    group.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="samples per shard (default: 1000)")
    group.add_argument(
        "--shard-name",
        default="shard-{index:06d}.tar",
        metavar="PATTERN",
        help="shard file name with an {index} field (default: shard-{index:06d}.tar)",
    )
    group.add_argument(
        "--captions",
        metavar="JSON",
        help="optional captions: a JSON file (path or URL) mapping image id to a caption or a list of captions, "
        "or a COCO captions file (annotations[].image_id / caption); all captions are kept and training draws "
        "one per use",
    )
    group.add_argument(
        "--storage-options",
        type=_json_dict,
        default={},
        metavar="JSON",
        help="fsspec options for every URL (e.g. S3 endpoint); as JSON, WITHOUT credentials (see --storage-block)",
    )
    _add_common(parser)
    return parser


def _read_captions(url: str, options: dict[str, Any]) -> dict[Any, Any]:
    """``{image_id: caption or [captions]}`` from a JSON mapping or a COCO captions file (all captions)."""
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8", **options) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"captions file {url!r}: cannot read it as JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        captions: dict[Any, list[str]] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(f"captions file {url!r}: annotations[{i}] needs image_id and a caption string")
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        return captions
    if isinstance(data, dict) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(c, str) for c in v)) for v in data.values()
    ):
        # JSON object keys are strings; COCO image ids are usually ints.
        return {int(k) if k.isdigit() else k: v for k, v in data.items()}
    raise ValueError(
        f"captions file {url!r}: expected an object mapping image id to caption, or a COCO captions file"
    )


def convert_main(argv: Sequence[str] | None = None) -> int:
    """``odise-convert``: COCO panoptic -> labeled WebDataset shards."""
    parser = build_convert_parser()
    ns = parser.parse_args(argv)
    _prepare_environment("INFO" if ns.verbose else "WARNING")

    def body() -> int:
        from pipeline.groundtruth import convert_coco_panoptic_to_shards

        from .params import check_no_credentials, is_url, resolve_path

        check_no_credentials("storage_options", ns.storage_options)
        options = dict(ns.storage_options)
        if ns.storage_block:
            from ._prefect import load_storage_credentials, split_credentials

            options.update(split_credentials(load_storage_credentials(ns.storage_block))[0])

        def where(value: str) -> str:
            return value if is_url(value) else resolve_path(value)

        json_url = where(ns.ground_truth)
        png_dir = where(ns.ground_truth_png) if ns.ground_truth_png else json_url.removesuffix(".json")
        captions = _read_captions(where(ns.captions), options) if ns.captions else None
        summary = convert_coco_panoptic_to_shards(
            json_url,
            png_dir,
            where(ns.images),
            where(ns.output),
            samples_per_shard=ns.samples_per_shard,
            storage_options=options,
            captions=captions,
            shard_name=ns.shard_name,
        )
        print(f"wrote {summary.num_samples} sample(s) in {len(summary.shards)} shard(s)")
        if summary.shards:
            print(f"  first shard: {summary.shards[0]}")
        print(f"  categories:  {summary.categories_url}")
        return 0

    def guarded() -> int:
        try:
            return body()
        except ValueError as exc:  # the converter's "malformed dataset" errors name the file and entry
            return _fail(parser.prog, str(exc), 2)

    return _run_guarded(parser.prog, guarded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(annotate_main())
