"""Convolutional LSTM (Shi et al. 2015, without peepholes): temporal memory that keeps the spatial layout, so
flicker and blending seams that move between frames stay located instead of being averaged away."""
from __future__ import annotations

import torch
from torch import nn


class ConvLSTMCell(nn.Module):
    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"ConvLSTM kernel_size must be odd to keep the feature map size, got {kernel_size}")
        self.hidden_channels = hidden_channels
        # One conv yields all four gate pre-activations: input, forget, output, candidate.
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                              padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        i, f, o, g = self.conv(torch.cat([x, h], dim=1)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, c


class ConvLSTM(nn.Module):
    """Stacked cells; (B,T,C,h,w) -> the last layer's hidden state after the last frame, (B, filters[-1], h, w)."""

    def __init__(self, in_channels: int, filters: list[int], kernel_size: int):
        super().__init__()
        sizes = [in_channels, *filters]
        self.cells = nn.ModuleList(ConvLSTMCell(a, b, kernel_size) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sequence = x.unbind(dim=1)
        batch, _, height, width = sequence[0].shape
        for cell in self.cells:
            h = c = sequence[0].new_zeros(batch, cell.hidden_channels, height, width)
            outputs = []
            for x_t in sequence:
                h, c = cell(x_t, (h, c))
                outputs.append(h)
            sequence = outputs
        return sequence[-1]
