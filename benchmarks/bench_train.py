"""Is training fed fast enough? Clips/s of the training step and of the data loader alone, default model.

    python benchmarks/bench_train.py [--steps 3] [--workers 2] [--threads N] [--device auto|cpu|cuda] [--batch B]
                                     [--skip-forward]

The step is `train_one_epoch` itself (default model, batch 2, T=10, amp auto: bf16 on a CPU with bf16
instructions, fp16 with loss scaling on CUDA; channels_last) on one batch repeated in memory; the
loader is `SequenceDataset` + `DataLoader` with the default augmentation over synthetic JPEG crops written to a
temporary folder. The loader should deliver at least 3x the clips the step consumes, or training waits for JPEG
decoding and augmentation. The fp32 vs bf16 + channels_last forward comparison is bench_model.py's, run afterwards.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from torchvision.io import write_jpeg
from torchvision.transforms.v2 import functional as F

from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config
from dfpipe.stages.dataset import SequenceDataset, collate_clips
from dfpipe.stages.distributed import Ranks
from dfpipe.stages.faces import resolve_device
from dfpipe.stages.inference import amp_dtype
from dfpipe.stages.train import make_criterion, make_optimizer, train_one_epoch

VIDEOS, FRAMES = 8, 30
LOADER_GOAL = 3.0


def write_crops(root: Path, hq_size: int, lq_size: int) -> tuple[pd.DataFrame, dict[str, int]]:
    """One track per video of smooth noise (JPEG-decoding cost of a real face crop, unlike a flat image)."""
    rng = np.random.default_rng(0)
    rows = []
    for v in range(VIDEOS):
        for frame in range(FRAMES):
            noise = torch.from_numpy(rng.integers(0, 256, (3, hq_size // 8, hq_size // 8), dtype=np.uint8))
            hq = F.resize(noise, [hq_size, hq_size], antialias=True)
            paths = {}
            for stream, image in (("hq", hq), ("lq", F.resize(hq, [lq_size, lq_size], antialias=True))):
                rel = f"faces/v{v}/{frame:06d}_{stream}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                write_jpeg(image, str(root / rel), quality=95)
                paths[f"{stream}_path"] = rel
            rows.append(dict(video_id=f"v{v}", frame_index=frame, status="face", track_id=0, **paths))
    return pd.DataFrame(rows), {f"v{v}": v % 2 for v in range(VIDEOS)}


def loader_rate(dataset: SequenceDataset, workers: int, clips: int, batch: int) -> float:
    """Steady-state clips/s: timed from the first batch, so worker start-up does not count."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate_clips)
    seen, start, epoch = 0, None, 0
    while seen < clips:
        dataset.set_epoch(epoch)
        for batch in loader:
            if start is None:
                start = time.perf_counter()
                continue
            seen += len(batch["label"])
        epoch += 1
    return seen / (time.perf_counter() - start)


def step_rate(cfg, batch: dict, steps: int, device: torch.device) -> float:
    """clips/s of full training steps (forward, backward, clipping, AdamW) after one warm-up step."""
    torch.manual_seed(0)
    model = DualStreamNet.from_config(cfg.model).to(device)
    ctx = Ranks(0, 1, device)
    optimizer = make_optimizer(model, **cfg.train)
    dtype = amp_dtype(cfg.train.amp, ctx.device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # as train does
    kwargs = dict(ctx=ctx, dtype=dtype, accumulate=1, grad_clip=cfg.train.grad_clip, desc="step", progress=False)
    criterion = make_criterion(**cfg.train)
    train_one_epoch(model, [batch], optimizer, None, scaler, criterion, steps=1, **kwargs)
    start = time.perf_counter()
    stats = train_one_epoch(model, [batch] * steps, optimizer, None, scaler, criterion, steps=steps, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return stats["clips"] / (time.perf_counter() - start)


def main() -> None:
    cfg = load_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps")
    parser.add_argument("--workers", type=int, default=cfg.train.workers, help="DataLoader worker processes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda, as train.device")
    parser.add_argument("--batch", type=int, default=2, help="clips per training step and per loader batch")
    parser.add_argument("--skip-forward", action="store_true", help="skip bench_model.py's forward comparison")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        faces, labels = write_crops(Path(tmp), cfg.align.hq_size, cfg.align.lq_size)
        dataset = SequenceDataset(tmp, faces, labels, train=True, seed=0, **cfg.dataset)
        loading = loader_rate(dataset, args.workers, clips=20 * args.batch, batch=args.batch)
        stepping = step_rate(cfg, collate_clips([dataset[i % len(dataset)] for i in range(args.batch)]), args.steps,
                             device)
    print(f"{cfg.model.hq_backbone}+{cfg.model.lq_backbone}, batch {args.batch}, T={cfg.dataset.clip_len}, "
          f"{device}, {amp_dtype(cfg.train.amp, device) or 'fp32'}, channels_last {cfg.model.channels_last}, "
          f"{args.threads} threads, {args.workers} loader workers")
    print(f"training step: {stepping:6.2f} clips/s ({args.batch / stepping:.1f} s per step)")
    print(f"data loader:   {loading:6.2f} clips/s = {loading / stepping:.1f}x the step "
          f"({'meets' if loading >= LOADER_GOAL * stepping else 'MISSES'} the {LOADER_GOAL:.0f}x goal)")
    if not args.skip_forward:
        import bench_model  # benchmarks/ is on sys.path when this file is run as a script
        bench_model.main()


if __name__ == "__main__":
    main()
