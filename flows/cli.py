"""Console scripts: ``odise-annotate``, ``odise-evaluate``, ``odise-train``, ``odise-convert``, ``odise-export``.

Each runs its Prefect flow in this process: local files, a local Ray (unless ``--ray-address``), and
Prefect without a server (a temporary local API, "ephemeral mode") unless ``PREFECT_API_URL`` points at
one, in which case the run is recorded there. Parameters are validated and the inputs checked
*before* Prefect or Ray start, so a bad option, a missing file or unreachable weights stop the
command at once with a one-line message (exit code 2) instead of a traceback.

Exit codes: 0 success, 1 the run failed, 2 bad options or inputs (including missing weights, and an
output another run is writing: its lease holder is named), 130 interrupted (also when the run then fails
because Ctrl-C reached its Ray workers too).

Without ``-v`` the terminal shows warnings and errors only: Prefect's and Ray's INFO lines, Ray's
token-auth notice and Ray Data's progress notices are off, and :data:`NATIVE_NOISE` lines that Ray's C++
core worker writes straight to file descriptor 2 are filtered out (:class:`_NativeStderrFilter`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import sys
import threading
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "annotate_main",
    "evaluate_main",
    "train_main",
    "convert_main",
    "export_main",
    "build_annotate_parser",
]

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
        for name in ("ray", "ray.data", "filelock", "httpx"):
            logging.getLogger(name).setLevel(logging.WARNING)


NATIVE_NOISE = (
    # Ray Data hands every pool actor its DataContext and its UDF as object refs, so Ray's core worker logs
    # this once per driver for any actor pool that may restart (ray-project/ray#53727); nothing to act on.
    b"has constructor arguments in the object store and max_restarts > 0",
)
"""Byte patterns of native (C++) log lines dropped from the terminal unless ``-v`` is given."""

_QUIET_MESSAGES = (
    "Progress bars disabled",  # Ray Data, because this command draws its own bar
    "Token authentication is enabled for this Ray cluster",  # Ray, on every local start once a token exists
)


class _DropInfo(logging.Filter):
    """Console filter without ``-v``: below WARNING only Prefect's own records pass (``PREFECT_LOGGING_LEVEL``
    governs those), and a few known notices are dropped at any level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING and not record.name.startswith("prefect"):
            return False
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record: let the handler deal with it
            return True
        return not any(q in message for q in _QUIET_MESSAGES)


class _NativeStderrFilter:
    """Drop :data:`NATIVE_NOISE` lines written to file descriptor 2 (by native code: Ray's C++ core worker).

    File descriptor 2 becomes a pipe; a daemon thread forwards everything else, byte for byte (complete
    lines at once, a partial line such as a progress bar update after 50 ms), to the original stderr.
    :meth:`close` drains the pipe and puts the original descriptor back; the thread keeps forwarding what
    child processes that inherited the pipe may still write.
    """

    def __init__(self, patterns: tuple[bytes, ...] = NATIVE_NOISE) -> None:
        self.patterns = patterns
        sys.stderr.flush()
        self._saved = os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()

    def _emit(self, data: bytes) -> None:
        lines = data.splitlines(keepends=True)
        kept = b"".join(line for line in lines if not any(p in line for p in self.patterns))
        if kept:
            os.write(self._saved, kept)

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.05 if pending else None)
            if ready:
                chunk = os.read(self._read, 65536)
                if not chunk:
                    break
                pending += chunk
                cut = max(pending.rfind(b"\n"), pending.rfind(b"\r"))
                if cut >= 0:
                    self._emit(pending[: cut + 1])
                    pending = pending[cut + 1 :]
            elif pending:  # a partial line (a progress bar): show it now
                self._emit(pending)
                pending = b""
        if pending:
            self._emit(pending)

    def close(self) -> None:
        """Forward what is buffered and restore file descriptor 2 (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        deadline = threading.Event()
        for _ in range(40):  # wait (at most 2 s) until the pump has read everything written so far
            if not _bytes_waiting(self._read):
                break
            deadline.wait(0.05)
        deadline.wait(0.06)  # and forwarded a trailing partial line
        os.dup2(self._saved, 2)


def _bytes_waiting(fd: int) -> int:
    import fcntl
    import termios

    try:
        buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(buf, sys.byteorder)
    except OSError:
        return 0


_STDERR_FILTER: _NativeStderrFilter | None = None


def _quiet_logs(verbose: bool, *, ray_data: bool = False) -> None:
    """Without ``-v``: INFO lines of Ray, Ray Data and the forwarded pipeline logs off the terminal, Ray's
    token-auth and progress-bar notices off, :data:`NATIVE_NOISE` filtered. Call after importing the flow
    (Prefect's logging is configured then); ``ray_data``: also import Ray Data now to quiet its console."""
    global _STDERR_FILTER
    if verbose:
        return
    quiet = _DropInfo()
    for handler in logging.getLogger().handlers:
        handler.addFilter(quiet)
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    if ray_data:
        import ray.data  # noqa: F401 - configures Ray Data's logging, which is adjusted right below

        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)
                handler.addFilter(quiet)
    if _STDERR_FILTER is None and os.environ.get("ODISE_NATIVE_STDERR") != "1":
        try:
            _STDERR_FILTER = _NativeStderrFilter()
        except OSError:  # no pipes here: keep stderr as it is
            _STDERR_FILTER = None


def _restore_stderr() -> None:
    global _STDERR_FILTER
    if _STDERR_FILTER is not None:
        _STDERR_FILTER.close()
        _STDERR_FILTER = None


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _fail(prog: str, message: str, code: int) -> int:
    from pipeline.redact import redact_text  # no URL user-info, signature or token on the terminal

    print(f"{prog}: error: {redact_text(message)}", file=sys.stderr)
    return code


INTERRUPT_GRACE_S = 12.0
"""After Ctrl-C, seconds the run gets to stop cleanly before the process exits anyway (code 130)."""

INTERRUPTED = "interrupted (committed shards are kept; rerun the same command to resume)"

_INTERRUPTED = threading.Event()
"""Set by the SIGINT handler: the user interrupted this command (whatever the run does next)."""


def _install_interrupt_guard(prog: str, grace_s: float = INTERRUPT_GRACE_S) -> None:
    """Make Ctrl-C always end the command with exit code 130.

    A terminal's Ctrl-C reaches the whole process group, so the temporary Prefect server and the local Ray
    processes stop at the same moment as this process; Prefect's client would then retry reporting the
    crash to a server that is gone for minutes, and the Ray workers' deaths can surface as a failed
    pipeline before Python delivers the ``KeyboardInterrupt``. So the handler records the interrupt
    (:data:`_INTERRUPTED`, which :func:`_run_guarded` turns into exit code 130 whatever error follows),
    raises ``KeyboardInterrupt`` as usual and starts a timer; if the process has not exited ``grace_s``
    later (or on a second Ctrl-C) it releases the output lease and exits at once. That is safe: a shard is
    only committed by its marker, so a rerun redoes the unfinished ones.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    _INTERRUPTED.clear()
    interrupts = []

    def hard_exit() -> None:
        _restore_stderr()
        try:
            from pipeline.annotate.lease import release_all

            release_all()
        except Exception:  # noqa: BLE001 - exiting anyway; the lease expires after its TTL
            pass
        print(f"{prog}: {INTERRUPTED}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(130)

    def on_sigint(signum: int, frame: Any) -> None:
        interrupts.append(signum)
        _INTERRUPTED.set()
        if len(interrupts) > 1:
            hard_exit()
        timer = threading.Timer(grace_s, hard_exit)
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_sigint)


def _run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run ``body``; known input errors -> one line + exit 2, other failures -> one line + exit 1,
    Ctrl-C -> exit 130 (also when the run fails after the interrupt: its workers got the signal too)."""
    _install_interrupt_guard(prog)
    try:
        try:
            return _outcome(prog, body)
        except KeyboardInterrupt:
            return _fail(prog, INTERRUPTED, 130)
    finally:
        _restore_stderr()


def _outcome(prog: str, body: Callable[[], int]) -> int:
    from .params import user_errors

    try:
        return body()
    except KeyboardInterrupt:
        raise
    except user_errors() as exc:
        code, message = 2, str(exc)
    except Exception as exc:  # noqa: BLE001 - the CLI's contract is a message, not a traceback
        if os.environ.get("ODISE_DEBUG") and not _INTERRUPTED.is_set():
            raise
        code, message = 1, f"{type(exc).__name__}: {exc} (set ODISE_DEBUG=1 for the traceback)"
    if _INTERRUPTED.is_set():  # the failure followed the user's Ctrl-C
        raise KeyboardInterrupt
    return _fail(prog, message, code)


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
        "vocab",
        "caption",
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
        "shared_filesystem",
    ],
    "one writer per output": ["lease_ttl_s", "lease_renew_s"],
    "labels": ["preset", "object_mask_threshold", "overlap_threshold", "alpha", "beta"],
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
        "copy_images",
    ],
}

_EXTRA_HELP = {
    "input": "shards or a folder: folder of images, folder of .tar shards, glob ('shards/*.tar'), brace pattern "
    "('s3://bucket/shards/{000000..000099}.tar'), manifest file; several may be given",
    "output": "output folder or URL (out/, s3://bucket/labels/run1); rerunning into it labels only what is missing",
    "vocab_file": "classes.txt path or URL (one class per line, comma-separated synonyms, [stuff] marker, # comments) "
    "or a built-in vocabulary: coco_panoptic (the default when the vocab, caption and preset options give no classes), "
    "ade20k_150, lvis_1203, ade20k_847, pascal_context_459, pascal_context_59, pascal_voc_21",
    "vocab": "inline classes as in the ODISE demo: \"person, man; sky [stuff]\" (';' between classes, ',' "
    "between synonyms, the first is the name; optional [stuff]); added after the vocab file's classes",
    "caption": 'a caption whose nouns become classes: "a man walking a dog on the beach" -> man, dog, beach '
    "(no download; nouns outside the built-in lists' synonyms and a list of common nouns are missed)",
    "preset": "demo: the official ODISE demo: your classes (as things) + COCO + ADE20K-150 + LVIS (~1.5k classes), "
    "overlap threshold 0, alpha 0.35, beta 0.65; options given explicitly win (a merge-vocab list replaces "
    "the three lists)",
    "model": "odise_label_coco (official, needs the weights), odise_caption_coco, or tiny / tiny_caption: random "
    "weights, a PLUMBING CHECK that runs offline in about a minute on a CPU; or a model JSON path",
    "storage_options": "fsspec options as JSON, WITHOUT credentials, e.g. "
    '\'{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}\'',
    "output_storage_options": "fsspec options (JSON, no credentials) for the output when they differ from the input's",
    "ray_address": "existing Ray cluster: auto, ray://head:10001; default: start a local Ray",
    "lease_ttl_s": "a run holds the output's lease (<output>/_lease.json) and renews it; another run into the same "
    "output exits 2 naming the holder, and takes the lease over once it was not renewed for this many seconds",
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
        if isinstance(ann, types.UnionType) or typing.get_origin(ann) is typing.Union  # Literal[...] | None
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
    """tqdm bar over images (images/s and an ETA), fed by the flow's progress events; ticks every second.

    The total comes from the run (``images_total`` of its progress events): exact for folders of images
    (known when listed) and for tar shards once read; while tar shards are unread it is an estimate from
    the tars read so far, and the bar says so ("total estimated"). Before the first tar is read the bar
    counts without a total. The postfix shows committed shards and errors.
    """

    FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}{postfix}]"
    FORMAT_OPEN = "{desc}: {n_fmt} images [{elapsed}, {rate_noinv_fmt}{postfix}]"
    """tqdm formats with and without a total; the rate is always images/s (tqdm would turn it into s/img)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        kind = event.get("event")
        if kind == "start" and self.bar is None:
            self.bar = tqdm(
                total=None,
                unit="img",
                desc="labelling",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
                bar_format=self.FORMAT_OPEN,
            )
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        elif kind in ("images", "shard") and self.bar is not None:
            self._update(event)
        elif kind == "done":
            self.close()

    def _update(self, event: dict[str, Any]) -> None:
        bar = self.bar
        total = event.get("images_total")
        estimated = bool(event.get("images_total_estimated"))
        if total is not None and total != bar.total:
            bar.total = max(int(total), bar.n)
            bar.bar_format = self.FORMAT
        bar.set_description_str("labelling (total estimated)" if estimated else "labelling", refresh=False)
        staged = int(event.get("images_staged", 0))
        bar.set_postfix(
            shards=f"{event.get('shards_done', 0)}/{event.get('shards_total', '?')}",
            errors=event.get("errors", 0),
            refresh=False,
        )
        if staged > bar.n:
            bar.update(staged - bar.n)  # the rate (images/s) and the ETA follow the updates
        bar.refresh()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            if self.bar is not None:
                self.bar.refresh()

    def close(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_summary(summary: Any, output: str, *, copied_images: bool = False) -> None:
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
        parts = getattr(summary, "coco_parts", 1) or 1
        if parts > 1:  # numbered parts: the index lists them
            print(
                f"  COCO:        {join('coco', 'index.json')} lists {parts} parts (panoptic-NNNNN.json + "
                f"instances-NNNNN.json), PNGs in {join('coco', 'panoptic')}"
            )
        else:
            print(
                f"  COCO:        {join('coco', 'panoptic.json')}, {join('coco', 'instances.json')}, PNGs in {join('coco', 'panoptic')}"
            )
    if copied_images:
        print(f"  images:      {join('images')}  (copies of the inputs; COCO file_name is relative to it)")
    shown = summary.overlays[:3]
    if shown:
        print(f"  overlays:    {len(summary.overlays)} written, e.g. {shown[0]}")
    print(f"  provenance:  {join('provenance.json')}, totals: {join('summary.json')}")
    for reason, n in list(summary.error_reasons.items())[:5]:
        print(f"  errors:      {n} x {reason}")
    taken = getattr(summary, "lease_takeover", None)
    if taken:
        print(
            f"  lease:       took over the stale lease of run {taken['run_id']} on host {taken['host']} "
            f"(pid {taken['pid']}), not renewed since {taken['renewed_at']}"
        )


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
            f"inputs OK: {len(checked.shards)} shard(s), {len(checked.vocabulary)} categories; "
            "starting the annotate flow (Prefect, local Ray) ...",
            file=sys.stderr,
        )
        # 2. the flow (check -> label -> report), with a progress bar fed by its progress events; the flow
        #    uses the inputs checked above (handed over in this process), so nothing is checked twice
        from .annotate import annotate, progress_listener

        _quiet_logs(ns.verbose, ray_data=True)
        bar = _ProgressBar(enabled=not ns.no_progress)
        try:
            with progress_listener(bar):
                summary = annotate(**params, storage_block=ns.storage_block)
        finally:
            bar.close()
        _print_summary(summary, config.output, copied_images=config.copy_images)
        if summary.plumbing_check:
            print(PLUMBING_BANNER.format(model=config.model), file=sys.stderr)
        return 0

    return _run_guarded(prog, body)


def _precheck(config: Any, storage_block: str | None) -> Any:
    """``check_inputs`` (with the block's credentials), handed over to the flow's ``check`` task."""
    from pipeline.annotate.checks import check_inputs, hand_over

    checked_config = config
    if storage_block:
        from ._prefect import with_credentials

        checked_config = with_credentials(config, storage_block)
    checked = check_inputs(checked_config)
    hand_over(config, checked, storage_block)
    return checked


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

        _quiet_logs(ns.verbose)
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
        config = train_config(given)  # validate before Prefect starts
        if not ns.storage_block:  # (with a block, the flow's task checks it with the block's credentials)
            from pipeline.train.run import check_output

            check_output(config)  # an existing run without --resume: refused before Prefect starts
        from .train import train_flow

        _quiet_logs(ns.verbose)
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
    group.add_argument(
        "--from",
        dest="source",
        choices=["coco", "annotate", "labelstudio"],
        default="coco",
        help="what to convert: coco (a COCO panoptic dataset: --ground-truth, --images), annotate (an odise-annotate "
        "output: --input), labelstudio (a Label Studio JSON export, e.g. after review: --input) (default: coco)",
    )
    group.add_argument(
        "--input",
        metavar="URL",
        help="--from annotate: the annotate output; --from labelstudio: the exported JSON",
    )
    group.add_argument("--ground-truth", metavar="JSON", help="COCO panoptic JSON (path or URL)")
    group.add_argument(
        "--ground-truth-png",
        metavar="DIR",
        help="folder of the COCO panoptic PNGs (default: the JSON's path without .json)",
    )
    group.add_argument("--images", metavar="DIR", help="--from coco: folder of the images (path or URL)")
    group.add_argument(
        "--output",
        required=True,
        metavar="URL",
        help="folder for the shards (created; same-named shards overwritten)",
    )
    group.add_argument(
        "--samples-per-shard", type=int, default=1000, metavar="N", help="samples per shard (default: 1000)"
    )
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
    loop = parser.add_argument_group("--from annotate / labelstudio (pseudo-labels and reviewed labels)")
    loop.add_argument(
        "--min-score",
        type=float,
        metavar="X",
        help="keep only segments scored at least X; every other pixel is void (0) (reviewed Label Studio results "
        "carry no score and are always kept)",
    )
    loop.add_argument(
        "--max-images", type=int, metavar="N", help="--from annotate: convert the first N images only"
    )
    loop.add_argument(
        "--categories",
        metavar="JSON",
        help="--from labelstudio: categories (categories.json of the export, or an annotate output's provenance.json; "
        "default: categories.json next to the --input file)",
    )
    loop.add_argument(
        "--reviewed-only",
        action="store_true",
        help="--from labelstudio: skip tasks nobody completed (default: they keep the model's predictions)",
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
        raise ValueError(
            f"captions file {url!r}: cannot read it as JSON ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        captions: dict[Any, list[str]] = {}
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
                raise ValueError(
                    f"captions file {url!r}: annotations[{i}] needs image_id and a caption string"
                )
            captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        return captions
    if isinstance(data, dict) and all(
        isinstance(v, str) or (isinstance(v, list) and all(isinstance(c, str) for c in v))
        for v in data.values()
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

        if ns.source != "coco":
            return _convert_loop(ns, options, where)
        if not ns.ground_truth or not ns.images:
            parser.error("--from coco needs --ground-truth and --images")
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


def _convert_loop(ns: argparse.Namespace, options: dict[str, Any], where: Callable[[str], str]) -> int:
    """``odise-convert --from annotate|labelstudio``: pseudo-labels or reviewed labels -> labeled shards."""
    from pipeline.export.loop import annotate_to_shards, labelstudio_to_shards

    if not ns.input:
        raise ValueError(f"--from {ns.source} needs --input")
    if ns.min_score is not None and not 0.0 <= ns.min_score <= 1.0:
        raise ValueError(f"--min-score must be in [0, 1], got {ns.min_score}")
    common = {
        "samples_per_shard": ns.samples_per_shard,
        "storage_options": options,
        "min_score": ns.min_score,
    }
    if ns.source == "annotate":
        summary = annotate_to_shards(where(ns.input), where(ns.output), max_images=ns.max_images, **common)
    else:
        categories = where(ns.categories) if ns.categories else None
        summary = labelstudio_to_shards(
            where(ns.input), where(ns.output), categories=categories, reviewed_only=ns.reviewed_only, **common
        )
        print(
            f"tasks: {summary.reviewed} reviewed, {summary.unreviewed} not reviewed"
            + (
                f" ({summary.skipped_unreviewed} skipped)"
                if ns.reviewed_only
                else " (their predictions used)"
            )
        )
    print(
        f"wrote {summary.samples} sample(s) ({summary.segments} segments) in {len(summary.shards)} shard(s)"
    )
    if summary.shards:
        print(f"  first shard: {summary.shards[0]}")
    print(f"  categories:  {summary.categories_url}")
    skipped = {
        "error rows": summary.error_rows,
        "images without segments": summary.skipped_empty,
        "segments below --min-score": summary.segments_dropped,
        "unreadable images": summary.images_skipped,
    }
    for what, n in skipped.items():
        if n:
            print(f"  skipped:     {n} {what}")
    for reason in summary.skipped[:5]:
        print(f"    {reason}")
    return 0


# --------------------------------------------------------------------------------------------------
# odise-export
# --------------------------------------------------------------------------------------------------
_EXPORT_GROUPS = {
    "input / output": ["input", "output", "format", "overwrite", "storage_options", "output_storage_options"],
    "selection": ["min_score", "max_images", "order"],
    "images": ["copy_images", "include_image", "image_url_prefix"],
    "format options": ["subset", "rows_per_file"],
}


def build_export_parser() -> argparse.ArgumentParser:
    """The ``odise-export`` parser: one option per ``pipeline.export.config.ExportConfig`` field."""
    from pipeline.export.config import ExportConfig

    parser = argparse.ArgumentParser(
        prog="odise-export",
        description="Export an odise-annotate output to the tools people review and train with: FiftyOne "
        "(COCO detection + segmentation masks), Label Studio (tasks with brush predictions + labeling config), "
        "Datumaro / CVAT (COCO instances + panoptic) or Hugging Face datasets (Parquet). Runs the Prefect "
        "'export' flow in this process.",
        epilog="Examples:\n"
        "  odise-export --input out/ --output review/ --format labelstudio --order uncertainty --max-images 200 "
        "--copy-images\n"
        "  odise-export --input s3://bucket/labels/run1 --output hf/ --format hf --include-image --min-score 0.5\n"
        "File layouts: docs/output-format.md.\n"
        "Exit codes: 0 ok, 1 failed, 2 bad options or inputs, 130 interrupted.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_fields(parser, ExportConfig, _EXPORT_GROUPS, input={"metavar": "URL"}, output={"metavar": "URL"})
    _add_common(parser)
    return parser


def export_main(argv: Sequence[str] | None = None) -> int:
    """``odise-export``: run the ``export`` flow locally; prints what it wrote."""
    parser = build_export_parser()
    ns = parser.parse_args(argv)
    _prepare_environment("INFO" if ns.verbose else "WARNING")

    def body() -> int:
        from pipeline.export.config import ExportConfig

        from .export import OPEN_HINTS, export, export_config

        params = _options_from(ns, ExportConfig)
        config = export_config(params)  # validate and check before Prefect starts: bad input fails at once
        if ns.storage_block:
            from ._prefect import with_credentials

            config = with_credentials(config, ns.storage_block)
        from pipeline.export.run import check_export

        check_export(config)
        summary = export(**params, storage_block=ns.storage_block)
        if summary["plumbing_check"]:
            print(
                "PLUMBING CHECK: these labels come from a model with random weights (--model tiny)",
                file=sys.stderr,
            )
        print(
            f"exported {summary['images']} image(s), {summary['segments']} segment(s) as {summary['format']} in "
            f"{summary['elapsed_s']:.1f} s ({summary['images_per_s']} images/s)"
        )
        skipped = {
            "error rows": summary["error_rows"],
            "segments below --min-score": summary["segments_dropped"],
            "images not found": summary["images_missing"],
        }
        for what, n in skipped.items():
            if n:
                print(f"  skipped:  {n} {what}")
        for role, url in summary["files"].items():
            print(f"  {role + ':':<16s}{url}")
        print("  open it:        " + OPEN_HINTS[summary["format"]].format(out=summary["output"]))
        return 0

    def guarded() -> int:
        try:
            return body()
        except ValueError as exc:  # bad input data / unusable output folder: named in the message
            return _fail(parser.prog, str(exc), 2)

    return _run_guarded(parser.prog, guarded)


_COMMANDS: dict[str, Callable[[Sequence[str] | None], int]] = {
    "annotate": annotate_main,
    "evaluate": evaluate_main,
    "train": train_main,
    "convert": convert_main,
    "export": export_main,
}


if __name__ == "__main__":  # pragma: no cover
    # ``python -m flows.cli <command> ...`` runs any console script without installing it; no command: annotate
    if len(sys.argv) > 1 and sys.argv[1] in _COMMANDS:
        sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
    sys.exit(annotate_main())
