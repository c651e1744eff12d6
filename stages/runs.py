"""`dfpipe runs`: the training runs under some folders as one table, the settings two runs differ in, and a registry
of the best run of each dataset, which `score-video --checkpoint best` resolves.

A run is a folder with the run.json `train` writes before its first epoch; everything else is read from what train
leaves there (config.yaml, metrics.csv, best.pt), so runs made before this module are listed too. A run is
`finished` when best.pt holds the calibration of the best epoch and training ended (its epochs ran out, or early
stopping's patience did): what train itself checks before it calls a run done. Anything else is `interrupted`
(killed, or still running: the rerun of the same `dfpipe train` completes it).

The registry is REGISTRY beside the runs (in the promoted run's parent folder), one promoted run per dataset,
a dataset being the training pairs' digest (the `data` column): runs on other splits of the same videos are not
comparable by their val metrics.
"""
from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from ..manifests.errors import InputError
from ..manifests.progress import warn
from ..manifests.table import atomic_write_bytes

REGISTRY = "registry.json"
BEST = "best"  # `--checkpoint best` / `--checkpoint RUNS_DIR/best`
COLUMNS = ["run", "date", "data", "backbones", "epochs", "best_val_loss", "val_auc", "threshold", "status"]
# the metrics a table can be sorted by, best first: ascending or not
SORT = {"best_val_loss": True, "val_auc": False, "date": False, "epochs": False, "run": True}
DIGEST_SHOWN = 12


def _read_json(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError:
        raise InputError(f"{path}: not valid JSON") from None
    if not isinstance(info, dict):
        raise InputError(f"{path}: not a JSON object")
    return info


def run_config(folder: Path) -> dict:
    path = folder / "config.yaml"
    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot read the run's config ({e.strerror})") from None
    except yaml.YAMLError:
        raise InputError(f"{path}: not valid YAML") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("train"), dict):
        raise InputError(f"{path}: not a dfpipe run config (no train section)")
    return cfg


def find_runs(folders: list[str | Path]) -> list[Path]:
    """Each folder that is a run, and every run below the others."""
    found = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise InputError(f"{folder}: no such folder")
        found += [folder] if (folder / "run.json").is_file() else sorted(p.parent for p in folder.rglob("run.json"))
    return list(dict.fromkeys(found))


def calibration(folder: Path) -> tuple[int | None, dict | None]:
    """best.pt's epoch and calibration (None, None without one). Memory-mapped: the weights are not read."""
    from .checkpoint import load_checkpoint  # torch: only for runs that have a best.pt
    best = folder / "best.pt"
    if not best.is_file():
        return None, None
    ckpt = load_checkpoint(best)
    return ckpt.get("epoch"), ckpt.get("calibration")


def run_row(folder: Path) -> dict:
    info, cfg = _read_json(folder / "run.json"), run_config(folder)
    metrics = pd.read_csv(folder / "metrics.csv") if (folder / "metrics.csv").is_file() else pd.DataFrame()
    t = cfg["train"]
    best = int(metrics.val_loss.idxmin()) if len(metrics) and metrics.val_loss.notna().any() else None
    best_epoch, calibrated = calibration(folder)
    ended = len(metrics) >= t["epochs"] or (best is not None and len(metrics) - 1 - best >= t["early_stop_patience"])
    finished = ended and calibrated is not None and best is not None and best_epoch == metrics.epoch[best]
    model = cfg.get("model", {})
    return {"run": str(folder), "date": str(info.get("started", "")), "data": str(info.get("pairs_digest", "")),
            "backbones": f"{model.get('hq_backbone')} + {model.get('lq_backbone')}", "epochs": len(metrics),
            "best_val_loss": math.nan if best is None else float(metrics.val_loss[best]),
            "val_auc": math.nan if best is None else float(metrics.val_auc[best]),
            "threshold": math.nan if calibrated is None else float(calibrated["threshold"]),
            "status": "finished" if finished else "interrupted"}


def _readable_row(folder: Path) -> dict | None:
    """A run killed while writing its first files (run.json before config.yaml, a torn metrics.csv) is listed as
    unreadable on stderr, so one bad folder does not hide every other run."""
    try:
        return run_row(folder)
    except (InputError, OSError, ValueError, KeyError, pd.errors.ParserError) as e:  # EmptyDataError is a ValueError
        warn(f"runs: {folder}: skipped, unreadable ({' '.join(str(e).split())})")
        return None


def list_runs(folders: list[str | Path], sort: str = "best_val_loss") -> pd.DataFrame:
    """One row per run (COLUMNS), the best by ``sort`` first; runs without that metric last."""
    if sort not in SORT:
        raise InputError(f"runs: cannot sort by '{sort}' (one of {', '.join(SORT)})")
    table = pd.DataFrame([row for folder in find_runs(folders) if (row := _readable_row(folder))], columns=COLUMNS)
    return table.sort_values(sort, ascending=SORT[sort], na_position="last", kind="stable").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "no runs found (a run is a folder with the run.json that dfpipe train writes)"
    shown = table.assign(date=table.date.str[:16].str.replace("T", " "), data=table.data.str[:DIGEST_SHOWN])
    return shown.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4f}")


def _flat(tree: dict) -> dict:
    return pd.json_normalize(tree, sep=".").iloc[0].to_dict()


def differences(a: str | Path, b: str | Path) -> list[str]:
    """`key: A's value -> B's value` for every setting of the two runs' config.yaml that differs, and their data."""
    runs = [Path(a), Path(b)]
    for run in runs:
        if not (run / "run.json").is_file():
            raise InputError(f"{run}: not a run folder (no run.json)")
    left, right = (_flat(run_config(run)) for run in runs)
    lines = [f"{key}: {left.get(key, '(absent)')!r} -> {right.get(key, '(absent)')!r}"
             for key in sorted(left.keys() | right.keys()) if left.get(key) != right.get(key)]
    digests = [_read_json(run / "run.json").get("pairs_digest") for run in runs]
    if digests[0] != digests[1]:
        lines.append(f"data (training pairs digest): {digests[0]} -> {digests[1]}")
    return lines


def registry_path(folder: str | Path) -> Path:
    return Path(folder) / REGISTRY


def read_registry(path: Path) -> dict:
    return _read_json(path) if path.is_file() else {"best": {}}


def promote(run: str | Path) -> str:
    """Mark a finished run as the best of its dataset in the registry beside it; returns what changed."""
    run = Path(run)
    if not (run / "run.json").is_file():
        raise InputError(f"{run}: not a run folder (no run.json)")
    row = run_row(run)
    if row["status"] != "finished":
        raise InputError(f"{run}: the run is interrupted (no calibrated best.pt of a finished training): finish it "
                         "with the same dfpipe train command, or promote another")
    path = registry_path(run.resolve().parent)
    registry = read_registry(path)
    before = registry["best"].get(row["data"], {}).get("run")
    registry["best"][row["data"]] = {"run": run.resolve().name,
                                     "promoted": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    atomic_write_bytes(path, (json.dumps(registry, indent=1, sort_keys=True) + "\n").encode())
    was = f" (was {before})" if before and before != run.resolve().name else ""
    return f"{path}: {run.resolve().name} is the best run of data {row['data'][:DIGEST_SHOWN]}{was}"


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """``best`` or ``RUNS_DIR/best`` (when no such file exists) -> the promoted run's best.pt, from the registry
    in RUNS_DIR (the current folder for ``best``); any other path as it is."""
    path = Path(checkpoint)
    if path.name != BEST or path.exists():
        return path
    registry = registry_path(path.parent)
    if not registry.is_file():
        raise InputError(f"{checkpoint}: no such checkpoint, and no {REGISTRY} in {path.parent} to resolve it from "
                         "(promote a run with dfpipe runs --promote RUN)")
    promoted = read_registry(registry).get("best") or {}
    if len(promoted) != 1:
        named = ", ".join(f"{path.parent / e['run'] / 'best.pt'} (data {d[:DIGEST_SHOWN]})"
                          for d, e in sorted(promoted.items()))
        raise InputError(f"{registry}: {len(promoted)} datasets have a promoted run, so '{checkpoint}' names none "
                         f"of them: give the checkpoint's path{': ' + named if named else ''}")
    return path.parent / next(iter(promoted.values()))["run"] / "best.pt"
