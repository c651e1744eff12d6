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


def seconds_per_forward(model: DualStreamNet, hq: torch.Tensor, lq: torch.Tensor, autocast) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one forward."""
    wall, cpu = [], []
    with torch.inference_mode(), autocast:
        model(hq, lq)  # warm-up: oneDNN picks and caches kernels on the first call
        for _ in range(REPEATS):
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            model(hq, lq)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


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
    print(f"fp32, default layout:         {fp32[0]:7.2f} s wall {fp32[1]:7.2f} s CPU per forward")
    print(f"bf16 autocast, channels_last: {bf16[0]:7.2f} s wall {bf16[1]:7.2f} s CPU per forward")
    print(f"speed-up: {fp32[0] / bf16[0]:.2f}x wall, {fp32[1] / bf16[1]:.2f}x CPU")


if __name__ == "__main__":
    main()
