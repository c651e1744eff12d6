"""The `dfpipe` command: parse, load the config, call a stage, print the summary, set the exit code."""
from __future__ import annotations

import functools
import logging
import sys
from collections import Counter
from pathlib import Path

import click

from ..manifests.errors import (EXIT_BAD_INPUT, EXIT_FAILED_UNITS, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,
                               DfpipeError, write_traceback)
from . import __version__
from .config import load_config, parse_override

# `dfpipe --help` lists the commands in the order a dataset goes through them; any other command follows.
PIPELINE_ORDER = ("extract", "align", "train", "runs", "calibrate", "score-video", "report", "status", "verify",
                  "config", "weights", "demo-data")


def _log_folders(kwargs: dict) -> list[Path]:
    """Where an internal error's traceback goes, the first that is a folder: the run folder, the workspace, the
    output (a folder for demo-data) or the folder of the output file: where the user looks for what it wrote."""
    found = [kwargs.get("run_dir"), kwargs.get("work"), kwargs.get("out")]
    return [Path(f) for f in found if f] + ([Path(kwargs["out"]).parent] if kwargs.get("out") else [])


def command(fn):
    """Exit codes: 0 done, 1 some inputs failed (their rows say why), 2 a DfpipeError or an OSError (one line),
    3 anything else: a bug, whose traceback goes to a log file named in one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort):  # click's usage errors exit 2 itself
            raise
        except KeyboardInterrupt:  # finished work is recorded as it completes: say so instead of "Aborted!"
            click.echo("\ninterrupted: finished work is kept; rerun the same command to complete the rest", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (DfpipeError, OSError) as e:
            click.echo(f"error: {' '.join(str(e).split())}", err=True)
            sys.exit(EXIT_BAD_INPUT)
        except Exception as e:  # noqa: BLE001
            log = write_traceback(e, _log_folders(kwargs))
            click.echo(f"internal error: {type(e).__name__}: {' '.join(str(e).split())} (a bug in dfpipe; the "
                       f"traceback is in {log})", err=True)
            sys.exit(EXIT_INTERNAL)
    return wrapper


def _flag(name: str):
    """A flag every command shares, kept in the click context (`quiet()`, `verbose()`) rather than passed on."""
    def store(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        ctx.meta[f"dfpipe.{name}"] = value
        if name == "quiet" and value:  # not imported otherwise: tqdm takes 0.1 s
            from ..manifests.progress import configure
            configure(quiet=True)
            ctx.call_on_close(lambda: configure(quiet=False))  # for the command, not the process
        elif name == "verbose" and value:
            logging.getLogger().setLevel(logging.INFO)
    return store


def _is(name: str) -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.meta.get(f"dfpipe.{name}"))


def quiet() -> bool:
    return _is("quiet")


def verbose() -> bool:
    return _is("verbose")


def output_options(fn):
    """-q and -v, the same on every command."""
    fn = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=_flag("verbose"),
                      help="Say more: every failure and missing file, why each unit is stale, info logs.")(fn)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=_flag("quiet"),
                        help="No progress and no notes: results, warnings and errors only.")(fn)


def config_options(fn):
    fn = click.option("--print-config", is_flag=True, expose_value=False, callback=_flag("print_config"),
                      help="Print the effective configuration (defaults, --config, --set, this command's flags) "
                           "as YAML and exit.")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override any config value, e.g. --set align.margin=1.4 (repeatable).")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                      help="YAML file overriding pipeline/defaults.yaml.")(fn)
    return fn


@functools.cache
def _defaults():
    return load_config()


class Setting(click.Option):
    """An option that sets one config value (``key``). Left out, the value comes from the config (defaults.yaml,
    --config, --set), whose default its help shows."""

    def __init__(self, *args, key: str, **kwargs):
        super().__init__(*args, default=None, **kwargs)
        self.key = key

    def get_help_extra(self, ctx: click.Context):
        extra = super().get_help_extra(ctx)
        section, name = self.key.split(".", 1)
        value = _defaults()[section][name]
        if isinstance(value, bool) and self.secondary_opts:
            extra["default"] = (self.opts if value else self.secondary_opts)[0].lstrip("-")
        elif value is not None and value is not False:
            extra["default"] = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        return extra


def setting(*decls: str, key: str, **kwargs):
    return click.option(*decls, cls=Setting, key=key, **kwargs)


def work_option(fn):
    return click.option("--work", "work", required=True, type=click.Path(file_okay=False),
                        help="Workspace folder holding manifests/, frames/, faces/ of one dataset.")(fn)


def shard_option(fn):
    return click.option("--shard", default=None, metavar="I/N",
                        help="Process only part I of N (0-based) of the units, e.g. one Slurm array task.")(fn)


def make_config(config_file, overrides):
    """The command's `Setting` flags are overrides like any other, after --set; a flag left out keeps the file's
    or the default value. With --print-config, print the result and exit."""
    ctx = click.get_current_context()
    updates = [parse_override(o) for o in overrides]
    for param in ctx.command.params:
        if isinstance(param, Setting) and ctx.params.get(param.name) is not None:
            section, key = param.key.split(".", 1)
            updates.append({section: {key: ctx.params[param.name]}})
    cfg = load_config(config_file, updates)
    if ctx.meta.get("dfpipe.print_config"):
        click.echo(config_yaml(cfg.to_dict()), nl=False)
        ctx.exit(EXIT_OK)
    return cfg


def config_yaml(tree: dict) -> str:
    import yaml
    return yaml.safe_dump(tree, sort_keys=False)


def finish(summary) -> None:
    """A stage's last words: its summary line, its failures (one line each) and its exit code."""
    click.echo(summary.line())
    shown = None if verbose() else 20
    for unit, reason in summary.failed[:shown]:
        click.echo(f"  failed {unit}: {reason}", err=True)
    if shown and len(summary.failed) > shown:
        click.echo(f"  ... and {len(summary.failed) - shown} more (-v lists them; see the stage's manifest)",
                   err=True)
    sys.exit(summary.exit_code)


class StderrHandler(logging.StreamHandler):
    """Logs to sys.stderr as it is when a record comes, not when the handler was made: train's copy into
    RUN_DIR/train.log replaces it for the run."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


class PipelineGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        rank = {name: i for i, name in enumerate(PIPELINE_ORDER)}
        return sorted(self.commands, key=lambda name: (rank.get(name, len(rank)), name))


@click.group(cls=PipelineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfpipe")
def main():
    """dfpipe: videos -> aligned face crops -> a trained deepfake detector -> per-video scores.

    Every stage keeps its state in a workspace (--work DIR) and is resumable: rerun a command and finished
    work is skipped; kill it and the rerun completes only what is missing.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s", handlers=[StderrHandler()])


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@setting("--n-real", key="demo.n_real", type=int, help="Number of real clips.")
@setting("--n-fake", key="demo.n_fake", type=int, help="Number of fake clips (each made from a real one).")
@setting("--seed", key="demo.seed", type=int)
@click.option("--masks", is_flag=True,
              help="Also write each fake's blend mask per frame (OUT/masks/fake_KKK.npz): where it is fake.")
@config_options
@output_options
@command
def demo_data(out, n_real, n_fake, seed, masks, config_file, overrides):
    """Generate a small labelled video set (real/ and fake/) to try dfpipe without a dataset."""
    from ..stages.demo import make_demo_dataset
    cfg = make_config(config_file, overrides)
    paths = make_demo_dataset(out, **cfg.demo, masks=masks)
    click.echo(f"demo-data: wrote {len(paths)} videos to {out}")


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@work_option
@click.option("--dataset", type=click.Choice(["auto", "ffpp", "dfdc", "celebdf", "folders", "csv"]),
              default="auto", show_default=True, help="Layout of INPUT.")
@setting("--stride", key="extract.stride", type=int, help="Keep every N-th frame.")
@setting("--max-frames", key="extract.max_frames", type=int, help="At most this many sampled frames per video.")
@setting("--jpeg-quality", key="extract.jpeg_quality", type=click.IntRange(1, 100))
@setting("--decoder", key="extract.decoder", type=click.Choice(["auto", "pyav", "decord"]))
@setting("--workers", key="extract.workers", type=int, help="Decode worker processes.")
@setting("--timeout", key="extract.timeout", type=float, help="Seconds per video before its worker is killed.")
@shard_option
@click.option("--retry-failed", is_flag=True, help="Retry videos that failed in an earlier run.")
@click.option("--prune", is_flag=True,
              help="Delete the frames and crops of videos extracted earlier that are no longer in INPUT.")
@config_options
@output_options
@command
def extract(input_path, work, dataset, stride, max_frames, jpeg_quality, decoder, workers, timeout, shard,
            retry_failed, prune, config_file, overrides):
    """Decode every video of INPUT and keep every stride-th frame as JPEG under DIR/frames/."""
    from ..manifests.progress import note
    from ..manifests.workspace import Shard, Workspace
    from ..stages.extract import run_extract
    cfg = make_config(config_file, overrides)
    found, summary = run_extract(Workspace(work), input_path, cfg, dataset=dataset, shard=Shard.parse(shard),
                                 retry_failed=retry_failed, prune=prune, progress=not quiet())
    click.echo(f"dataset layout: {found.layout} ({len(found.rows)} videos)")
    for text in found.notes:
        note(f"  note: {text}")
    finish(summary)


@main.command()
@work_option
@setting("--device", key="align.device", type=click.Choice(["auto", "cpu", "cuda"]))
@setting("--batch-size", key="align.batch_size", type=int,
         help="Frames read per step; the ones due for full detection go to one detector call.")
@setting("--detect-every", key="align.detect_every", type=click.IntRange(min=1),
         help="Full detection on every Nth sampled frame (and on frames with no live track); tracked faces are "
              "re-found on every frame.")
@setting("--detect-max-side", key="align.detect_max_side", type=int,
         help="Frames are shrunk to at most this many pixels on their long side for detection.")
@setting("--min-face-size", key="align.min_face_size", type=int, help="Smallest face, in detection pixels.")
@setting("--margin", key="align.margin", type=float, help="Crop size relative to the tight face.")
@setting("--max-faces", key="align.max_faces", type=int, help="Keep only the N largest face tracks per video.")
@setting("--min-track-len", key="align.min_track_len", type=int,
         help="Drop tracks shorter than this (sampled frames).")
@setting("--jpeg-quality", key="align.jpeg_quality", type=click.IntRange(1, 100))
@setting("--pair-aware/--no-pair-aware", key="align.pair_aware",
         help="Crop fakes with their source video's tracks when the frames match.")
@shard_option
@click.option("--retry-failed", is_flag=True, help="Retry videos that failed in an earlier run.")
@config_options
@output_options
@command
def align(work, device, batch_size, detect_every, detect_max_side, min_face_size, margin, max_faces,
          min_track_len, jpeg_quality, pair_aware, shard, retry_failed, config_file, overrides):
    """Detect, track and align faces in the extracted frames: HQ 224 and LQ 112 crops under DIR/faces/."""
    from ..manifests.workspace import Shard, Workspace, WorkspaceError
    from ..stages.align import run_align
    cfg = make_config(config_file, overrides)
    ws = Workspace(work)
    if not ws.manifest("frames.csv").exists():
        raise WorkspaceError(f"{ws.root}: no extracted frames; run `dfpipe extract INPUT --work {work}`")
    summary = run_align(ws, cfg, shard=Shard.parse(shard), retry_failed=retry_failed, progress=not quiet())
    finish(summary)


@main.command()
@work_option
@click.option("--run", "run_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: config.yaml, metrics.csv, last.pt, best.pt.")
@click.option("--resume", is_flag=True,
              help="Continue RUN_DIR/last.pt with the run's RUN_DIR/config.yaml (unless --config is given), "
                   "e.g. for more epochs; only the epochs (not under the cosine or onecycle schedule, which is "
                   "planned for them), early-stop patience, workers and device may change. Not needed to finish "
                   "an interrupted run: the same command again does.")
@setting("--epochs", key="train.epochs", type=int)
@setting("--batch-size", key="train.batch_size", type=int)
@setting("--workers", key="train.workers", type=int, help="DataLoader worker processes.")
@setting("--device", key="train.device", type=click.Choice(["auto", "cpu", "cuda"]))
@setting("--hq-backbone", key="model.hq_backbone", help="efficientnet-b0..b7 or any timm model name.")
@setting("--lq-backbone", key="model.lq_backbone")
@setting("--pretrained-hq", key="model.pretrained_hq", metavar="imagenet|FILE",
         help="Starting weights of the HQ backbone: imagenet (found on this machine, see `dfpipe weights`; nothing "
              "is ever downloaded) or a local weight file.")
@setting("--pretrained-lq", key="model.pretrained_lq", metavar="imagenet|FILE",
         help="The same for the LQ backbone.")
@setting("--from-scratch", key="train.from_scratch", is_flag=True,
         help="Allow backbones without pretrained weights (model.pretrained_* null): random init.")
@config_options
@output_options
@command
def train(work, run_dir, resume, epochs, batch_size, workers, device, hq_backbone, lq_backbone, pretrained_hq,
          pretrained_lq, from_scratch, config_file, overrides):
    """Build leak-free training pairs from the workspace and train the dual-stream detector.

    Everything it prints (-q: no progress lines; the per-epoch lines stay) is also appended to RUN_DIR/train.log,
    after the effective config, versions, device and git commit. Runs on CPU or CUDA, single process or
    `torchrun --nproc_per_node N -m dfpipe.pipeline.cli train ...`.
    """
    from ..stages.run_folder import run_config, train_log
    from ..stages.train import run_train
    cfg = make_config(run_config(run_dir, config_file, resume), overrides)
    click.get_current_context().with_resource(train_log(run_dir, cfg))  # open until the error line, if any
    result = run_train(work, run_dir, cfg, resume=resume, progress=not quiet())
    if result:
        click.echo("train: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in result.items() if not isinstance(v, dict)))


@main.command("score-video")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--checkpoint", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="RUN_DIR/best.pt from `dfpipe train`; `best` (or RUNS_DIR/best): the run `dfpipe runs "
                   "--promote` marked best. Given several times: an ensemble scoring the same clips.")
@click.option("--out", default="scores.csv", show_default=True, type=click.Path(dir_okay=False),
              help="Per-video CSV of this call's videos; <name>.jsonl (every video ever scored into this "
                   "output, the record reruns resume from), <name>_metrics.json and <name>_plots/ go beside it.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV path,label or a DFDC metadata.json: adds <name>_metrics.json and plots.")
@click.option("--work", type=click.Path(file_okay=False), default=None,
              help="Score the videos of a workspace split (with --split), labels included.")
@click.option("--split", type=click.Choice(["train", "val", "test"]), default=None,
              help="Refused when the workspace's splits are not the ones the checkpoint was trained on.")
@click.option("--run-splits", is_flag=True,
              help="Take --split from the checkpoint's run folder (its training_pairs.csv), not the workspace.")
@setting("--aggregate", key="score.aggregate", type=click.Choice(["mean", "median", "max", "topk", "confident"]),
         help="Clip -> track rule [default: the one chosen on validation, stored in the checkpoint].")
@setting("--threshold", key="score.threshold", type=float, help="Decision threshold [default: the checkpoint's].")
@setting("--tta-flip/--no-tta-flip", key="score.tta_flip", help="Average each clip with its mirror image.")
@setting("--clip-every", key="score.clip_every", type=click.IntRange(min=1),
         help="Score every Nth clip of each face track: N times less model work, fewer clips per score.")
@setting("--max-frames", key="extract.max_frames", type=int,
         help="Score at most this many sampled frames per video.")
@setting("--fallback-score", key="score.fallback_score", type=float,
         help="Score given to videos that cannot be scored [default: none, the score stays empty].")
@setting("--device", key="score.device", type=click.Choice(["auto", "cpu", "cuda"]))
@setting("--batch-size", key="score.batch_size", type=int,
         help="Clips per model call [default: 16 on CUDA, 1 on CPU].")
@setting("--mc-samples", key="score.mc_samples", type=click.IntRange(min=0),
         help="Monte-Carlo dropout samples of the head: each video gets a score_std.")
@setting("--ensemble", key="score.ensemble", type=click.Choice(["mean", "median"]),
         help="How several checkpoints' video scores make the score.")
@setting("--runtime", key="score.runtime", type=click.Choice(["auto", "torch", "onnx"]),
         help="What runs the model: auto is onnxruntime (fp32) on CPUs without AMX, torch on others and on CUDA.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Then write the HTML report of this call's videos into this folder (see `dfpipe report`).")
@shard_option
@config_options
@output_options
@command
def score_video(paths, checkpoint, out, labels, work, split, run_splits, aggregate, threshold, tta_flip, clip_every,
                max_frames, fallback_score, device, batch_size, mc_samples, ensemble, runtime, report_dir, shard,
                config_file, overrides):
    """Score raw videos (files, folders or a CSV list): one score per video, no files on disk but the results.

    Decodes, detects, tracks and aligns in memory with the settings the model was trained with, and reruns skip
    videos already in the output.
    """
    from ..manifests.progress import note
    from ..manifests.workspace import Shard
    from ..stages.score import fixed_by_checkpoint
    from ..stages.score_store import run_score
    if not paths and not work:
        raise click.UsageError("give video files, folders or a CSV list, or --work DIR --split SPLIT")
    if bool(work) != bool(split):
        raise click.UsageError("--work and --split go together")
    if run_splits and not split:
        raise click.UsageError("--run-splits needs --work DIR --split SPLIT")
    cfg = make_config(config_file, overrides)
    ignored = fixed_by_checkpoint(cfg)
    if ignored:  # from --set or --config alike
        note(f"note: frames are sampled and faces cropped with the checkpoint's settings, as in training; "
             f"ignoring {', '.join(ignored)}")
    from ..stages.runs import resolve_checkpoint
    checkpoints = [str(resolve_checkpoint(c)) for c in checkpoint]
    if report_dir and len(checkpoints) > 1:
        raise click.UsageError("--report explains one model's scores (its Grad-CAM): give one --checkpoint")
    if report_dir and shard:
        raise click.UsageError("--report with --shard would give each shard an index of its own videos: once the "
                               "shards are done, merge them (score-video without --shard) with --report")
    checkpoint = checkpoints[0]
    summary = run_score(list(paths), checkpoint if len(checkpoints) == 1 else checkpoints, cfg, out=out,
                        labels=labels, work=work, split=split, run_splits=run_splits, shard=Shard.parse(shard),
                        progress=not quiet())
    click.echo(summary.line())
    if report_dir:
        from ..stages.report import write_report
        click.echo(write_report(summary.csv, checkpoint, report_dir, cfg, progress=not quiet()).line())
    sys.exit(summary.exit_code)


@main.command()
@click.argument("scores", type=click.Path(dir_okay=False))
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint score-video scored SCORES with (RUN_DIR/best.pt, or `best`).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for index.html and videos/<name>.html (pages already there are reused when unchanged).")
@setting("--faces", key="report.faces", type=click.IntRange(min=0),
         help="The most suspicious clips shown per video, each with its Grad-CAM heatmap.")
@setting("--strip-frames", key="report.strip_frames", type=click.IntRange(min=0),
         help="Frames across each video shown with their face boxes.")
@setting("--device", key="score.device", type=click.Choice(["auto", "cpu", "cuda"]))
@config_options
@output_options
@command
def report(scores, checkpoint, out, faces, strip_frames, device, config_file, overrides):
    """Why each video of a score-video CSV scored as it did: an HTML page per video and an index.

    Per video: score and verdict, each face track's clip probabilities over time, the most suspicious faces with
    their Grad-CAM heatmaps and stream weights, frames with their face boxes. Scores come from SCORES' record
    (nothing is scored again); each video's faces are found again to show them.
    """
    from ..stages.report import write_report
    from ..stages.runs import resolve_checkpoint
    cfg = make_config(config_file, overrides)
    click.echo(write_report(scores, str(resolve_checkpoint(checkpoint)), out, cfg, progress=not quiet()).line())


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--checkpoint", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="The ensemble's checkpoints, as score-video takes them.")
@click.option("--labels", required=True, type=click.Path(exists=True, dir_okay=False),
              help="CSV path,label or a DFDC metadata.json.")
@click.option("--out", default="calibration.csv", show_default=True, type=click.Path(dir_okay=False),
              help="The labelled videos' scores, as score-video writes them.")
@setting("--ensemble", key="score.ensemble", type=click.Choice(["mean", "median"]))
@config_options
@output_options
@command
def calibrate(paths, checkpoint, labels, out, ensemble, config_file, overrides):
    """Fit the threshold of several checkpoints scoring together (score-video --checkpoint a --checkpoint b) on a
    labelled list of videos (PATHS, or the labels CSV itself): the balanced-accuracy threshold of their ensemble
    scores, for score-video's --threshold."""
    from ..manifests.workspace import Shard
    from ..stages.ensemble import fitted_threshold
    from ..stages.runs import resolve_checkpoint
    from ..stages.score_store import run_score
    checkpoints = [str(resolve_checkpoint(c)) for c in checkpoint]
    summary = run_score(list(paths) or [labels], checkpoints, make_config(config_file, overrides), out=out,
                        labels=labels, work=None, split=None, shard=Shard(), progress=not quiet())
    click.echo(summary.line())
    click.echo(fitted_threshold(summary.csv))


@main.command()
@click.argument("folders", nargs=-1, type=click.Path(file_okay=False))
@click.option("--sort", default="best_val_loss", show_default=True,
              help="The best by this first: best_val_loss, val_auc, date, epochs or run.")
@click.option("--diff", nargs=2, metavar="A B", type=click.Path(file_okay=False), default=None,
              help="The settings in which two runs differ.")
@click.option("--promote", metavar="RUN", type=click.Path(file_okay=False), default=None,
              help="Mark RUN the best of its dataset (registry.json beside it): `score-video --checkpoint best`.")
@output_options
@command
def runs(folders, sort, diff, promote):
    """The training runs under FOLDERS: date, data digest, backbones, epochs, best val loss, val AUC, threshold and
    whether they finished."""
    from ..stages import runs as runs_mod
    if diff:
        click.echo("\n".join(runs_mod.differences(*diff)) or "no setting differs")
    elif promote:
        click.echo(runs_mod.promote(promote))
    elif not folders:
        raise click.UsageError("give run folders (or folders of runs), --diff A B or --promote RUN")
    else:
        click.echo(runs_mod.format_table(runs_mod.list_runs(list(folders), sort)))


@main.command()
@click.argument("names", nargs=-1)
@output_options
@command
def weights(names):
    """Which backbones have ImageNet weights on this machine, and where from (nothing is ever downloaded).

    NAMES: backbones to look up besides the known ones (any timm model name).
    """
    from ..models.backbones import is_backbone
    from ..models.pretrained import KNOWN, find_imagenet, where_to_put, weights_dir
    unknown = [n for n in names if not is_backbone(n)]
    if unknown:
        raise click.BadParameter(f"unknown backbone {', '.join(unknown)}: neither efficientnet-b0..b7 nor a timm "
                                 "model name", param_hint="NAMES")
    click.echo(f"weights folder: {weights_dir()} (set $DFPIPE_WEIGHTS to change it)")
    for name in dict.fromkeys([*KNOWN, *names]):
        source = find_imagenet(name)
        click.echo(f"{name:<24}" + (f"imagenet: {source.describe()}" if source else f"missing: {where_to_put(name)}"))


def _stages():
    """(name, spec, units-for-status) of every stage with a workspace manifest, in pipeline order."""
    from ..stages import align_units as al
    from ..stages import extract as ex
    return [("extract", ex.SPEC, ex.status_units), ("align", al.SPEC, al.status_units)]


def existing_workspace(work):
    """status and verify only read: a mistyped --work must not pass as an empty workspace (or create one)."""
    from ..manifests.workspace import Workspace, WorkspaceError
    ws = Workspace(work)
    if not ws.manifests.is_dir():
        raise WorkspaceError(f"{ws.root}: not a dfpipe workspace (no manifests/ folder)")
    return ws


STATES = ("done", "stale", "failed", "pending", "waiting")


def stage_states(ws) -> list[dict]:
    """Per stage: its count of units in each state and each unit that is not done, with why (in unit order)."""
    from ..manifests.units import judge_all, load_params
    out, videos = [], None
    for name, spec, units_fn in _stages():
        params = load_params(ws, spec)
        units = units_fn(ws)
        videos = len(units) if videos is None else videos  # the first stage has a unit for every video
        judged = (judge_all(ws, spec, params, units) if params is not None
                  else {u.id: ("pending", "not run yet") for u in units})
        counts = Counter(state for state, _ in judged.values())
        out.append({"stage": name, **{s: counts.get(s, 0) for s in STATES}, "waiting": videos - len(units),
                    "units": [{"id": unit, "state": state, "reason": why}
                              for unit, (state, why) in judged.items() if state != "done"]})
    return out


@main.command()
@work_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object on stdout: per stage its counts and every unit not done, with why.")
@output_options
@command
def status(work, as_json):
    """Per stage: how many videos are done, stale, failed, pending, or waiting for an earlier stage; with -v, why
    each stale or failed one is not done (input changed, settings changed, files missing, rows missing, the
    failure)."""
    import json
    ws = existing_workspace(work)
    stages = stage_states(ws)
    if as_json:
        click.echo(json.dumps({"workspace": str(ws.root), "stages": stages}, indent=1))
        return
    click.echo(f"{'stage':<10}" + "".join(f"{s:>9}" for s in STATES))
    for stage in stages:
        click.echo(f"{stage['stage']:<10}" + "".join(f"{stage[s]:>9}" for s in STATES))
    for stage in stages if verbose() else []:  # pending ones need no reason; --json lists them too
        for unit in (u for u in stage["units"] if u["state"] != "pending"):
            click.echo(f"{stage['stage']} {unit['id']}: {unit['state']}, {unit['reason']}")


@main.command("config")
@click.argument("sections", nargs=-1)
@config_options
@output_options
@command
def config_command(sections, config_file, overrides):
    """Print the effective configuration: pipeline/defaults.yaml, then --config FILE, then each --set, as YAML
    that --config takes back. SECTIONS: only these (e.g. `dfpipe config train model`)."""
    cfg = make_config(config_file, overrides).to_dict()
    unknown = [s for s in sections if s not in cfg]
    if unknown:
        raise click.BadParameter(f"no section {', '.join(unknown)} (sections: {', '.join(cfg)})",
                                 param_hint="SECTIONS")
    click.echo(config_yaml({s: cfg[s] for s in sections or cfg}), nl=False)


@main.command()
@work_option
@output_options
@command
def verify(work):
    """Re-hash every recorded output file; report missing or changed ones (the next run redoes their units)."""
    from ..manifests.units import verify as verify_stage
    ws = existing_workspace(work)
    bad = False
    for name, spec, _ in _stages():
        report = verify_stage(ws, spec)
        redo = f", {len(report.redo)} video(s) still to redo (run `dfpipe {name}`)" if report.redo else ""
        rows = (f", {len(report.rows_missing)} video(s) with rows missing from {spec.rows_table}"
                if report.rows_missing else "")
        click.echo(f"{name}: {report.checked} files checked, {len(report.missing)} missing, "
                   f"{len(report.changed)} changed{rows}{redo}")
        shown = None if verbose() else 20
        for rel in report.missing[:shown]:
            click.echo(f"  missing {rel}")
        for rel in report.changed[:shown]:
            click.echo(f"  changed {rel}")
        bad |= not report.ok
    sys.exit(EXIT_FAILED_UNITS if bad else EXIT_OK)


if __name__ == "__main__":
    main()
