"""Convolutional LSTM (Shi et al. 2015, without peepholes): temporal memory that keeps the spatial layout, so
flicker and blending seams that move between frames stay located instead of being averaged away."""
from __future__ import annotations

import torch
from torch import nn

from ..manifests.errors import InputError


class ConvLSTMCell(nn.Module):
    """One layer. The gate pre-activations (input, forget, output, candidate) are one convolution over [x_t, h_{t-1}],
    held as its two halves: the x half runs over every frame of the clip in one batched call and only the h half
    runs per step. Same function; the batched half turns T thin matrix products (49 positions at 7x7) into one T
    times taller, which is most of the layer's work (benchmarks/bench_model.py)."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 == 0:
            raise InputError(f"ConvLSTM kernel_size must be odd to keep the feature map size, got {kernel_size}")
        self.hidden_channels = hidden_channels
        # Drawn as the one convolution it is (same random numbers, so a seed gives the same network as ever),
        # then held as its halves.
        gates = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size)
        self.input_conv = nn.Conv2d(in_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2,
                                    device="meta")
        self.hidden_conv = nn.Conv2d(hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2,
                                     bias=False, device="meta")
        weight_x, weight_h = gates.weight.detach().split([in_channels, hidden_channels], dim=1)
        self.input_conv.weight = nn.Parameter(weight_x.clone())
        self.input_conv.bias = gates.bias
        self.hidden_conv.weight = nn.Parameter(weight_h.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,C,h,w) -> the hidden state after every frame, (B,T,hidden,h,w)."""
        steps = x.shape[1]
        # the batch size as -1 and the state shaped after a tensor, not as Python ints: so the ONNX export
        # (stages/onnx_model.py) traces them as shapes and takes any batch
        gates_x = self.input_conv(x.flatten(0, 1)).unflatten(0, (-1, steps))
        h = c = torch.zeros_like(gates_x[:, 0, :self.hidden_channels], memory_format=torch.contiguous_format)
        outputs = []
        for t in range(steps):
            gates = gates_x[:, t] + self.hidden_conv(h) if t else gates_x[:, t]  # h_0 = 0
            i, f, o, g = gates.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints written before the split hold one `conv` over [x, h]; its weight is the two halves side by
        side along the input channels."""
        weight = state_dict.pop(prefix + "conv.weight", None)
        if weight is not None:
            state_dict[prefix + "input_conv.weight"], state_dict[prefix + "hidden_conv.weight"] = weight.split(
                [weight.shape[1] - self.hidden_channels, self.hidden_channels], dim=1)
            state_dict[prefix + "input_conv.bias"] = state_dict.pop(prefix + "conv.bias")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class ConvLSTM(nn.Module):
    """Stacked cells; (B,T,C,h,w) -> the last layer's hidden state after the last frame, (B, filters[-1], h, w)."""

    def __init__(self, in_channels: int, filters: list[int], kernel_size: int):
        super().__init__()
        sizes = [in_channels, *filters]
        self.cells = nn.ModuleList(ConvLSTMCell(a, b, kernel_size) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for cell in self.cells:
            x = cell(x)
        return x[:, -1]
