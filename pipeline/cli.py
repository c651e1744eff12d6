"""The `dfpipe` command: parse, load the config, call a stage, print the summary, set the exit code."""
from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

import click

from ..manifests.errors import (EXIT_BAD_INPUT, EXIT_FAILED_UNITS, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK,
                               DfpipeError, write_traceback)
from . import __version__
from .config import load_config, parse_override



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


def config_options(fn):
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                      help="Override any config value, e.g. --set align.margin=1.4 (repeatable).")(fn)
    fn = click.option("--config", "config_file", type=click.Path(dir_okay=False),
                      help="YAML file overriding pipeline/defaults.yaml.")(fn)
    return fn


def work_option(fn):
    return click.option("--work", "work", required=True, type=click.Path(file_okay=False),
                        help="Workspace folder holding manifests/, frames/, faces/ of one dataset.")(fn)


def shard_option(fn):
    return click.option("--shard", default=None, metavar="I/N",
                        help="Process only part I of N (0-based) of the units, e.g. one Slurm array task.")(fn)


def make_config(config_file, overrides, **section_values):
    """CLI flags are overrides like any other; a flag left unset keeps the file's or the default value."""
    updates = [parse_override(o) for o in overrides]
    for dotted, value in section_values.items():
        if value is not None:
            section, key = dotted.split(".", 1)
            updates.append({section: {key: value}})
    return load_config(config_file, updates)


def finish(summary) -> None:
    """A stage's last words: its summary line, its failures (one line each) and its exit code."""
    click.echo(summary.line())
    for unit, reason in summary.failed[:20]:
        click.echo(f"  failed {unit}: {reason}", err=True)
    if len(summary.failed) > 20:
        click.echo(f"  ... and {len(summary.failed) - 20} more (see the stage's manifest)", err=True)
    sys.exit(summary.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dfpipe")
def main():
    """dfpipe: videos -> aligned face crops -> a trained deepfake detector -> per-video scores.

    Every stage keeps its state in a workspace (--work DIR) and is resumable: rerun a command and finished
    work is skipped; kill it and the rerun completes only what is missing.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n-real", type=int, default=None, help="Number of real clips.")
@click.option("--n-fake", type=int, default=None, help="Number of fake clips (each made from a real one).")
@click.option("--seed", type=int, default=None)
@config_options
@command
def demo_data(out, n_real, n_fake, seed, config_file, overrides):
    """Generate a small labelled video set (real/ and fake/) to try dfpipe without a dataset."""
    from ..stages.demo import make_demo_dataset
    cfg = make_config(config_file, overrides, **{"demo.n_real": n_real, "demo.n_fake": n_fake, "demo.seed": seed})
    paths = make_demo_dataset(out, **cfg.demo)
    click.echo(f"demo-data: wrote {len(paths)} videos to {out}")


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(exists=True))
@work_option
@click.option("--dataset", type=click.Choice(["auto", "ffpp", "dfdc", "celebdf", "folders", "csv"]),
              default="auto", show_default=True, help="Layout of INPUT.")
@click.option("--stride", type=int, default=None, help="Keep every N-th frame [default from config: 3].")
@click.option("--max-frames", type=int, default=None, help="At most this many sampled frames per video.")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None)
@click.option("--decoder", type=click.Choice(["auto", "pyav", "decord"]), default=None)
@click.option("--workers", type=int, default=None, help="Decode worker processes.")
@click.option("--timeout", type=float, default=None, help="Seconds per video before its worker is killed.")
@shard_option
@click.option("--retry-failed", is_flag=True, help="Retry videos that failed in an earlier run.")
@click.option("--prune", is_flag=True,
              help="Delete the frames and crops of videos extracted earlier that are no longer in INPUT.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@command
def extract(input_path, work, dataset, stride, max_frames, jpeg_quality, decoder, workers, timeout, shard,
            retry_failed, prune, quiet, config_file, overrides):
    """Decode every video of INPUT and keep every stride-th frame as JPEG under DIR/frames/."""
    from ..manifests.workspace import Shard, Workspace
    from ..stages.extract import run_extract
    cfg = make_config(config_file, overrides, **{
        "extract.stride": stride, "extract.max_frames": max_frames, "extract.jpeg_quality": jpeg_quality,
        "extract.decoder": decoder, "extract.workers": workers, "extract.timeout": timeout})
    found, summary = run_extract(Workspace(work), input_path, cfg, dataset=dataset, shard=Shard.parse(shard),
                                 retry_failed=retry_failed, prune=prune, progress=not quiet)
    click.echo(f"dataset layout: {found.layout} ({len(found.rows)} videos)")
    for note in found.notes:
        click.echo(f"  note: {note}")
    finish(summary)


@main.command()
@work_option
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--batch-size", type=int, default=None,
              help="Frames read per step; the ones due for full detection go to one detector call.")
@click.option("--detect-every", type=click.IntRange(min=1), default=None,
              help="Full detection on every Nth sampled frame (and on frames with no live track); tracked "
                   "faces are re-found on every frame.")
@click.option("--detect-max-side", type=int, default=None,
              help="Frames are shrunk to at most this many pixels on their long side for detection.")
@click.option("--min-face-size", type=int, default=None, help="Smallest face, in detection pixels.")
@click.option("--margin", type=float, default=None, help="Crop size relative to the tight face.")
@click.option("--max-faces", type=int, default=None, help="Keep only the N largest face tracks per video.")
@click.option("--min-track-len", type=int, default=None, help="Drop tracks shorter than this (sampled frames).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None)
@click.option("--pair-aware/--no-pair-aware", default=None,
              help="Crop fakes with their source video's tracks when the frames match [default: on].")
@shard_option
@click.option("--retry-failed", is_flag=True, help="Retry videos that failed in an earlier run.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@command
def align(work, device, batch_size, detect_every, detect_max_side, min_face_size, margin, max_faces,
          min_track_len, jpeg_quality, pair_aware, shard, retry_failed, quiet, config_file, overrides):
    """Detect, track and align faces in the extracted frames: HQ 224 and LQ 112 crops under DIR/faces/."""
    from ..manifests.workspace import Shard, Workspace, WorkspaceError
    from ..stages.align import run_align
    cfg = make_config(config_file, overrides, **{
        "align.device": device, "align.batch_size": batch_size, "align.detect_every": detect_every,
        "align.detect_max_side": detect_max_side,
        "align.min_face_size": min_face_size, "align.margin": margin, "align.max_faces": max_faces,
        "align.min_track_len": min_track_len, "align.jpeg_quality": jpeg_quality, "align.pair_aware": pair_aware})
    ws = Workspace(work)
    if not ws.manifest("frames.csv").exists():
        raise WorkspaceError(f"{ws.root}: no extracted frames; run `dfpipe extract INPUT --work {work}`")
    summary = run_align(ws, cfg, shard=Shard.parse(shard), retry_failed=retry_failed, progress=not quiet)
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
@click.option("--epochs", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--workers", type=int, default=None, help="DataLoader worker processes.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--hq-backbone", default=None,
              help="efficientnet-b0..b7 or any timm model name [default: tf_efficientnet_lite2].")
@click.option("--lq-backbone", default=None, help="[default: tf_efficientnet_lite0]")
@click.option("--pretrained-hq", metavar="imagenet|FILE", default=None,
              help="Starting weights of the HQ backbone: imagenet (found on this machine, see `dfpipe weights`; "
                   "nothing is ever downloaded) or a local weight file [default: imagenet].")
@click.option("--pretrained-lq", metavar="imagenet|FILE", default=None, help="The same for the LQ backbone.")
@click.option("--from-scratch", is_flag=True, default=None,
              help="Allow backbones without pretrained weights (model.pretrained_* null): random init.")
@click.option("--quiet", is_flag=True, help="No progress bars (the per-epoch lines stay).")
@config_options
@command
def train(work, run_dir, resume, epochs, batch_size, workers, device, hq_backbone, lq_backbone, pretrained_hq,
          pretrained_lq, from_scratch, quiet, config_file, overrides):
    """Build leak-free training pairs from the workspace and train the dual-stream detector.

    Runs on CPU or CUDA, single process or `torchrun --nproc_per_node N -m dfpipe.pipeline.cli train ...`.
    """
    from ..stages.run_folder import run_config
    from ..stages.train import run_train
    cfg = make_config(run_config(run_dir, config_file, resume), overrides, **{
        "train.epochs": epochs, "train.batch_size": batch_size, "train.workers": workers, "train.device": device,
        "model.hq_backbone": hq_backbone, "model.lq_backbone": lq_backbone, "model.pretrained_hq": pretrained_hq,
        "model.pretrained_lq": pretrained_lq, "train.from_scratch": from_scratch})
    result = run_train(work, run_dir, cfg, resume=resume, progress=not quiet)
    if result:
        click.echo("train: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in result.items() if not isinstance(v, dict)))


@main.command("score-video")
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="RUN_DIR/best.pt from `dfpipe train`.")
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
@click.option("--aggregate", type=click.Choice(["mean", "median", "max", "topk", "confident"]), default=None,
              help="Clip -> track rule [default: the one chosen on validation, stored in the checkpoint].")
@click.option("--threshold", type=float, default=None, help="Decision threshold [default: the checkpoint's].")
@click.option("--tta-flip/--no-tta-flip", default=None, help="Average each clip with its mirror image.")
@click.option("--clip-every", type=click.IntRange(min=1), default=None,
              help="Score every Nth clip of each face track: N times less model work, fewer clips per score "
                   "[default: 1, all].")
@click.option("--max-frames", type=int, default=None, help="Score at most this many sampled frames per video.")
@click.option("--fallback-score", type=float, default=None,
              help="Score given to videos that cannot be scored (default: none, the score stays empty).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--batch-size", type=int, default=None,
              help="Clips per model call [default: 16 on CUDA, 1 on CPU].")
@shard_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
@config_options
@command
def score_video(paths, checkpoint, out, labels, work, split, run_splits, aggregate, threshold, tta_flip, clip_every,
                max_frames, fallback_score, device, batch_size, shard, quiet, config_file, overrides):
    """Score raw videos (files, folders or a CSV list): one score per video, no files on disk but the results.

    Decodes, detects, tracks and aligns in memory with the settings the model was trained with, and reruns skip
    videos already in the output.
    """
    from ..manifests.workspace import Shard
    from ..stages.score import fixed_by_checkpoint
    from ..stages.score_store import run_score
    if not paths and not work:
        raise click.UsageError("give video files, folders or a CSV list, or --work DIR --split SPLIT")
    if bool(work) != bool(split):
        raise click.UsageError("--work and --split go together")
    if run_splits and not split:
        raise click.UsageError("--run-splits needs --work DIR --split SPLIT")
    cfg = make_config(config_file, overrides, **{
        "score.aggregate": aggregate, "score.threshold": threshold, "score.tta_flip": tta_flip,
        "score.clip_every": clip_every,
        "score.fallback_score": fallback_score, "score.device": device, "score.batch_size": batch_size,
        "extract.max_frames": max_frames})
    ignored = fixed_by_checkpoint(cfg)
    if ignored:  # from --set or --config alike
        click.echo(f"note: frames are sampled and faces cropped with the checkpoint's settings, as in training; "
                   f"ignoring {', '.join(ignored)}", err=True)
    summary = run_score(list(paths), checkpoint, cfg, out=out, labels=labels, work=work, split=split,
                        run_splits=run_splits, shard=Shard.parse(shard), progress=not quiet)
    click.echo(summary.line())
    sys.exit(summary.exit_code)


@main.command()
@click.argument("names", nargs=-1)
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


@main.command()
@work_option
@command
def status(work):
    """Per stage: how many videos are done, stale, failed, pending, or waiting for an earlier stage."""
    from ..manifests.units import count_states, load_params
    ws = existing_workspace(work)
    click.echo(f"{'stage':<10}{'done':>8}{'stale':>8}{'failed':>8}{'pending':>9}{'waiting':>9}")
    videos = None
    for name, spec, units_fn in _stages():
        params = load_params(ws, spec)
        units = units_fn(ws)
        videos = len(units) if videos is None else videos  # the first stage has a unit for every video
        counts = count_states(ws, spec, params, units) if params is not None else {"pending": len(units)}
        click.echo(f"{name:<10}{counts.get('done', 0):>8}{counts.get('stale', 0):>8}"
                   f"{counts.get('failed', 0):>8}{counts.get('pending', 0):>9}{videos - len(units):>9}")


@main.command()
@work_option
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
        for rel in report.missing[:20]:
            click.echo(f"  missing {rel}")
        for rel in report.changed[:20]:
            click.echo(f"  changed {rel}")
        bad |= not report.ok
    sys.exit(EXIT_FAILED_UNITS if bad else EXIT_OK)


if __name__ == "__main__":
    main()
