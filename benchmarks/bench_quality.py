"""Does the detector detect? Four training recipes at one budget, scored on videos none of them saw.

Arms, each trained on FF++ c40 of ../shared/data (its reals, and its fakes where the arm uses them) with the same
clips, steps, schedule and splits:
  random     random init, the dataset's fakes                    (what dfpipe trained before ImageNet weights)
  imagenet   ImageNet init, the dataset's fakes
  sbi_reals  ImageNet init, self-blended fakes made from the reals only (the dataset's fakes unseen in training)
  default    the default recipe: ImageNet init, self-blended fakes and the dataset's fakes (dataset.sbi_fraction)
Validation, early stopping and calibration use the FF++ val split's real videos and real fakes in every arm.
Each checkpoint is then scored with `dfpipe score-video` on the other folders (wild_pairs, dfdc_sample, reals,
multiface: 20 real, 8 fake) and on the FF++ identity group held out of training (`--split test`), and the table
gives video AUC, AP and log loss per arm and test set. Videos where no face is found are left out of the metrics
(their count is printed).

Usage: python benchmarks/bench_quality.py [--out DIR] [--arms default,random,...] [--epochs 16] [--steps N]
                                          [--max-frames 40] [--score-frames 45] [--data ../shared/data]
`--out DIR` keeps the workspace and each arm's run folder (DIR/<arm>/best.pt) to score again; a rerun reuses
finished work (the stages are resumable). The budget defaults fit 2 CPU cores in about 45 minutes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dfpipe.pipeline.cli"]
OTHER = ("wild_pairs", "dfdc_sample", "reals", "multiface")
ARMS = {
    "random": {"model": {"pretrained_hq": None, "pretrained_lq": None},
               "dataset": {"synthesize": "none"},
               "train": {"from_scratch": True, "freeze_backbone_epochs": 0, "freeze_bn": False}},
    "imagenet": {"dataset": {"synthesize": "none"}},
    "sbi_reals": {"dataset": {"synthesize": "sbi", "sbi_fraction": 1.0}},
    "default": {},
}
# Fine-tuning variants of the default recipe, run with --arms (not in the default set, to keep to the time budget):
VARIANTS = {
    "default_bn_train": {"train": {"freeze_bn": False}},          # BatchNorm statistics follow the face batches
    "default_no_head_first": {"train": {"freeze_backbone_epochs": 0}},  # backbones train from the first step
    "default_lr_backbone_3e-4": {"train": {"lr_backbone": 3e-4}},
}


def budget(args) -> dict:
    """What every arm shares: clip length, batch, steps, schedule, splits (one identity group held out)."""
    return {"pairs": {"seed": 0, "val_fraction": 0.2, "test_fraction": 0.2},
            "dataset": {"clip_len": args.clip_len},
            "train": {"epochs": args.epochs, "steps_per_epoch": args.steps, "batch_size": args.batch_size,
                      "workers": 0, "early_stop_patience": args.epochs, "scheduler": "cosine", "warmup_epochs": 0}}


def merge(base: dict, extra: dict) -> dict:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def dfpipe(*args, log: Path) -> None:
    started = time.perf_counter()
    with open(log, "a") as out:
        out.write(f"\n$ dfpipe {' '.join(map(str, args))}\n")
        out.flush()
        proc = subprocess.run([*CLI, *map(str, args)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    print(f"  dfpipe {args[0]} {args[1] if len(args) > 1 else ''}: exit {proc.returncode}, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    if proc.returncode not in (0, 1):  # 1: some videos failed (no face, ...): their rows say why
        sys.exit(f"dfpipe {args[0]} failed (exit {proc.returncode}); see {log}")


def labels_csv(data: Path, path: Path) -> Path:
    """path,label for the other folders: real/ and fake/ in wild_pairs, DFDC's metadata.json, the rest real."""
    rows = []
    for folder in OTHER:
        meta = data / folder / "metadata.json"
        labels = {k: v["label"].lower() for k, v in json.loads(meta.read_text()).items()} if meta.is_file() else {}
        for video in sorted((data / folder).rglob("*.mp4")):
            label = labels.get(video.name) or ("fake" if video.parent.name == "fake" else "real")
            rows.append(f"{video},{label}")
    path.write_text("path,label\n" + "\n".join(rows) + "\n")
    return path


def video_metrics(metrics_path: Path) -> dict:
    metrics = json.loads(metrics_path.read_text())
    video = metrics.get("video") or {}
    return {"auc": video.get("auc"), "ap": video.get("ap"), "log_loss": video.get("log_loss"),
            "n": metrics["labelled"] - metrics["unscored"], "unscored": metrics["unscored"]}


def train_losses(metrics_csv: Path) -> tuple[float, float]:
    """The first and last epoch's training loss: whether the arm learnt its training task at all at this budget."""
    with open(metrics_csv) as f:
        rows = list(csv.DictReader(f))
    return float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])


def machine() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")),
                 platform.processor())
    bf16 = "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else "no bf16"
    return f"{model}, {os.cpu_count()} cores, {bf16}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--epochs", type=int, default=16,
                    help="Each epoch draws every training segment once (36 clips of FF++ c40 with self-blending).")
    ap.add_argument("--steps", type=int, default=None, help="Cap on training steps per epoch (default: no cap).")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--clip-len", type=int, default=4)
    ap.add_argument("--max-frames", type=int, default=40, help="Sampled frames per training video.")
    ap.add_argument("--score-frames", type=int, default=45, help="Sampled frames per scored video.")
    args = ap.parse_args()
    if not (args.data / "ffpp_c40").is_dir():
        print(f"skipped: no real data at {args.data}")
        return
    recipes = {**ARMS, **VARIANTS}
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in recipes]
    if unknown:
        sys.exit(f"unknown arm(s) {', '.join(unknown)}: choose from {', '.join(recipes)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_quality_"))
    out.mkdir(parents=True, exist_ok=True)
    ws, log = out / "ws", out / "log.txt"
    print(f"machine: {machine()}; logs in {log}", flush=True)
    started = time.perf_counter()
    dfpipe("extract", args.data / "ffpp_c40", "--work", ws, "--dataset", "ffpp", "--max-frames", args.max_frames,
           "--quiet", log=log)
    dfpipe("align", "--work", ws, "--quiet", log=log)
    labels = labels_csv(args.data, out / "other_labels.csv")
    results = {}
    for arm in arms:
        run = out / arm
        run.mkdir(exist_ok=True)
        config = run.parent / f"{arm}.yaml"
        config.write_text(yaml.safe_dump(merge(budget(args), recipes[arm]), sort_keys=False))
        arm_started = time.perf_counter()
        dfpipe("train", "--work", ws, "--run", run, "--config", config, "--quiet", log=log)
        checkpoint = run / "best.pt"
        dfpipe("score-video", *(args.data / f for f in OTHER), "--checkpoint", checkpoint, "--labels", labels,
               "--max-frames", args.score_frames, "--out", run / "other.csv", "--quiet", log=log)
        dfpipe("score-video", "--work", ws, "--split", "test", "--checkpoint", checkpoint,
               "--max-frames", args.score_frames, "--out", run / "heldout.csv", "--quiet", log=log)
        results[arm] = {name: video_metrics(run / f"{name}_metrics.json") for name in ("other", "heldout")}
        results[arm]["minutes"] = (time.perf_counter() - arm_started) / 60
        results[arm]["train_loss"] = train_losses(run / "metrics.csv")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    per_epoch = "one pass over the training segments" + (f", at most {args.steps} steps" if args.steps else "")
    print(f"\n{machine()}; {args.epochs} epochs ({per_epoch}) of {args.batch_size} clips of {args.clip_len} "
          f"frames; {(time.perf_counter() - started) / 60:.1f} min in all")
    print(f"{'arm':<10} {'test set':<9} {'videos':>6} {'AUC':>6} {'AP':>6} {'logloss':>8} {'min':>5}  train loss")
    for arm, res in results.items():
        for name in ("other", "heldout"):
            m = res[name]
            cells = [f"{m[k]:.3f}" if m[k] is not None else "-" for k in ("auc", "ap", "log_loss")]
            print(f"{arm:<10} {name:<9} {m['n']:>6} {cells[0]:>6} {cells[1]:>6} {cells[2]:>8} "
                  f"{res['minutes']:>5.1f}  {res['train_loss'][0]:.3f} -> {res['train_loss'][1]:.3f}"
                  + (f"  ({m['unscored']} without a face)" if m["unscored"] else ""))


if __name__ == "__main__":
    main()
