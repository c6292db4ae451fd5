"""Command line: ``python cli.py COMMAND`` from a clone, or ``action-pipeline COMMAND`` when installed.

Each command parses options, builds a frozen config, calls one stage function and prints what it
returns. Errors in the input become one line on stderr and a non-zero exit code, not a traceback.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import os
import re
import sys
from pathlib import Path

import click

from pipeline import __version__
from pipeline.config import (DEFAULT_VAL_FRACTION, HEAD_ARCHS, INTERPOLATIONS, MAX_EVAL_CLIPS, MAX_SEED, RESIZE_MODES,
                             TRAIN_SAMPLERS, DatasetSpec, ExtractConfig, FrameOverrides, FrameSelection)
from pipeline.errors import ConfigError, PipelineError
from pipeline.files import DiskFullError, OutputInUseError, in_use
from pipeline.runtime import tune_cpu_allocator

log = logging.getLogger("pipeline")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class OutputFile(click.Path):
    """A file to write. ``Path("feats/")`` (and ``feats/.``) is ``feats``: a name that ends in a
    separator, meant as a folder, would have become a file of the folder's name."""

    def __init__(self, example: str) -> None:
        super().__init__(path_type=Path)
        self.example = example

    def convert(self, value, param, ctx):
        if isinstance(value, str) and (value.endswith(("/", os.sep)) or os.path.basename(value) in (".", "..")):
            folder = value if value.endswith(("/", os.sep)) else value + os.sep
            self.fail(f"{value} names a folder; give the file to write in it, e.g. {folder}{self.example}", param, ctx)
        return super().convert(value, param, ctx)


class Group(click.Group):
    """Maps PipelineError to 'error: ...' (exit 1) and Ctrl-C to a resume hint (exit 130)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except PipelineError as e:
            if not isinstance(e, OutputInUseError):
                _remove_new_folders(ctx)
            message = str(e)
            rerun = ctx.meta.get("rerun_hint")  # a run folder's, where a plain rerun would be refused
            if isinstance(e, DiskFullError) and rerun is not None and message.endswith("free space and rerun"):
                message = message.removesuffix("rerun") + f"then: {rerun()}"
            click.echo(f"error: {message}", err=True)
            ctx.exit(EXIT_ERROR)
        except KeyboardInterrupt:
            hint = ctx.meta.get("resume_hint", "")
            hint = hint() if callable(hint) else hint  # e.g. a run folder's: true when asked
            click.echo(f"\ninterrupted{': ' + hint if hint else ''}", err=True)
            ctx.exit(EXIT_INTERRUPTED)
        except (RuntimeError, MemoryError) as e:
            if _out_of_memory(e):  # files are written atomically: nothing half-written is left
                _remove_new_folders(ctx)
                click.echo(f"error: out of memory ({_first_line(e)}); {_memory_hint(ctx)}", err=True)
                ctx.exit(EXIT_ERROR)
            if not _peer_failed(e):
                raise
            click.echo(f"error: rank {os.environ.get('RANK')} stopped because another rank failed "
                       "(that rank's error is printed above)", err=True)
            ctx.exit(EXIT_ERROR)


def _remove_new_folders(ctx: click.Context) -> None:
    """A command that failed before writing anything leaves no empty output folder it made."""
    with contextlib.suppress(OSError):
        for folder in ctx.meta.get("new_folders", ()):
            if not in_use(folder):  # another run made it meanwhile, and is writing there
                folder.rmdir()  # only while empty


def _out_of_memory(e: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, the CPU allocator's, or Python's MemoryError."""
    if isinstance(e, MemoryError):
        return True
    import torch

    text = str(e)
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.OutOfMemoryError: torch >= 2.4
    return isinstance(e, oom) or "can't allocate memory" in text or "not enough memory" in text


def _memory_hint(ctx: click.Context) -> str:
    """What to lower, among the options of the command that ran out of memory."""
    sub = ctx.command.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
    names = {o for p in (sub.params if sub else ()) for o in p.opts}
    lower = [o for o in ("--batch-size", "--seq-len", "--hidden") if o in names]
    listed = " or ".join(lower) if len(lower) < 3 else f"{', '.join(lower[:-1])} or {lower[-1]}"
    ways = ([f"lower {listed}"] if lower else []) + (["use --load lazy"] if "--load" in names else [])
    return ", ".join([*ways, "or free memory"]) if ways else "free memory, or use a machine with more"


def _check_split_id(ctx: click.Context, split_dir: str | None) -> None:
    """--split-id picks among the official split files of --split-dir; given without it, it picked
    nothing, and was recorded as if it had."""
    if split_dir is None and ctx.get_parameter_source("split_id") is not click.core.ParameterSource.DEFAULT:
        given = " (--split-file gives the split itself)" if ctx.params.get("split_files") else ""
        raise click.BadParameter(f"it picks among the split files of --split-dir, which is not given{given}; "
                                 "drop it, or add --split-dir", param_hint="--split-id")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def _peer_failed(e: BaseException) -> bool:
    """Under torchrun: a collective broke because another process died."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch.distributed as dist

    return isinstance(e, getattr(dist, "DistError", ())) or "closed by peer" in str(e) or "reset by peer" in str(e)


def _setup_logging(verbose: int, quiet: int) -> None:
    level = logging.WARNING + 10 * (quiet - verbose) if (verbose or quiet) else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(max(logging.DEBUG, min(level, logging.CRITICAL)))
    root.propagate = False


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="action-pipeline")
@click.option("-v", "--verbose", count=True, help="More log output (repeatable).")
@click.option("-q", "--quiet", count=True, help="Less log output (repeatable).")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: int) -> None:
    """Video action recognition with cached image-backbone frame features."""
    _setup_logging(verbose, quiet)
    _check_world(ctx.invoked_subcommand)
    tune_cpu_allocator()  # about 2x faster CPU forward passes; see pipeline/runtime.py


DISTRIBUTED = ("extract-features", "finetune-end-to-end")  # the commands that share work across torchrun ranks


def _check_world(command: str | None) -> None:
    """Any other command under torchrun would run once per rank on the same files, each rank
    finding the others' lock or output: refused before anything is written, in one line (rank 0's;
    the other ranks exit quietly)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or command is None or command in DISTRIBUTED:
        return
    if not _is_main_rank():
        sys.exit(EXIT_ERROR)
    raise ConfigError(f"{command} runs as one process, not under torchrun ({world} processes here; only "
                      f"{' and '.join(DISTRIBUTED)} share their work across them): run it as "
                      f"`python cli.py {command} ...`")


def _is_main_rank() -> bool:
    """Under torchrun only rank 0 prints results."""
    return os.environ.get("RANK", "0") == "0"


def _split_list(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...] | None:
    names = tuple(s for v in value for s in v.split(",") if s)
    return names or None


def _options(*opts):
    """Several click options as one decorator: each option shared by commands is defined once."""
    def apply(f):
        for opt in reversed(opts):
            f = opt(f)
        return f
    return apply


FRAME_OPTIONS_LIST = [
    click.option("--size", type=click.IntRange(16), default=None,
                 help="Network input size (square crop).  [default: the backbone weights' own, e.g. 224]"),
    click.option("--resize-size", type=click.IntRange(16), default=None,
                 help="Size before the centre crop: of the short side (--resize crop), both sides (squash), the "
                      "long side (border).  [default: the weights' own ratio, e.g. 232 for 224]"),
    click.option("--interpolation", type=click.Choice(INTERPOLATIONS), default=None,
                 help="Antialiased resize filter.  [default: the weights' own]"),
    click.option("--resize", type=click.Choice(RESIZE_MODES), default=None,
                 help="crop: short side to --resize-size, then centre crop --size; squash: both sides to "
                      "--resize-size (default there: --size), then centre crop; border: long side to --resize-size, "
                      "padded with the mean colour (letterbox), then centre crop.  [default: the weights' own, "
                      "mostly crop]"),
]


EVAL_CLIPS = click.IntRange(1, MAX_EVAL_CLIPS)

FRAME_OPTIONS = _options(*FRAME_OPTIONS_LIST)  # each left out keeps the backbone's default


class FloatRange(click.FloatRange):
    """click's FloatRange for a finite number: click's own lets nan and inf by (every bound compares
    False with nan), and they got as far as a traceback, a division by zero or a NaN in config.json."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number", param, ctx)
        return value


def _regex(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A click callback: a regular expression that compiles; one line naming the fault if not."""
    if value is not None:
        try:
            re.compile(value)
        except re.error as e:
            raise click.BadParameter(f"{value!r} is not a valid regular expression ({e})") from None
    return value


LOAD_OPTIONS_LIST = [
    click.option("--load", type=click.Choice(["auto", "memory", "lazy"]), default="auto", show_default=True,
                 help="memory: hold each split in RAM; lazy: read the rows each batch samples from the cache "
                      "(caches larger than RAM; same results); auto: lazy for splits that do not fit the "
                      "memory budget."),
    click.option("--memory-budget", type=FloatRange(min=0, min_open=True), default=None, metavar="GB",
                 help="Features --load auto may hold in memory.  [default: half the available memory]"),
]


LOAD_OPTIONS = _options(*LOAD_OPTIONS_LIST)  # train-temporal, evaluate, sweep


def _describe_spec(spec) -> str:
    return f"{spec.describe()}, {spec.interpolation}"


HEAD_OPTIONS = _options(
    click.option("--head", type=click.Choice(HEAD_ARCHS), default="lstm",
                 show_default=True, help="Temporal head: lstm/gru (recurrent), transformer (pre-norm encoder), "
                                         "attention (learned-query pooling), mean (order-blind baseline)."),
    click.option("--hidden", type=click.IntRange(1), default=512, show_default=True,
                 help="Hidden size (recurrent state; transformer/attention width)."),
    click.option("--layers", type=click.IntRange(1), default=1, show_default=True),
    click.option("--bidirectional/--unidirectional", default=True, show_default=True,
                 help="lstm/gru: read the clip both ways, or forward only."),
    click.option("--dropout", type=FloatRange(0, 1, max_open=True), default=0.5, show_default=True),
    click.option("--pool", type=click.Choice(["last", "mean"]), default="last", show_default=True,
                 help="lstm/gru: last = final hidden state of each direction; mean = average over time."),
    click.option("--num-heads", type=click.IntRange(1), default=4, show_default=True,
                 help="transformer/attention: attention heads (must divide --hidden)."),
)

VALIDATION_OPTIONS = _options(
    click.option("--val-split", default=None,
                 help="Split the best epoch is picked on.  [default: val if present, else carved from train]"),
    click.option("--val-fraction", type=FloatRange(0, 1, min_open=True, max_open=True), default=DEFAULT_VAL_FRACTION,
                 show_default=True, help="Without a val split: the share of each class carved from train for "
                                         "validation, as whole source videos."),
    click.option("--group-pattern", default=None, metavar="REGEX", callback=_regex,
                 help="Regex naming a clip's source video in its file name (its first group), so the carve never "
                      "splits one.  [default: UCF101 v_X_gNN / HMDB51 names, else each video alone]"),
    click.option("--test-split", default=None,
                 help="Split evaluated once at the end with the picked model.  [default: test if present]"),
)


@main.command("extract-features")
@click.option("--data-dir", required=True, type=click.Path(path_type=Path),
              help="Dataset root: <root>/<split>/<class>/<video> (or <root>/<class>/<video> with split files).")
@click.option("--output", "-o", type=OutputFile("features.h5"), default=None,
              help="HDF5 cache to write.  [default: features/<dataset folder name>.h5]")
@click.option("--splits", multiple=True, callback=_split_list, metavar="NAME[,NAME]",
              help="Only these splits (repeatable or comma-separated).  [default: all]")
@click.option("--split-file", "split_files", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="HMDB51 '<class>_test_split<N>.txt' or UCF101 'trainlist0N.txt'/'testlist0N.txt' (repeatable).")
@click.option("--split-dir", type=click.Path(exists=True, file_okay=False),
              help="Folder of official split files; picks those of --split-id.")
@click.option("--split-id", type=click.IntRange(1), default=1, show_default=True,
              help="Which official split (1-3) with --split-dir.")
@click.option("--backbone", default="mobilenet_v2", show_default=True,
              help="A torchvision classification model (see list-backbones) or timm:<model name>; with --weights "
                   "an end-to-end checkpoint or saved backbone, the one it records.")
@click.option("--weights", default="none", show_default=True,
              help="none (random init, BatchNorm recalibrated on your frames), imagenet (the default weights), "
                   "a weight tag (IMAGENET1K_V1; timm: a pretrained tag), or PATH to a weights file / checkpoint.")
@FRAME_OPTIONS
@click.option("--stride", type=click.IntRange(1), default=1, show_default=True, help="Keep every K-th frame.")
@click.option("--fps", type=FloatRange(min=0, min_open=True), default=None,
              help="Resample video files to at most this frame rate.")
@click.option("--folder-fps", type=FloatRange(min=0, min_open=True), default=None,
              help="Frame rate of frame folders (needed with --fps when the dataset has them).")
@click.option("--max-frames", type=click.IntRange(1), default=None,
              help="At most M frames per video, uniformly spaced.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="Frames per backbone batch (frames of several videos are packed together).")
@click.option("--workers", type=click.IntRange(0), default=None,
              help="Frame decoders: on CPU, threads that decode between batches (default: the model's "
                   "threads); on CUDA, worker processes (default: CPU cores - 1, at most 8). 0: decode inline.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
              show_default=True,
              help="auto: bf16 autocast on GPUs with bf16 tensor cores (Ampere and later), else fp16; fp32 on CPU.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the cached features.")
@click.option("--calibration-frames", type=click.IntRange(2), default=1024, show_default=True,
              help="Frames used to recalibrate BatchNorm with --weights none.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True, help="Random init seed for --weights none.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache made with other settings.")
@click.option("--strict", is_flag=True, help="Stop at the first broken video or frame instead of skipping it.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def extract_features_cmd(ctx: click.Context, data_dir: Path, output: Path | None, splits, split_files,
                         split_dir, split_id, backbone, weights, size, resize_size, interpolation, resize, stride,
                         fps, folder_fps, max_frames,
                         batch_size, workers, device, precision, dtype, calibration_frames, seed,
                         overwrite, strict, no_progress) -> None:
    """Cache backbone features of every frame of every video in one HDF5 file (resumable)."""
    from pipeline.cache import extraction_hint
    from pipeline.extract import extract_features

    _check_split_id(ctx, split_dir)
    if output is None:
        output = Path("features") / f"{data_dir.resolve().name}.h5"
    if ctx.get_parameter_source("backbone") == click.core.ParameterSource.DEFAULT:
        from pipeline.backbones import backbone_of_file

        if (recorded := backbone_of_file(weights)) is not None and recorded != backbone:
            logging.getLogger("pipeline").info("--weights %s holds %s weights: --backbone %s", weights, recorded,
                                               recorded)
            backbone = recorded
    cfg = ExtractConfig(
        dataset=DatasetSpec(root=str(data_dir), splits=splits, split_files=tuple(split_files),
                            split_dir=split_dir, split_id=split_id),
        output=str(output), backbone=backbone, weights=weights,
        frame_overrides=FrameOverrides(size=size, resize_size=resize_size, interpolation=interpolation, resize=resize),
        selection=FrameSelection(stride=stride, fps=fps, max_frames=max_frames, folder_fps=folder_fps),
        batch_size=batch_size, workers=workers, device=device, precision=precision, dtype=dtype,
        overwrite=overwrite, strict=strict, calibration_frames=calibration_frames, seed=seed,
    )

    ctx.meta["resume_hint"] = functools.partial(extraction_hint, output)  # true when asked: after an interrupt
    r = extract_features(cfg, progress=not no_progress)
    if not _is_main_rank():
        return
    fps_txt = f"{r.frames / r.seconds:.0f} frames/s" if r.seconds > 0 else ""
    done = f"up to date, left as it was: {r.output}" if r.unchanged else f"wrote {r.output}"
    click.echo(f"{done}: " + ", ".join(f"{s} {n} videos" for s, n in r.videos.items()))
    click.echo(f"  this run: {r.extracted} videos, {r.frames} frames in {r.seconds:.1f} s ({fps_txt}); "
               f"{r.reused} already cached")
    click.echo(f"  backbone: {r.backbone} ({r.feature_dim}-d), weights: {r.weights.describe()}")
    click.echo(f"  frames: {_describe_spec(r.frame_spec)}")
    if r.weights_file:
        click.echo(f"  {r.weights.source.replace('_', ' ')} backbone: {r.weights_file} (saved beside the cache; later "
                   "stages use it)")
    if r.failures:
        click.echo(f"  {len(r.failures)} problem(s), listed in the cache's 'failures' attribute:")
        shown = 20
        for f in r.failures[:shown]:
            click.echo(f"    skipped {f['skipped']}: {f['reason']}")
        if len(r.failures) > shown:
            kinds = collections.Counter(f["skipped"] for f in r.failures[shown:])
            click.echo(f"    ... and {len(r.failures) - shown} more ("
                       + ", ".join(f"{n} {k}" for k, n in kinds.most_common()) + ")")


@main.command("train-temporal")
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Feature cache from extract-features.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder (checkpoints, metrics, plots).")
@click.option("--train-split", default="train", show_default=True)
@VALIDATION_OPTIONS
@HEAD_OPTIONS
@click.option("--seq-len", type=click.IntRange(1), default=16, show_default=True, help="Frames per clip.")
@click.option("--sampler", type=click.Choice(TRAIN_SAMPLERS), default="segment", show_default=True,
              help="Training clips: segment = TSN (one random frame per equal segment); random = random window.")
@click.option("--eval-clips", type=EVAL_CLIPS, default=4, show_default=True,
              help="Uniform clips per video averaged at evaluation.")
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--lr", type=FloatRange(min=0, max=1, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=FloatRange(min=0), default=1e-2, show_default=True)
@click.option("--warmup-epochs", type=FloatRange(min=0), default=1.0, show_default=True)
@click.option("--label-smoothing", type=FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--clip-grad", type=FloatRange(min=0), default=1.0, show_default=True, help="0 = off.")
@click.option("--patience", type=click.IntRange(1), default=None, help="Stop after this many epochs without a new best epoch (higher val top-1; ties: lower val loss).")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms (slower on GPU).")
@click.option("--resume", is_flag=True, help="Continue from OUT/last.pt.")
@click.option("--overwrite", is_flag=True, help="Start over in an OUT that already holds a run.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="AMP on CUDA (auto: bf16 on Ampere and later, else fp16); CPU always trains in fp32.")
@click.option("--tensorboard", is_flag=True, help="Also log to OUT/tensorboard (needs the tensorboard package).")
@LOAD_OPTIONS
@click.option("--no-progress", is_flag=True)
@click.pass_context
def train_temporal_cmd(ctx: click.Context, cache: Path, out: Path, train_split: str, val_split: str | None,
                       clip_grad: float, no_progress: bool, **kw) -> None:
    """Train a temporal head on cached features (seconds per epoch); picks the best epoch on a
    validation set and evaluates the test split once, with the picked model."""
    from pipeline.config import TemporalConfig
    from pipeline.train import train_temporal

    cfg = TemporalConfig(cache=str(cache), out=str(out), train_split=train_split, val_split=val_split,
                         clip_grad=clip_grad or None, **kw)
    _say_unused(ctx, cfg.head)
    _new_folder(out)
    r = train_temporal(cfg, progress=not no_progress, on_epoch=_print_epoch(cfg.epochs),
                       on_start=_hint_from(ctx))
    _print_train_summary(r)


def _say_unused(ctx: click.Context, head: str | None) -> None:
    """Options given on the command line that this run does not use, which were dropped without a
    word: a head's options another head has (--num-heads for an LSTM), a warm-up that outlasts the
    run. (A carve's options beside a validation split: ``train.say_carve_unused``.)"""
    from pipeline.heads import head_option, unused_fields

    def given(name: str) -> bool:
        return name in ctx.params and ctx.get_parameter_source(name) not in (
            click.core.ParameterSource.DEFAULT, click.core.ParameterSource.DEFAULT_MAP)

    if head is not None and (unused := [head_option(n, ctx.params[n], with_value=False)  # as given: --unidirectional
                                        for n in unused_fields(head) if given(n)]):
        log.warning("%s: the %s head does not use %s", ", ".join(unused), head, "them" if len(unused) > 1 else "it")
    warmup, epochs = ctx.params.get("warmup_epochs"), ctx.params.get("epochs")
    if warmup is not None and epochs is not None and warmup > epochs:  # equal: --lr at the last step
        log.warning("--warmup-epochs %g is longer than --epochs %d: the learning rate never reaches --lr", warmup,
                    epochs)


def _new_folder(out: Path) -> None:
    """This command is about to create the folder ``out``: if it is refused before writing anything
    there, ``Group.invoke`` removes it again, with the parents it had to make."""
    missing = [p for p in (out, *out.parents) if not p.exists()]
    click.get_current_context().meta["new_folders"] = missing  # deepest first


def _hint_from(ctx: click.Context):
    """An ``on_start`` callback: after an interrupt, the run folder says what to do."""
    def start(run) -> None:
        ctx.meta["resume_hint"] = ctx.meta["rerun_hint"] = run.resume_hint
    return start


def _print_epoch(epochs: int, every: int = 1):
    def show(r: dict) -> None:
        if r["epoch"] % every and r["epoch"] != epochs:
            return
        click.echo(f"epoch {r['epoch']:>3}/{epochs}  train loss {r['train_loss']:.4f} top-1 {r['train_top1']:.3f} | "
                   f"val loss {r['val_loss']:.4f} top-1 {r['val_top1']:.3f} top-5 {r['val_top5']:.3f} "
                   f"mca {r['val_mean_class_acc']:.3f} | {r['epoch_seconds']:.2f} s, "
                   f"{r['clips_per_second']:.0f} clips/s{'  *best' if r['best'] else ''}")
    return show


def _print_train_summary(r) -> None:
    from pipeline.report import format_table

    b = r.best
    chance = 1 / len(r.classes)
    click.echo(f"\nbest epoch {r.best_epoch}, picked on {r.val_split} ({len(r.classes)} classes, chance {chance:.3f})"
               + ("; stopped early" if r.stopped_early else ""))
    rows = [("val top-1", f"{b['top1']:.3f}"), ("val top-5", f"{b['top5']:.3f}"),
            ("val mean class acc", f"{b['mean_class_acc']:.3f}"), ("val loss", f"{b['loss']:.4f}")]
    if r.test is not None:
        t = r.test
        rows += [(f"{r.test_split} top-1", f"{t['top1']:.3f}  (evaluated once, with the picked model)"),
                 (f"{r.test_split} top-5", f"{t['top5']:.3f}"),
                 (f"{r.test_split} mean class acc", f"{t['mean_class_acc']:.3f}")]
    if getattr(r, "load", ""):
        rows.append(("cache load", r.load))
    elif r.load_mb:
        rows.append(("cache load", f"{r.load_mb:.0f} MB in {r.load_seconds:.2f} s"))
    click.echo(format_table(rows + [("total time", f"{r.seconds:.1f} s")]))
    names = ("best.pt", "last.pt", "config.json", "metrics.jsonl", "curves.png", "confusion.png", "per_class.csv",
             "test.json", "confusion_test.png", "per_class_test.csv")  # the ones this run wrote
    click.echo(f"outputs in {r.out}/: " + " ".join(n for n in names if (Path(r.out) / n).exists()))


def _list_of(kind):
    """A click callback for comma-separated (or repeated) values of one type; None if not given."""
    def parse(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
        items = [x.strip() for v in value for x in v.split(",") if x.strip()]
        if not value:
            return None
        if not items:
            raise click.BadParameter("no values given (V[,V...])")
        out = []
        for x in items:
            try:
                if kind is bool:
                    if x.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError(x)
                    out.append(x.lower() in ("true", "1", "yes"))
                elif isinstance(kind, tuple):
                    if x not in kind:
                        raise ValueError(x)
                    out.append(x)
                else:
                    out.append(kind(x))
                    if kind is float and not math.isfinite(out[-1]):
                        raise ValueError(x)
            except ValueError:
                want = ("true/false" if kind is bool else " | ".join(kind) if isinstance(kind, tuple)
                        else "a finite number" if kind is float else kind.__name__)
                raise click.BadParameter(f"{x!r} is not a valid value ({want})") from None
        return tuple(dict.fromkeys(out))
    return parse


SWEEP_AXES = [("head", HEAD_ARCHS), ("hidden", int), ("layers", int), ("bidirectional", bool), ("num_heads", int),
              ("dropout", float), ("lr", float), ("weight_decay", float), ("seq_len", int),
              ("sampler", TRAIN_SAMPLERS), ("eval_clips", int)]


@main.command("sweep")
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Feature cache from extract-features.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Sweep folder: leaderboard.csv/.png, the winner's best.pt, trials/<id>/best.pt.")
@click.option("--spec", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="JSON file of axes to sweep, e.g. {\"head\": [\"lstm\", \"transformer\"], \"lr\": [0.001, 0.003]}, "
                   "or a list of such grids (their union); options below override it.")
@_options(*[click.option(f"--{a.replace('_', '-')}", a, multiple=True, callback=_list_of(kind), metavar="V[,V...]",
                         help=f"Values of {a} to sweep.") for a, kind in SWEEP_AXES])
@click.option("--epochs", type=click.IntRange(1), default=30, show_default=True, help="Epochs of a trial that runs to the end.")
@click.option("--eta", type=click.IntRange(2), default=3, show_default=True,
              help="Successive halving: after each rung, the best 1/eta of the running trials go on.")
@click.option("--min-epochs", type=click.IntRange(1), default=2, show_default=True,
              help="The first rung: every trial trains this many epochs (rungs: min, min*eta, ..., --epochs).")
@click.option("--train-split", default="train", show_default=True)
@VALIDATION_OPTIONS
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@LOAD_OPTIONS
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True,
              help="AMP on CUDA (auto: bf16 on Ampere and later, else fp32); CPU trains in fp32.")
@click.option("--overwrite", is_flag=True, help="Start over in an --out that holds a sweep.")
@click.option("--no-progress", is_flag=True)
def sweep_cmd(cache: Path, out: Path, spec: Path | None, epochs: int, eta: int, min_epochs: int, train_split: str,
              val_split: str | None, val_fraction: float, group_pattern: str | None, test_split: str | None,
              batch_size: int, seed: int, load: str, memory_budget: float | None, device: str, precision: str,
              overwrite: bool, no_progress: bool, **axes) -> None:
    """Train a grid of temporal heads at once on one cache; poor ones stop early; leaderboard and winner.

    Rerunning the same command after an interruption resumes the sweep."""
    import dataclasses
    import json

    from pipeline.config import TemporalConfig
    from pipeline.sweep import DEFAULT_GRID, SweepConfig, sweep, sweep_hint

    grids: list[dict[str, tuple]] = []
    if spec is not None:
        def unique(pairs: list[tuple[str, object]]) -> dict:  # JSON keeps the last of two equal keys, silently
            keys = [k for k, _ in pairs]
            if twice := sorted({k for k in keys if keys.count(k) > 1}):
                raise click.BadParameter(f"{spec}: axis {twice[0]!r} is given twice in one grid", param_hint="--spec")
            return dict(pairs)

        try:
            raw = json.loads(spec.read_text(), object_pairs_hook=unique)
        except (OSError, ValueError) as e:
            raise click.BadParameter(f"{spec}: not JSON ({e})", param_hint="--spec")
        kinds = dict(SWEEP_AXES)
        for g in raw if isinstance(raw, list) else [raw]:
            if not isinstance(g, dict):
                raise click.BadParameter(f"{spec}: expected an object of axis -> list of values, or a list of them",
                                         param_hint="--spec")
            if not g:
                raise click.BadParameter(f"{spec}: an empty grid {{}}; give axes such as {{\"hidden\": [128, 256]}}",
                                         param_hint="--spec")
            grid = {}
            for a, v in g.items():
                if a not in kinds:
                    raise click.BadParameter(f"{spec}: unknown axis {a!r} (axes: {', '.join(kinds)})",
                                             param_hint="--spec")
                if v == []:
                    raise click.BadParameter(f"{spec}: axis {a!r} has no values; give at least one",
                                             param_hint="--spec")
                try:
                    grid[a] = _list_of(kinds[a])(None, None, tuple(str(x) for x in (v if isinstance(v, list) else [v])))
                except click.BadParameter as e:
                    raise click.BadParameter(f"{spec}: axis {a!r}: {e.message}", param_hint="--spec") from None
            grids.append(grid)
        if not grids:
            raise click.BadParameter(f"{spec}: an empty list of grids; give at least one object of axis -> values",
                                     param_hint="--spec")
    given = {a: v for a, v in axes.items() if v}
    grids = [{**g, **given} for g in grids] if grids else [given or dict(DEFAULT_GRID)]
    base = TemporalConfig(cache=str(cache), out=str(out), train_split=train_split, val_split=val_split,
                          val_fraction=val_fraction, group_pattern=group_pattern, test_split=test_split,
                          epochs=epochs, batch_size=batch_size, seed=seed, device=device, precision=precision,
                          load=load, memory_budget=memory_budget)
    for g in grids if spec is not None else ():  # a value out of range names the spec file, as its other errors do
        for a, values in g.items():
            for x in values if a not in given else ():
                try:
                    dataclasses.replace(base, **{a: x})
                except ConfigError as e:
                    raise click.BadParameter(f"{spec}: axis {a!r}: {e}", param_hint="--spec") from None
    cfg = SweepConfig(base=base, grids=tuple(tuple(g.items()) for g in grids), eta=eta, min_epochs=min_epochs,
                      overwrite=overwrite)
    _new_folder(out)
    click.get_current_context().meta["resume_hint"] = sweep_hint(out, overwrite)  # taken before the sweep writes
    r = sweep(cfg, progress=not no_progress)
    _print_leaderboard(r)


def _print_leaderboard(r) -> None:
    chance = 1 / len(r.classes)
    click.echo(f"leaderboard: {len(r.leaderboard)} trials picked on {r.val_split} ({len(r.classes)} classes, "
               f"chance {chance:.3f}); {r.trial_epochs} trial-epochs in {r.seconds:.0f} s")
    width = max(len(x["config"]) for x in r.leaderboard)
    click.echo(f"  {'rank':>4}  {'id':<4}  {'config':<{width}}  {'val top-1':>9}  {'val loss':>8}  {'epoch':>5}  status")
    for x in r.leaderboard:
        top1 = f"{x['best_val_top1']:.3f}" if x["best_val_top1"] is not None else "-"
        loss = f"{x['best_val_loss']:.4f}" if x["best_val_loss"] is not None else "-"
        click.echo(f"  {x['rank']:>4}  {x['id']:<4}  {x['config']:<{width}}  {top1:>9}  {loss:>8}  "
                   f"{x['best_epoch'] or '-':>5}  {x['status']}")
    w = r.winner
    click.echo(f"winner {w['id']} ({w['config']}): val top-1 {w['best_val_top1']:.3f} at epoch {w['best_epoch']}")
    if r.test is not None:
        click.echo(f"  {r.test_split} top-1 {r.test['top1']:.3f}, top-5 {r.test['top5']:.3f}, mean class acc "
                   f"{r.test['mean_class_acc']:.3f} (the winner only, evaluated once)")
    click.echo(f"outputs in {r.out}/: best.pt (the winner) leaderboard.csv leaderboard.png sweep.json"
               + (" test.json" if r.test is not None else "") + " trials/")


@main.command("evaluate")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--cache", required=True, type=click.Path(path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--eval-clips", type=EVAL_CLIPS, default=None, help="[default: the checkpoint's]")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Write the confusion matrix and per-class CSV here.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@LOAD_OPTIONS
def evaluate_cmd(checkpoint: Path, cache: Path, split: str, eval_clips: int | None, out: Path | None, device: str,
                 load: str, memory_budget: float | None) -> None:
    """Metrics of a checkpoint on a cache split (the cache must match the checkpoint's backbone)."""
    from pipeline.report import format_table
    from pipeline.train import evaluate_checkpoint

    r = evaluate_checkpoint(checkpoint, cache, split, eval_clips=eval_clips, device=device, out=out, load=load,
                            memory_budget=memory_budget)
    m = r.metrics
    click.echo(f"{split}: {len(r.videos)} videos, {len(r.classes)} classes (chance {1 / len(r.classes):.3f}); "
               f"cache: {r.load}")
    click.echo(format_table([("top-1", f"{m['top1']:.3f}"), ("top-5", f"{m['top5']:.3f}"),
                             ("mean class acc", f"{m['mean_class_acc']:.3f}"), ("loss", f"{m['loss']:.4f}")]))
    if out is not None:
        click.echo(f"wrote {out}/confusion_{split}.png and {out}/per_class_{split}.csv")


@main.command("rewrite-cache")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=OutputFile("features.h5"), default=None,
              help="Write the rewritten cache here.  [default: replace CACHE, atomically]")
@click.option("--force", is_flag=True, help="Rewrite even a cache that is contiguous already; replace an existing "
              "--output (an HDF5 file only).")
def rewrite_cache_cmd(cache: Path, output: Path | None, force: bool) -> None:
    """Rewrite a cache's features contiguously (older caches store them chunked), for fast --load lazy."""
    from pipeline.cache import rewrite_cache

    r = rewrite_cache(cache, output, force=force)
    was = ", ".join(f"{s} {v}" for s, v in r.layouts.items()) or "no splits"
    if not r.rewritten:
        click.echo(f"{cache} is contiguous already ({was}); nothing to do (--force rewrites it anyway)")
        return
    click.echo(f"wrote {r.path}: every split contiguous (was: {was}), {r.nbytes / 1e6:.0f} MB in {r.seconds:.1f} s")


@main.command("predict")
@click.argument("model", type=click.Path(path_type=Path))
@click.argument("inputs", nargs=-1, type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="torch: MODEL is a checkpoint; onnx: MODEL is a file from `export`, run by onnxruntime (nothing "
                   "else is needed); auto: by MODEL's name (.onnx or not).")
@click.option("--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object per input (a JSON list) instead of a table; with --live, one JSON line "
                   "per window and a last line with the summary.")
@click.option("--window", type=click.IntRange(1), default=None,
              help="Classify windows of N kept frames for a timeline; the video label is their mean.  "
                   "[default with --live: the model's seq-len]")
@click.option("--stride", type=click.IntRange(1), default=None,
              help="Window step in kept frames.  [default: --window; with --live: half the window]")
@click.option("--plot", type=OutputFile("timeline.png"), default=None,
              help="With --window: save the timeline plot here (PATH_<n>.png for several inputs).")
@click.option("--live", "live_source", metavar="SOURCE", default=None,
              help="Label a live source instead of INPUTs: a V4L2 device (/dev/video0), an rtsp:// or http:// URL, "
                   "standard input (-) or a named pipe (a stream format such as MPEG-TS), or a video file (with "
                   "--realtime: at its own frame rate). Ctrl-C stops it with a summary.")
@click.option("--realtime", is_flag=True,
              help="With --live: play the source at its own frame rate (a file, or a file behind a URL).")
@click.option("--reconnect", is_flag=True,
              help="With --live: reopen a lost camera or network source (backoff 0.5 s doubling to 10 s) instead "
                   "of stopping; no window spans the gap.")
@click.option("--timeout", type=FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="With --live: seconds a network source may stall before it counts as lost.")
@click.option("--folder-fps", type=FloatRange(min=0, min_open=True), default=None,
              help="Frame rate of frame-folder INPUTs (the rate they were extracted at): their timeline's seconds, "
                   "and needed where the model keeps a set frame rate.  [default: the one the model was trained with]")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if the one recorded in the checkpoint has moved (sha256 must match).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None, help="Frame decoders, as for extract-features.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Intra-op threads of the model on the CPU (torch and onnxruntime).  [default: one per core; "
                   "with --live one fewer, as the reader thread decodes while the model runs]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
@click.pass_context
def predict_cmd(ctx: click.Context, model: Path, inputs: tuple[Path, ...], runtime: str, top_k: int, as_json: bool,
                window: int | None, stride: int | None, plot: Path | None, live_source: str | None, realtime: bool,
                reconnect: bool, timeout: float, folder_fps: float | None, weights: Path | None, batch_size: int,
                workers: int | None, threads: int | None, device: str, no_progress: bool) -> None:
    """Label videos (files, frame folders, or folders of them) or a live source with a trained model:
    a checkpoint (torch) or an exported .onnx (onnxruntime)."""
    import json

    import torch

    from pipeline.predict import Predictor, plot_timeline

    if live_source is not None:
        if inputs:
            raise click.BadParameter("give INPUTs or --live SOURCE, not both", param_hint="--live")
        if plot is not None:
            raise click.BadParameter("--plot is for INPUTs, not --live", param_hint="--plot")
        if ctx.get_parameter_source("top_k") == click.core.ParameterSource.COMMANDLINE:
            raise click.BadParameter("--top-k is for INPUTs: a live window reports its top label and probability",
                                     param_hint="--top-k")
        if folder_fps is not None:
            raise click.BadParameter("--folder-fps is for frame-folder INPUTs, not --live", param_hint="--folder-fps")
    else:
        if not inputs:
            raise click.UsageError("give at least one INPUT (a video, a frame folder, a folder of them) or --live SOURCE")
        timeout_given = ctx.get_parameter_source("timeout") == click.core.ParameterSource.COMMANDLINE
        for flag, on in (("--realtime", realtime), ("--reconnect", reconnect), ("--timeout", timeout_given)):
            if on:
                raise click.BadParameter(f"{flag} needs --live SOURCE", param_hint=flag)
    if plot is not None and window is None:
        raise click.BadParameter("--plot needs --window", param_hint="--plot")
    if stride is not None and window is None and live_source is None:
        raise click.BadParameter("--stride needs --window", param_hint="--stride")
    if plot is not None:  # checked before the work, so the predictions are never lost to a bad path
        _check_plot_path(plot, inputs)
    if threads is None and live_source is not None:
        # Files decode between batches (pipeline/extract.py); live frames must be decoded while the
        # model runs, and an OpenMP team that shares its cores with the reader stalls at every barrier.
        threads = max(1, torch.get_num_threads() - 1)
    if threads is not None:
        ctx.call_on_close(functools.partial(torch.set_num_threads, torch.get_num_threads()))  # back as it was
        torch.set_num_threads(threads)  # onnxruntime's sessions take the same count
    predictor = Predictor(model, runtime=runtime, weights=weights, device=device, batch_size=batch_size,
                          workers=workers, threads=threads, folder_fps=folder_fps)
    if live_source is not None:
        _predict_live(ctx, predictor, live_source, as_json=as_json, window=window, stride=stride, realtime=realtime,
                      reconnect=reconnect, timeout=timeout)
        return
    preds = predictor.predict(inputs, top_k=top_k, window=window, stride=stride, progress=not no_progress)
    if as_json:
        click.echo(json.dumps([p.to_json() for p in preds], indent=2))
    else:
        width = max(len(p.input) for p in preds)
        for p in preds:
            if p.error:
                continue
            labels = "  ".join(f"{c} {prob:.3f}" for c, prob in p.top_k)
            click.echo(f"{p.input:<{width}}  {labels}")
            for w in p.windows:
                t = f"  {w.start_time:7.2f}-{w.end_time:7.2f} s" if w.start_time is not None else ""
                click.echo(f"    frames {w.start_frame:>6}-{w.end_frame:<6}{t}  {w.label} {w.prob:.3f}")
    if plot is not None:
        ok = [p for p in preds if p.windows]
        for i, p in enumerate(ok):
            path = plot if len(ok) == 1 else plot.with_name(f"{plot.stem}_{i + 1}{plot.suffix}")
            plot_timeline(p, predictor.classes, path)
            click.echo(f"timeline plot: {path}", err=True)
    bad = [p for p in preds if p.error]
    for p in bad:
        click.echo(f"error: {p.error}", err=True)
    if bad:
        click.echo(f"{len(bad)} of {len(preds)} input(s) failed", err=True)
        ctx.exit(EXIT_ERROR)


def _predict_live(ctx: click.Context, predictor, source: str, *, as_json: bool, **kw) -> None:
    """One line per window as it comes; Ctrl-C ends with the summary (exit 0); a lost source ends
    with the summary and one error line (exit 1)."""
    import json

    run = predictor.live(source, **kw)
    if not as_json:
        click.echo(f"live: {source}, windows of {run.window} frames every {run.stride} "
                   f"({predictor.classifier.runtime}; Ctrl-C stops)", err=True)
    interrupted = False
    try:
        for w in run:
            if as_json:
                click.echo(json.dumps(w.to_json()))
            else:
                click.echo(f"{w.start_time:8.2f}-{w.end_time:8.2f} s  frames {w.start_frame:>6}-{w.end_frame:<6}  "
                           f"{w.label} {w.prob:.3f}  {1000 * w.latency:7.1f} ms"
                           + (f"  ({w.dropped} dropped)" if w.dropped else ""))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        run.close(interrupted=interrupted)
    s = run.summary()
    if as_json:
        click.echo(json.dumps(s.to_json()))
    else:
        lat = (f"; latency mean {1000 * s.latency_mean:.1f} ms, p95 {1000 * s.latency_p95:.1f} ms"
               if s.latency_mean is not None else "")
        click.echo(f"{s.ended}: {s.windows} windows, {s.frames_read} frames read, {s.frames_classified} classified, "
                   f"{s.dropped} dropped{', ' + str(s.reconnects) + ' reconnects' if s.reconnects else ''}"
                   f"{', ' + str(s.damaged) + ' damaged packets skipped' if s.damaged else ''}{lat}")
    if s.error:
        click.echo(f"error: {s.error}", err=True)
        ctx.exit(EXIT_ERROR)


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--out", "-o", required=True, type=OutputFile("model.onnx"), help="ONNX file to write.")
@click.option("--head-only", is_flag=True,
              help="Export only the head: (batch, time, D) float32 features → probabilities, for your own features.")
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Backbone weights file, if the one recorded in the checkpoint has moved (sha256 must match).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "legacy"]), default="auto", show_default=True,
              help="auto: torch.export (dynamo) for each part, the TorchScript exporter where that fails.")
def export_cmd(checkpoint: Path, out: Path, head_only: bool, weights: Path | None, exporter: str) -> None:
    """Export a trained model to ONNX for onnxruntime: uint8 frames → class probabilities."""
    from pipeline.config import ExportConfig
    from pipeline.export import export_model

    r = export_model(ExportConfig(checkpoint=str(checkpoint), out=str(out), head_only=head_only,
                                  weights=str(weights) if weights else None, exporter=exporter))
    m = r.meta
    click.echo(f"wrote {r.out} ({r.bytes / 1e6:.1f} MB) in {r.seconds:.1f} s: {m.head_config.arch} head"
               + ("" if head_only else f" on {m.provenance.backbone}") + f", {len(m.classes)} classes")
    shape = (f"features (batch, time, {m.feature_dim}) float32" if head_only else
             f"frames (batch, time, {m.frame_spec.size}, {m.frame_spec.size}, 3) uint8 RGB")
    click.echo(f"  {shape} -> probs (batch, {len(m.classes)}); time = seq-len {m.seq_len} "
               f"(a shorter clip: its real length), {m.eval_clips} uniform clip(s) per video")
    if not head_only:
        click.echo(f"  frames: {_describe_spec(m.frame_spec)} (outside the graph); normalisation inside")
    click.echo("  exporters: " + ", ".join(f"{part} {kind}" for part, kind in r.exporters.items()))
    for part, why in r.fallbacks.items():
        click.echo(f"    {part}: {why}")
    click.echo(f"  onnxruntime vs torch on a sample batch: max |difference| {r.max_abs_diff:.2g}")
    if r.precision_gap is not None:
        click.echo(f"  vs torch under the features' {m.provenance.precision} autocast: max |difference| "
                   f"{r.precision_gap:.2g} (the graph computes in float32; see the warning above)")
    if not head_only:
        click.echo(f"  run it: python cli.py predict --runtime onnx {r.out} VIDEO  (or --live SOURCE)")


def _check_plot_path(plot: Path, inputs: tuple[Path, ...] = ()) -> None:
    """A plot path that can be written, in a format matplotlib knows, and outside the ``inputs``
    (a plot saved in a frame folder would replace a frame or add one); its folder is created."""
    from pipeline.files import ensure_dir
    from pipeline.report import _plt

    where = plot.resolve()
    for p in inputs:
        if where == p.resolve() or p.resolve() in where.parents:
            raise click.BadParameter(f"{plot} is {'in ' if where != p.resolve() else ''}the input {p}: the plot would "
                                     f"{'add to or overwrite its frames' if p.is_dir() else 'overwrite it'}; save it "
                                     "elsewhere", param_hint="--plot")

    fmt = plot.suffix.lstrip(".").lower()
    fig = _plt().figure()
    formats = fig.canvas.get_supported_filetypes()
    _plt().close(fig)
    if fmt not in formats:
        raise click.BadParameter(f"{plot}: unknown image format {plot.suffix or '(none)'}; use a name ending in "
                                 ".png, .pdf or .svg", param_hint="--plot")
    if plot.is_dir():
        raise click.BadParameter(f"{plot} is a folder; give a file name such as {plot}/timeline.png",
                                 param_hint="--plot")
    ensure_dir(plot.parent, "--plot folder")


@main.command("finetune-end-to-end")
@click.option("--data-dir", required=True, type=click.Path(path_type=Path), help="Dataset root (frames are decoded).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Stage-two (or end-to-end) checkpoint: head, backbone, FrameSpec and frame selection come from it.")
@click.option("--weights", default=None,
              help="Backbone without --init: none, imagenet, a weight tag or PATH  [default: imagenet]. With --init: "
                   "where the backbone file the checkpoint recorded is now, if it has moved.")
@click.option("--split-dir", type=click.Path(exists=True, file_okay=False), default=None)
@click.option("--split-id", type=click.IntRange(1), default=1, show_default=True)
@click.option("--train-split", default="train", show_default=True)
@VALIDATION_OPTIONS
@click.option("--backbone", default=None, help="Without --init: the backbone (see list-backbones).  "
                                                "[default: --init's, else mobilenet_v2]")
@FRAME_OPTIONS
@click.option("--freeze-cnn", is_flag=True, help="Train the head only; the backbone stays exactly as it is.")
@click.option("--trainable-blocks", type=click.IntRange(0), default=None,
              help="Train only the last N blocks of the backbone (list-backbones --blocks NAME shows them).  "
                   "[default: all]")
@click.option("--backbone-lr", type=FloatRange(min=0, max=1, min_open=True), default=None, help="[default: --lr / 10]")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute trainable blocks in backward: less memory.")
@click.option("--no-augment", is_flag=True, help="No random resized crop / flip.")
@HEAD_OPTIONS
@click.option("--seq-len", type=click.IntRange(1), default=None, help="[default: --init's, else 8]")
@click.option("--sampler", type=click.Choice(TRAIN_SAMPLERS), default="segment", show_default=True)
@click.option("--eval-clips", type=EVAL_CLIPS, default=None, help="[default: --init's, else 1]")
@click.option("--epochs", type=click.IntRange(1), default=5, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Clips per batch (per process).")
@click.option("--lr", type=FloatRange(min=0, max=1, min_open=True), default=1e-3, show_default=True)
@click.option("--workers", type=click.IntRange(0), default=None,
              help="DataLoader worker processes.  [default: CPU cores - 1, at most 8]")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--resume", is_flag=True)
@click.option("--overwrite", is_flag=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True)
@click.option("--no-progress", is_flag=True)
@click.pass_context
def finetune_cmd(ctx: click.Context, data_dir: Path, out: Path, init: Path | None, weights: str, split_dir, split_id,
                 size: int | None, resize_size: int | None, interpolation: str | None, resize: str | None,
                 no_augment: bool, no_progress: bool, **kw) -> None:
    """Fine-tune the backbone and the temporal head jointly from frames (DDP under torchrun)."""
    from pipeline.config import FINETUNE_HEAD_DEFAULTS, FinetuneConfig
    from pipeline.finetune import finetune

    _check_split_id(ctx, split_dir)
    for name in FINETUNE_HEAD_DEFAULTS:  # not given: --init's head, else the default (the same as shown)
        if ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT:
            kw[name] = None
    cfg = FinetuneConfig(dataset=DatasetSpec(root=str(data_dir), split_dir=split_dir, split_id=split_id), out=str(out),
                         init=str(init) if init else None, weights=weights,
                         frame_overrides=FrameOverrides(size=size, resize_size=resize_size, interpolation=interpolation,
                                                        resize=resize), augment=not no_augment, **kw)
    if _is_main_rank():
        _say_unused(ctx, cfg.head or (None if init else "lstm"))  # with --init and no --head: its head
    _new_folder(out)
    r = finetune(cfg, progress=not no_progress, on_epoch=_print_epoch(cfg.epochs), on_start=_hint_from(ctx))
    if _is_main_rank():
        _print_train_summary(r)


@main.command("list-backbones")
@click.option("--timm", "timm_pattern", default=None, metavar="PATTERN",
              help="List timm's pretrained models matching PATTERN (e.g. 'vit_small*', '*dinov2*') instead.")
@click.option("--blocks", "blocks_of", default=None, metavar="NAME",
              help="Show the blocks of one backbone, input side first; --trainable-blocks N trains the last N.")
def list_backbones_cmd(timm_pattern: str | None, blocks_of: str | None) -> None:
    """Backbones by name: feature dimension, default input (the weights' transform), weight tags."""
    from pipeline.backbones import create_backbone, describe_timm, describe_torchvision, torchvision_names

    if blocks_of is not None and timm_pattern is not None:
        raise click.UsageError("--blocks and --timm list different things; give one of them")
    for value, hint in ((blocks_of, "--blocks"), (timm_pattern, "--timm")):
        if value is not None and not value.strip():
            raise click.BadParameter("is empty; give a backbone name" if hint == "--blocks" else "is empty; give a "
                                     "pattern such as 'vit_small*'", param_hint=hint)
    if blocks_of:
        bb = create_backbone(blocks_of, "none")
        click.echo(f"{bb.name}: {len(bb.blocks)} blocks, {bb.num_features}-d features; --trainable-blocks N "
                   "trains the last N")
        for i, b in enumerate(bb.blocks):
            n = sum(p.numel() for name, p in bb.net.named_parameters() if name in set(b.params))
            click.echo(f"  {i + 1:>3}  {', '.join(b.modules) or ', '.join(b.params)}  ({n / 1e6:.2f} M parameters)")
        return
    rows = describe_timm(timm_pattern) if timm_pattern else [describe_torchvision(n) for n in torchvision_names()]
    if not rows:
        raise click.BadParameter(f"no pretrained timm model matches {timm_pattern!r}", param_hint="--timm")
    width = max(len(r["name"]) for r in rows)
    click.echo(f"{'name':<{width}}  {'dim':>5}  {'input':<22}  weights (default first)")
    for r in rows:
        tags = [r["default"]] + [w for w in r["weights"] if w != r["default"]] if r["default"] else r["weights"]
        click.echo(f"{r['name']:<{width}}  {r['num_features'] or '?':>5}  {_describe_input(r['frame_spec']):<22}  "
                   f"{', '.join(tags) or '-'}")


def _describe_input(spec) -> str:
    return f"{spec.resize_size}->{spec.size} {spec.interpolation}" + ("" if spec.resize == "crop" else f" {spec.resize}")


@main.command("make-demo-data")
@click.argument("root", type=click.Path(path_type=Path), default=Path("data/demo"))
@click.option("--train", "per_class_train", type=click.IntRange(1), default=12, show_default=True,
              help="Training videos per class.")
@click.option("--test", "per_class_test", type=click.IntRange(1), default=4, show_default=True,
              help="Test videos per class.")
@click.option("--seed", type=click.IntRange(0, MAX_SEED), default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
def make_demo_data_cmd(root: Path, per_class_train: int, per_class_test: int, seed: int, overwrite: bool) -> None:
    """Write a small synthetic HMDB51-style dataset (frame folders and video files)."""
    from pipeline.demo import make_demo_data

    info = make_demo_data(root, per_class_train=per_class_train, per_class_test=per_class_test,
                          seed=seed, overwrite=overwrite)
    click.echo(f"wrote {root}: {len(info.classes)} classes, "
               + ", ".join(f"{s} {n} videos" for s, n in info.videos.items())
               + f" ({info.frame_folders} frame folders, {info.video_files} video files)")


@main.command("demo")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data/demo"), show_default=True)
@click.option("--features", type=OutputFile("demo.h5"), default=Path("features/demo.h5"), show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/demo"), show_default=True)
@click.option("--size", type=click.IntRange(16), default=112, show_default=True,
              help="Network input size (the demo frames are 80x60).")
@click.option("--epochs", type=click.IntRange(1), default=60, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.pass_context
def demo_cmd(ctx: click.Context, data_dir: Path, features: Path, out: Path, size: int, epochs: int, device: str) -> None:
    """The whole story on built-in synthetic data: data, extract, train, evaluate, predict."""
    import json
    import time

    from pipeline.config import TemporalConfig
    from pipeline.demo import MARKER, existing_demo, make_demo_data
    from pipeline.errors import ConfigError, DataError
    from pipeline.extract import extract_features
    from pipeline.predict import Predictor
    from pipeline.report import format_table
    from pipeline.train import evaluate_checkpoint, train_temporal

    t0 = time.perf_counter()
    # The demo replaces only what it wrote itself: its data (marked) and a run on its own cache.
    if data_dir.is_dir() and any(data_dir.iterdir()) and not (data_dir / MARKER).is_file():
        raise DataError(f"--data-dir {data_dir} is not empty and holds no demo data; give another --data-dir "
                        "(the demo writes its own dataset there)")
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"--data-dir {data_dir} is a file; give a folder for the demo dataset")
    if (out / "best.pt").exists() or (out / "last.pt").exists():
        try:
            made_on = json.loads((out / "config.json").read_text())["train"]["cache"]
        except (OSError, ValueError, KeyError, TypeError):
            made_on = None
        if made_on != str(features):
            raise ConfigError(f"--out {out} holds a run that is not the demo's (on {made_on or 'an unknown cache'}); "
                              "give another --out")
    click.echo(f"[1/5] demo data -> {data_dir}")
    info = existing_demo(data_dir, per_class_train=12, per_class_test=4, seed=0)
    if info is None:
        info = make_demo_data(data_dir, overwrite=True)
        click.echo(f"  wrote {len(info.classes)} classes (time-reversed pairs: grow/shrink, fade_in/fade_out, "
                   "red_to_blue/blue_to_red, pan_right/pan_left), "
                   + ", ".join(f"{s} {n} videos" for s, n in info.videos.items()))
    else:
        click.echo("  reusing the existing demo data")

    click.echo(f"[2/5] extract-features -> {features}  (random-init MobileNetV2, BatchNorm recalibrated on the "
               "demo frames)")
    ctx.meta["resume_hint"] = "rerun `python cli.py demo` to resume"
    r = extract_features(ExtractConfig(dataset=DatasetSpec(root=str(data_dir)), output=str(features),
                                       weights="none", frame_overrides=FrameOverrides(size=size), device=device,
                                       calibration_frames=512))
    click.echo(f"  {', '.join(f'{s} {n} videos' for s, n in r.videos.items())}; {r.frames} frames in "
               f"{r.seconds:.1f} s this run ({r.reused} videos already cached); backbone {r.weights_file}")

    click.echo(f"[3/5] train-temporal -> {out}  (best epoch picked on a validation set carved from train)")
    tr = train_temporal(TemporalConfig(cache=str(features), out=str(out), hidden=256, epochs=epochs, lr=3e-3,
                                       dropout=0.2, device=device, overwrite=True, val_fraction=0.25),
                        progress=False, on_epoch=_print_epoch(epochs, every=10))
    click.echo(f"  best epoch {tr.best_epoch}, picked on {tr.val_split}: val top-1 {tr.best['top1']:.3f}; "
               f"{sum(h['epoch_seconds'] for h in tr.history):.1f} s of training in all")

    click.echo(f"[4/5] evaluate {out}/best.pt on the test split (held out: evaluated once, never used to pick)")
    ev = evaluate_checkpoint(out / "best.pt", features, "test", device=device)  # the run wrote its test files
    m = ev.metrics
    click.echo(format_table([("top-1", f"{m['top1']:.3f}"), ("top-5", f"{m['top5']:.3f}"),
                             ("mean class acc", f"{m['mean_class_acc']:.3f}"),
                             ("chance", f"{1 / len(ev.classes):.3f}")]))

    click.echo("[5/5] predict on held-out test videos (frames decoded from disk, not the cache)")
    held_out = [next(p for p in sorted((data_dir / "test" / c).iterdir()) if not p.name.startswith("."))
                for c in info.classes]
    preds = Predictor(out / "best.pt", device=device).predict(held_out, top_k=2, progress=False)
    right = 0
    for p in preds:
        truth = Path(p.input).parent.name
        right += p.top_k[0][0] == truth
        click.echo(f"  {Path(p.input).relative_to(data_dir)}: {p.top_k[0][0]} {p.top_k[0][1]:.2f}"
                   f"{'' if p.top_k[0][0] == truth else '   (wrong)'}")
    click.echo(f"  {right}/{len(preds)} correct")
    click.echo(f"\ndone in {time.perf_counter() - t0:.0f} s: test top-1 {m['top1']:.3f} vs chance "
               f"{1 / len(ev.classes):.3f} (model picked on validation, not on test). Outputs: {features}, "
               f"{out}/ (best.pt, curves.png, confusion.png, ...)")


if __name__ == "__main__":
    main()
