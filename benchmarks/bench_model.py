"""Forward time of the default dual-stream net on this CPU: fp32 contiguous vs bf16 autocast + channels_last (how
`train` runs) vs bf16 weights with BatchNorm folded into the convolutions (how `score-video` runs).

Run by hand (`python benchmarks/bench_model.py`); it backs the `model.channels_last` and `train.amp: auto` defaults
and score-video's inference set-up. All variants share weights, so the ratios are the layout/precision effects
alone. CPU time is printed next to wall time because the cores are often shared, which inflates wall time but
barely changes CPU seconds.
"""
from __future__ import annotations

import contextlib
import copy
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
    scoring = copy.deepcopy(fast).for_inference(torch.bfloat16)
    hq = torch.rand(BATCH, STEPS, 3, cfg.align.hq_size, cfg.align.hq_size)
    lq = torch.rand(BATCH, STEPS, 3, cfg.align.lq_size, cfg.align.lq_size)

    variants = {"fp32": (reference, contextlib.nullcontext, hq, lq),
                "bf16 autocast": (fast, bf16_autocast, hq, lq),
                "bf16 weights": (scoring, contextlib.nullcontext, hq.bfloat16(), lq.bfloat16())}
    runs = {name: [] for name in variants}
    for repeat in range(REPEATS + 1):  # the first round is warm-up: oneDNN builds and caches its kernels
        # Interleaved so that load from other processes drifts over all variants alike.
        for name, (model, autocast, x_hq, x_lq) in variants.items():
            result = timed_forward(model, x_hq, x_lq, autocast())
            if repeat:
                runs[name].append(result)
    fp32, bf16, weights = ([statistics.median(column) for column in zip(*runs[name])] for name in variants)
    print(f"{cfg.model.hq_backbone}+{cfg.model.lq_backbone}, batch {BATCH}, T={STEPS}, "
          f"{torch.get_num_threads()} threads, median of {REPEATS}")
    print(f"fp32, default layout:                     {fp32[0]:7.2f} s wall {fp32[1]:7.2f} s CPU per forward")
    print(f"bf16 autocast, channels_last (train):     {bf16[0]:7.2f} s wall {bf16[1]:7.2f} s CPU per forward")
    print(f"bf16 weights, BatchNorm folded (score):   {weights[0]:7.2f} s wall {weights[1]:7.2f} s CPU per forward")
    print(f"speed-up over fp32: train {fp32[0] / bf16[0]:.2f}x wall ({fp32[1] / bf16[1]:.2f}x CPU), "
          f"score {fp32[0] / weights[0]:.2f}x wall ({fp32[1] / weights[1]:.2f}x CPU); "
          f"{1000 * weights[0] / (BATCH * STEPS):.0f} ms per frame when scoring")


if __name__ == "__main__":
    main()
