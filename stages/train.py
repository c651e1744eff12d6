"""`dfpipe train`: aligned face crops of a workspace -> a calibrated dual-stream detector in RUN_DIR.

``run_train`` reads top to bottom like nanoGPT's train.py: pairs and splits, data, model and optimiser, the epoch
loop (train, validate, log, checkpoint, early stop), then calibration of the best checkpoint. The helpers above it
each do one step. It runs alone or under ``torchrun`` (DDP, one process per GPU or CPU rank); only rank 0 writes.

Everything a resumed run needs is in ``last.pt``: weights, optimiser, scheduler, grad scaler, every rank's RNG
states, the early-stopping state and the metrics history. Data order and augmentation depend only on (seed, epoch,
item), so in deterministic mode a run killed after epoch k and resumed writes the same metrics.csv as one that
never stopped. Checkpoints hold only tensors and plain Python values, so they load with ``weights_only=True``.
"""
from __future__ import annotations

import logging
import math
import os
import random
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..manifests.progress import bar, say
from ..manifests.table import check_writable, read_table, write_table
from ..manifests.workspace import Workspace
from ..models import peft
from ..models.dual_stream import DualStreamNet
from ..models.pretrained import IMAGENET, require_imagenet
from ..pipeline import __version__
from . import align_units, extract
from . import pairs as pairs_mod
from .calibration import calibrate
from .checkpoint import Trained, load_checkpoint, restore_best, rng_state, save_checkpoint, set_rng_state
from .dataset import SequenceDataset
from .distributed import Ranks, any_rank, from_main, gather, init_distributed, sync_buffers, wrap
from .evaluate import binary_metrics
from .inference import amp_dtype
from .optim import make_criterion, make_optimizer, make_scheduler
from .run_folder import RESUMABLE, WHERE_IT_RUNS, RunPaths, changed_settings, write_run_files
from .train_data import (TrainError, align_params, batch_inputs, eval_loader, extract_settings, faces_table,
                         make_loaders, require_file, split_labels, update_pairs)

log = logging.getLogger(__name__)

VAL_METRICS = ("loss", "accuracy", "auc", "ap", "precision", "recall", "f1", "eer")
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", *(f"val_{k}" for k in VAL_METRICS), "lr_backbone", "lr_head"]


@contextmanager
def deterministic_mode(enabled: bool):
    """Deterministic kernels for the run only: the setting is process-global and must not leak to the caller."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by deterministic cuBLAS
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


# ---------------------------------------------------------------- one epoch

def train_one_epoch(net, loader, optimizer, scheduler, scaler, criterion, *, ctx: Ranks, dtype, steps: int,
                    accumulate: int, grad_clip: float, desc: str, progress: bool) -> dict:
    """One pass of ``steps`` batches; the optimiser steps every ``accumulate`` batches (and at the end).

    Returns the mean loss and accuracy over all ranks' clips, their number, and the learning rates of the last
    update. ``scheduler`` is stepped per update, or None for the per-epoch plateau schedule.
    """
    net.train()
    loss_sum, correct, count = 0.0, 0, 0
    has_grad = False
    last = None
    lrs = [g["lr"] for g in optimizer.param_groups]
    batches = bar(islice(loader, steps), total=steps, desc=desc, unit="batch", leave=False, enabled=progress)
    for i, batch in enumerate(batches):
        update = (i + 1) % accumulate == 0 or i + 1 == steps
        weight = 1.0
        if update and ctx.world > 1 and any_rank(batch is None and last is None, ctx):
            # a rank has nothing to join the update's all-reduce with (see below; no batch of this epoch read yet):
            # every rank drops this update, so that none waits for it and the weights stay the same everywhere
            optimizer.zero_grad(set_to_none=True)
            has_grad = False
            if scheduler is not None:
                scheduler.step()
            continue
        if batch is None and update and ctx.world > 1 and last is not None:
            # None: no clip of the batch could be read (the dataset logged which). Under DDP every rank must still
            # join the update's gradient all-reduce, or the others wait for it forever and the weights part ways:
            # this rank runs its last batch again with weight 0.
            batch, weight = last, 0.0
        if batch is not None:
            last = batch
            hq, lq, y = batch_inputs(batch, ctx.device)
            # Under DDP, gradients are all-reduced only on the batch that completes an update.
            sync = nullcontext() if update or ctx.world == 1 else net.no_sync()
            with sync:
                with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
                    logits = net(hq, lq).float()
                loss = criterion(logits, y)
                group = min(accumulate, steps - i // accumulate * accumulate)  # the epoch's last may be short
                scaler.scale(loss * weight / group).backward()
            has_grad = True
            if weight:
                loss_sum += loss.item() * len(y)
                correct += int(((logits > 0) == (y > 0.5)).sum())
                count += len(y)
                batches.set_postfix(loss=f"{loss_sum / count:.4f}")
        if update and has_grad:
            lrs = [g["lr"] for g in optimizer.param_groups]
            scaler.unscale_(optimizer)
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            has_grad = False
        if update and scheduler is not None:
            scheduler.step()
    if ctx.world > 1:
        totals = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=ctx.device)
        dist.all_reduce(totals)
        loss_sum, correct, count = totals.tolist()
    return {"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1), "clips": int(count), "lr": lrs}


@torch.no_grad()
def predict(model: DualStreamNet, loader: DataLoader, *, ctx: Ranks, dtype, progress: bool) -> pd.DataFrame:
    """Logit of every val clip of every rank, one row per clip, in a fixed order (video, track, start)."""
    model.eval()
    rows = []
    for batch in bar(loader, desc="val", unit="batch", leave=False, enabled=progress):
        if batch is None:
            continue
        hq, lq, y = batch_inputs(batch, ctx.device)
        with torch.autocast(ctx.device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(hq, lq).float()
        rows.append(pd.DataFrame({"video_id": batch["video_id"], "track_id": batch["track_id"].tolist(),
                                  "start": batch["start"].tolist(), "label": y.long().tolist(),
                                  "logit": logits.cpu().double().numpy()}))
    shards = [df for df in gather(pd.concat(rows) if rows else None, ctx) if df is not None]
    if not shards:
        raise TrainError("validation: no val clip could be read (see the warnings above)")
    return pd.concat(shards).sort_values(["video_id", "track_id", "start"], kind="stable").reset_index(drop=True)


def val_metrics(pred: pd.DataFrame) -> dict:
    """The loss is class-balanced (each class's mean BCE, averaged): FF++ has 4 fakes per real, and a plain mean
    would pick the best epoch and the patience mostly by the fakes, while training sees the classes evenly.
    NaN for an epoch whose val logits diverged (possible under fp16): early stopping counts it as no improvement
    and the run goes on from the best epoch, rather than ending in an error."""
    logits = torch.tensor(pred.logit.to_numpy())
    if not torch.isfinite(logits).all():
        return dict.fromkeys(VAL_METRICS, math.nan)
    labels = torch.tensor(pred.label.to_numpy(), dtype=torch.float64)
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    loss = torch.stack([losses[labels == c].mean() for c in (0.0, 1.0) if (labels == c).any()]).mean()
    metrics = binary_metrics(pred.label, torch.sigmoid(logits).numpy(), threshold=0.5)
    return {"loss": loss.item(), **metrics}


def tensorboard(run_dir: Path, ctx: Ranks):
    """A SummaryWriter when the optional tensorboard package is installed (rank 0 only), else None."""
    if not ctx.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


# ---------------------------------------------------------------- the run

def run_train(ws_root: str | Path, run_dir: str | Path, cfg, *, resume: bool, progress: bool = True) -> dict:
    """Train, checkpoint and calibrate; returns the best epoch, its val metrics and the calibration (on rank 0;
    the other ranks of a DDP run return an empty dict, so the caller prints one summary)."""
    ctx = init_distributed(cfg.train.device)
    try:
        with deterministic_mode(cfg.train.deterministic), ExitStack() as locks:
            return _run(Workspace(ws_root), Path(run_dir), cfg, resume, ctx, bars=progress and ctx.main, locks=locks)
    finally:
        if ctx.world > 1:
            dist.destroy_process_group()


def check_initial_weights(model_cfg, from_scratch: bool) -> None:
    """Before any work: a detector fine-tuned from random backbones on a few hundred videos does not detect (see
    the README's quality benchmark), so that takes asking for; and `imagenet` must resolve on this machine."""
    for stream in ("hq", "lq"):
        setting, backbone = f"model.pretrained_{stream}", model_cfg[f"{stream}_backbone"]
        if model_cfg[setting.split(".")[1]] is None and not from_scratch:
            raise TrainError(f"{setting} is null: the {stream.upper()} backbone {backbone} would start from random "
                             "weights; use imagenet (see `dfpipe weights`) or a weight file, or pass --from-scratch")
        if model_cfg[setting.split(".")[1]] == IMAGENET:
            require_imagenet(backbone, setting)


def _run(ws: Workspace, run_dir: Path, cfg, resume: bool, ctx: Ranks, bars: bool, locks: ExitStack) -> dict:
    """prepare the data, build the model, restore an earlier run's state, fit, calibrate."""
    t = cfg.train
    paths = RunPaths(run_dir)
    if t.epochs < 1:
        raise TrainError(f"train.epochs must be at least 1, got {t.epochs}")
    check_initial_weights(cfg.model, t.from_scratch)
    if resume and not paths.last.is_file():
        raise TrainError(f"{paths.last}: nothing to resume (no last.pt in the run folder)")
    # The same command again on a run it started continues that run (or finds it finished), like every stage's
    # rerun; --resume is for continuing it with other epochs or patience.
    rerun = not resume and paths.last.exists()
    random.seed(t.seed)
    np.random.seed(t.seed)
    data = prepare(ws, cfg, ctx, locks)
    state = build(cfg, ctx, data)
    if resume or rerun:
        calibration = restore(state, paths, cfg, ctx, data.digest, resume=resume)
        if calibration is not None:  # finished and calibrated: nothing to do
            if not ctx.main:
                return {}
            say(f"train: {run_dir} already holds this run, finished at epoch {state.start_epoch} and "
                "calibrated: nothing to do")
            return _summary(state, calibration, paths, t)
    if ctx.main:
        check_writable(run_dir)
        write_run_files(run_dir, cfg, data.pairs, ctx, resume or rerun, state.model.initial_weights,
                        parameters=peft.count(state.model))
        announce(state, data, cfg, ctx)
    fit(state, data, cfg, ctx, paths, bars)
    calibration = calibrate_best(state, data, ws, cfg, ctx, paths, bars)
    return _summary(state, calibration, paths, t) if ctx.main else {}


@dataclass
class Data:
    """What the run trains and validates on, decided once (by rank 0, shared with every rank)."""
    faces: pd.DataFrame
    pairs: pd.DataFrame
    digest: str
    labels: dict[str, dict[str, int]]
    crops: dict            # align's settings: score-video crops as training did
    extracted: dict        # extract's: score-video samples frames as training did
    train_loader: DataLoader
    val_loader: DataLoader
    steps: int             # batches per epoch


@dataclass
class State:
    """The model and everything an epoch changes; `last.pt` holds it all."""
    model: DualStreamNet
    optimizer: torch.optim.Optimizer
    scheduler: object
    per_update: bool       # the scheduler steps per optimiser update (else once per epoch, on the val loss)
    criterion: object
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler
    early: dict = field(default_factory=lambda: {"best_loss": math.inf, "best_epoch": -1, "bad_epochs": 0})
    history: list[dict] = field(default_factory=list)
    start_epoch: int = 0


def prepare(ws: Workspace, cfg, ctx: Ranks, locks: ExitStack) -> Data:
    """Pairs, splits and labels (rank 0 decides and writes; every rank gets its table), then the loaders."""
    extracted = extract_settings(ws)
    videos = read_table(require_file(ws.manifest("videos.csv"), "run dfpipe extract first"), extract.VIDEO_COLUMNS)
    if ctx.main:  # align must not rewrite the crops under training
        locks.enter_context(ws.reading(align_units.SPEC.name, "train"))
    faces = from_main(faces_table(ws) if ctx.main else None, ctx)
    pairs = from_main(update_pairs(ws, videos, faces, cfg.pairs) if ctx.main else None, ctx)
    labels = split_labels(pairs, videos)
    sources = {f: r for f, r in zip(pairs.fake_id, pairs.real_id) if f in labels["train"] and r in labels["train"]}
    crops = align_params(ws, cfg)
    train_loader, val_loader = make_loaders(ws.root, faces, labels, sources, cfg, ctx, crops["margin"])
    steps = min(len(train_loader), cfg.train.steps_per_epoch or len(train_loader))
    return Data(faces, pairs, pairs_mod.pairs_digest(pairs), labels, crops, extracted, train_loader, val_loader,
                steps)


def build(cfg, ctx: Ranks, data: Data) -> State:
    """Model, optimiser, schedule, loss and mixed precision, the same on every rank."""
    t = cfg.train
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = DualStreamNet.from_config(cfg.model)
    if t.peft != "none":
        peft.apply(model, t.peft, t.peft_rank)
    model = model.to(ctx.device)
    optimizer = make_optimizer(model, **t)
    scheduler, per_update = make_scheduler(optimizer, math.ceil(data.steps / t.accumulate), **t)
    dtype = amp_dtype(t.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=dtype == torch.float16)
    torch.manual_seed(t.seed + ctx.rank)  # different dropout per rank
    return State(model, optimizer, scheduler, per_update, make_criterion(**t), dtype, scaler)


def restore(state: State, paths: RunPaths, cfg, ctx: Ranks, digest: str, *, resume: bool) -> dict | None:
    """Continue from last.pt, refusing what would make its epochs incomparable. Returns the calibration when the
    run is already finished and calibrated (nothing to do), else None."""
    t = cfg.train
    ckpt = load_checkpoint(paths.last)
    if ckpt["pairs_digest"] != digest:
        raise TrainError(f"{paths.last}: the training pairs changed since this run started; start a new run")
    changed = changed_settings(ckpt["config"], cfg.to_dict(), RESUMABLE if resume else WHERE_IT_RUNS)
    if changed and not resume:
        raise TrainError(f"{paths.folder}: already holds a run with other settings ({'; '.join(changed)}); choose "
                         f"another --run folder, or continue this one with --resume (only "
                         f"{', '.join(sorted(RESUMABLE))} may change)")
    if changed:
        raise TrainError(f"{paths.last}: a resumed run keeps its settings (only {', '.join(sorted(RESUMABLE))} "
                         f"may change); these differ: {'; '.join(changed)}")
    if state.per_update and ckpt["config"]["train"]["epochs"] != t.epochs:
        raise TrainError(f"{paths.last}: the {t.scheduler} schedule was planned for "
                         f"{ckpt['config']['train']['epochs']} epochs; resume with the same train.epochs")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.scheduler.load_state_dict(ckpt["scheduler"])
    if state.scaler.is_enabled() and ckpt["scaler"]:  # a run resumed on another device may change precision
        state.scaler.load_state_dict(ckpt["scaler"])
    state.early, state.history, state.start_epoch = ckpt["early_stop"], ckpt["history"], ckpt["epoch"]
    if not resume and _finished(state.early, state.start_epoch, t):
        best = load_checkpoint(paths.best) if paths.best.is_file() else {}
        # The calibration is written last (a run killed before it gets it now), and a best.pt of another epoch
        # is one `restore_best` replaces.
        if best.get("calibration") is not None and best["epoch"] == state.early["best_epoch"]:
            return best["calibration"]
    if ctx.main:
        restore_best(ckpt, paths.best)
    if len(ckpt["rng"]) == ctx.world:
        set_rng_state(ckpt["rng"][ctx.rank], ctx.device)
    else:
        log.warning("%s: saved by %d ranks, resumed on %d: RNG streams restart", paths.last, len(ckpt["rng"]),
                    ctx.world)
    return None


def announce(state: State, data: Data, cfg, ctx: Ranks) -> None:
    t = cfg.train
    plan = (f"no epoch left to run (finished at epoch {state.start_epoch}): recalibrating best.pt"
            if _finished(state.early, state.start_epoch, t) else f"epochs {state.start_epoch + 1}-{t.epochs}")
    say(f"train: {data.train_loader.dataset.stats['clips']} train clips, {len(data.val_loader.dataset)} val "
        f"clips, {data.steps} batches/epoch x {ctx.world} rank(s) on {ctx.device}, {plan}")
    for stream, weights in state.model.initial_weights.items():
        say(f"train: {stream.upper()} backbone {cfg.model[f'{stream}_backbone']} starts from {weights}")
    params = peft.count(state.model)
    say(f"train: {params['trainable']:,} of {params['total']:,} parameters train"
        + (f" (train.peft {t.peft}, rank {t.peft_rank})" if state.model.peft else ""))


def fit(state: State, data: Data, cfg, ctx: Ranks, paths: RunPaths, bars: bool) -> None:
    """The epochs: train, validate, log, checkpoint (last.pt every epoch, best.pt when it improved), stop early."""
    t, model, early, history = cfg.train, state.model, state.early, state.history
    meta = Trained(config=cfg.to_dict(), model_config=cfg.model.to_dict(), extract=data.extracted, align=data.crops,
                   clip_len=cfg.dataset.clip_len, pairs_digest=data.digest, dfpipe_version=__version__,
                   peft=model.peft).state()
    writer = tensorboard(paths.folder, ctx)
    net = None
    for epoch in range(state.start_epoch, t.epochs):
        if early["bad_epochs"] >= t.early_stop_patience:
            break  # resumed a run that had already stopped
        frozen = epoch < t.freeze_backbone_epochs
        if net is None or frozen != model.backbones_frozen:
            model.freeze_backbones(frozen, keep_bn_stats=t.freeze_bn)
            net = wrap(model, ctx)
        data.train_loader.sampler.set_epoch(epoch)
        data.train_loader.dataset.set_epoch(epoch)
        started = time.perf_counter()
        train = train_one_epoch(net, data.train_loader, state.optimizer,
                                state.scheduler if state.per_update else None, state.scaler, state.criterion,
                                ctx=ctx, dtype=state.dtype, steps=data.steps, accumulate=t.accumulate,
                                grad_clip=t.grad_clip, progress=bars,
                                desc=f"epoch {epoch + 1}/{t.epochs}" + (" (frozen)" if frozen else ""))
        seconds = time.perf_counter() - started
        sync_buffers(model, ctx)
        val = val_metrics(predict(model, data.val_loader, ctx=ctx, dtype=state.dtype, progress=bars))
        lrs = train["lr"]
        if not state.per_update:
            state.scheduler.step(val["loss"])
        improved = val["loss"] < early["best_loss"]
        if improved:
            early.update(best_loss=val["loss"], best_epoch=epoch + 1, bad_epochs=0)
        else:
            early["bad_epochs"] += 1
        history.append({"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"],
                        **{f"val_{k}": val[k] for k in VAL_METRICS},
                        "lr_backbone": lrs[0], "lr_head": lrs[1]})
        rngs = gather(rng_state(ctx.device), ctx)
        if ctx.main:
            write_table(paths.folder / "metrics.csv", history, METRIC_COLUMNS)
            if writer is not None:
                for key, value in history[-1].items():
                    if key != "epoch":
                        writer.add_scalar(key, value, epoch + 1)
                writer.flush()
            saved = {**meta, "model": model.state_dict(), "epoch": epoch + 1, "early_stop": dict(early),
                     "history": history}
            save_checkpoint(paths.last, {**saved, "optimizer": state.optimizer.state_dict(), "scheduler":
                                         state.scheduler.state_dict(), "scaler": state.scaler.state_dict(),
                                         "rng": rngs})
            if improved:  # after last.pt, which can stand in for it (see `restore_best`)
                save_checkpoint(paths.best, saved)
            say(f"epoch {epoch + 1}/{t.epochs}  train loss {train['loss']:.4f} acc {train['acc']:.3f}  "
                f"val loss {val['loss']:.4f} acc {val['accuracy']:.3f} auc {val['auc']:.3f} "
                f"eer {val['eer']:.3f}  lr {lrs[0]:.2e}/{lrs[1]:.2e}  "
                f"{train['clips'] / seconds:.1f} clips/s{'  *best' if improved else ''}")
        if early["bad_epochs"] >= t.early_stop_patience:
            if ctx.main:
                say(f"early stop: val loss has not improved for {t.early_stop_patience} epochs")
            break
    if writer is not None:
        writer.close()


def calibrate_best(state: State, data: Data, ws: Workspace, cfg, ctx: Ranks, paths: RunPaths, bars: bool) -> dict:
    """Calibrate the best epoch on the clips score-video will cut from the val videos; written into best.pt."""
    if ctx.world > 1:
        dist.barrier()  # best.pt is complete before other ranks read it
    if not paths.best.is_file():
        raise TrainError(f"{paths.folder}: no epoch reached a finite val loss, so there is no best.pt to calibrate")
    best = load_checkpoint(paths.best)
    state.model.load_state_dict(best["model"])
    clips = SequenceDataset(ws.root, data.faces, data.labels["val"], train=False, seed=cfg.train.seed,
                            crop_margin=data.crops["margin"],
                            **{**cfg.dataset, "scoring_every": cfg.score.clip_every,
                               "short_tracks": "pad"})  # score-video pads short tracks
    pred = predict(state.model, eval_loader(clips, cfg, ctx, persistent=False), ctx=ctx, dtype=state.dtype,
                   progress=bars)
    calibration = calibrate(pred, cfg.score)
    if ctx.main:
        save_checkpoint(paths.best, {**best, "calibration": calibration})
        say(f"best epoch {state.early['best_epoch']} (val loss {state.early['best_loss']:.4f}); calibration: "
            f"temperature {calibration['temperature']:.3f}, threshold {calibration['threshold']:.3f}, "
            f"aggregate {calibration['aggregate']}")
    return calibration


def _finished(early: dict, epoch: int, t) -> bool:
    return epoch >= t.epochs or early["bad_epochs"] >= t.early_stop_patience


def _summary(state: State, calibration: dict, paths: RunPaths, t) -> dict:
    early = state.early
    return {"initial_weights": ", ".join(f"{k} {v.split(':')[0]}" for k, v in state.model.initial_weights.items()),
            "best_epoch": early["best_epoch"], "best_val_loss": early["best_loss"], "epochs_run": len(state.history),
            "stopped_early": early["bad_epochs"] >= t.early_stop_patience, "calibration": calibration,
            "val": state.history[early["best_epoch"] - 1], "best": str(paths.best), "last": str(paths.last)}
