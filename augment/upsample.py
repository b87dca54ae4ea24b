"""Nearest-neighbour 2x upsampling for diffusers' Upsample2D that is right at every size.

Why: PyTorch's channels-last nearest upsampling on CUDA was reported to write zeros past 2^31
output elements (pytorch/pytorch#141831, filed December 2024; ddaug allows torch >= 2.4). diffusers'
guard makes the input contiguous when `numel * 2 > 2^31`, but a 2x upsample has four times the
input's elements, so inputs between 2^29 and 2^30 elements would still reach that kernel: the
SDXL VAE decoder does at 1024² from a batch of about 17. On torch 2.11 (H100) every size tried
came out right (bench/large_tensor_check.py; bench/RESULTS.md, "A channels-last VAE, fed better"), but that
kernel took 2-2.5x the time
of this one broadcast copy, which PyTorch indexes with 64 bits in the input's own layout. The
fused VAE runs channels-last, and the eager one is channels-last after its mid-block attention.
"""

from __future__ import annotations

import torch
from torch import nn


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest") for a 4-D tensor, bit for bit, keeping
    x's memory format (channels-last in, channels-last out)."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)
        up = nhwc[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
        return up.permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


class Upsample2DAnySize(nn.Module):
    """Drop-in for diffusers' Upsample2D (interpolating, optionally with its conv): the same
    forward with nearest_2x for the interpolation. Other configurations (a transposed conv, an
    explicit output size, a norm) run the block's own forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        b = self.block
        if output_size is not None or b.use_conv_transpose or not b.interpolate or b.norm is not None \
                or hidden_states.dim() != 4 or args or kwargs:
            return b(hidden_states, output_size, *args, **kwargs)
        hidden = nearest_2x(hidden_states)
        if b.use_conv:
            hidden = (b.conv if b.name == "conv" else b.Conv2d_0)(hidden)
        return hidden


def guard_upsamplers(model: nn.Module) -> int:
    """Swaps, in place, every diffusers Upsample2D in model for Upsample2DAnySize (once: a
    second call changes nothing); returns how many it swapped."""
    from diffusers.models.upsampling import Upsample2D

    swapped = 0
    for parent in list(model.modules()):
        if isinstance(parent, Upsample2DAnySize):
            continue  # already guarded (components shared by several flavours)
        for name, child in list(parent.named_children()):
            if type(child) is Upsample2D:
                setattr(parent, name, Upsample2DAnySize(child))
                swapped += 1
    return swapped
