"""Forward time of the default dual-stream net on this CPU: fp32 contiguous vs bf16 autocast + channels_last.

Run by hand (`python benchmarks/bench_model.py`); it backs the `model.channels_last` and `train.amp: auto` defaults.
Both variants share weights, so the ratio is the layout/precision effect alone. CPU time is printed next to wall
time because the cores are often shared, which inflates wall time but barely changes CPU seconds.
"""
from __future__ import annotations

import contextlib
import statistics
import time

import torch

from dfpipe.models.dual_stream import DualStreamNet
from dfpipe.pipeline.config import load_config

BATCH, STEPS, REPEATS = 2, 10, 3


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def timed_forward(model: DualStreamNet, hq: torch.Tensor, lq: torch.Tensor, autocast) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward."""
    with torch.inference_mode(), autocast:
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        model(hq, lq)
        return time.perf_counter() - start_wall, time.process_time() - start_cpu


def main() -> None:
    cfg = load_config()
    torch.manual_seed(0)
    reference = DualStreamNet.from_config(dict(cfg.model, channels_last=False)).eval()
    fast = DualStreamNet.from_config(dict(cfg.model, channels_last=True)).eval()
    fast.load_state_dict(reference.state_dict())
    hq = torch.rand(BATCH, STEPS, 3, cfg.align.hq_size, cfg.align.hq_size)
    lq = torch.rand(BATCH, STEPS, 3, cfg.align.lq_size, cfg.align.lq_size)

    variants = {"fp32": (reference, contextlib.nullcontext), "bf16": (fast, bf16_autocast)}
    runs = {name: [] for name in variants}
    for repeat in range(REPEATS + 1):  # the first round is warm-up: oneDNN builds and caches its kernels
        # Interleaved so that load from other processes drifts over both variants alike.
        for name, (model, autocast) in variants.items():
            result = timed_forward(model, hq, lq, autocast())
            if repeat:
                runs[name].append(result)
    fp32, bf16 = ([statistics.median(column) for column in zip(*runs[name])] for name in variants)
    print(f"{cfg.model.hq_backbone}+{cfg.model.lq_backbone}, batch {BATCH}, T={STEPS}, "
          f"{torch.get_num_threads()} threads, median of {REPEATS}")
    print(f"fp32, default layout:         {fp32[0]:7.2f} s wall {fp32[1]:7.2f} s CPU per forward")
    print(f"bf16 autocast, channels_last: {bf16[0]:7.2f} s wall {bf16[1]:7.2f} s CPU per forward")
    print(f"speed-up: {fp32[0] / bf16[0]:.2f}x wall, {fp32[1] / bf16[1]:.2f}x CPU")


if __name__ == "__main__":
    main()
