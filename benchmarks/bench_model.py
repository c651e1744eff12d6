"""Forward time of the default dual-stream net on this CPU: fp32 contiguous vs bf16 autocast + channels_last.

Run by hand (`python benchmarks/bench_model.py`); it backs the `model.channels_last` and `train.amp: auto` defaults.
Both variants share weights, so the ratio is the layout/precision effect alone.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config

BATCH, STEPS, REPEATS = 2, 10, 3


def seconds_per_forward(model: DualStreamNet, hq: torch.Tensor, lq: torch.Tensor, autocast) -> float:
    times = []
    with torch.inference_mode(), autocast:
        model(hq, lq)  # warm-up: oneDNN picks and caches kernels on the first call
        for _ in range(REPEATS):
            start = time.perf_counter()
            model(hq, lq)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    cfg = load_config()
    torch.manual_seed(0)
    reference = DualStreamNet.from_config(dict(cfg.model, channels_last=False)).eval()
    fast = DualStreamNet.from_config(dict(cfg.model, channels_last=True)).eval()
    fast.load_state_dict(reference.state_dict())
    hq = torch.rand(BATCH, STEPS, 3, cfg.align.hq_size, cfg.align.hq_size)
    lq = torch.rand(BATCH, STEPS, 3, cfg.align.lq_size, cfg.align.lq_size)

    fp32 = seconds_per_forward(reference, hq, lq, contextlib.nullcontext())
    bf16 = seconds_per_forward(fast, hq, lq, torch.autocast("cpu", dtype=torch.bfloat16))
    print(f"{cfg.model.hq_backbone}+{cfg.model.lq_backbone}, batch {BATCH}, T={STEPS}, "
          f"{torch.get_num_threads()} threads, median of {REPEATS}")
    print(f"fp32, default layout:         {fp32:.3f} s/forward")
    print(f"bf16 autocast, channels_last: {bf16:.3f} s/forward")
    print(f"speed-up: {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
