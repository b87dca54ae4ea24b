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
import torch.nn.functional as F
from torch import nn

# Which input row (of the input padded by one) each of a 3x3 kernel's rows reads, for the even
# and the odd output rows of a nearest 2x upsample: even rows read input rows i-1, i, i and odd
# rows i, i, i+1, so each output phase is a 2x2 kernel whose rows are sums of the 3x3's.
_PHASE_ROWS = torch.tensor([[[1., 0., 0.], [0., 1., 1.]],
                            [[1., 1., 0.], [0., 0., 1.]]])


def nearest_2x(x: torch.Tensor) -> torch.Tensor:
    """F.interpolate(x, scale_factor=2, mode="nearest") for a 4-D tensor, bit for bit, keeping
    x's memory format (channels-last in, channels-last out)."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        nhwc = x.permute(0, 2, 3, 1)
        up = nhwc[:, :, None, :, None, :].expand(n, h, 2, w, 2, c).reshape(n, 2 * h, 2 * w, c)
        return up.permute(0, 3, 1, 2)
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def phase_weights(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The four 2x2 kernels (stacked: 4*out channels, phase (a, b) at block 2a+b), summed in fp32
    and rounded once to the conv's dtype, and the bias, that compute conv(nearest_2x(x)) for a
    3x3 conv with padding 1."""
    w = conv.weight.detach().float()
    rows = _PHASE_ROWS.to(w.device)
    k = torch.einsum("ayk,bxl,oikl->aboiyx", rows, rows, w)  # (2, 2, out, in, 2, 2)
    k = k.reshape(4 * w.shape[0], w.shape[1], 2, 2).to(conv.weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else None  # the same for every phase
    return k.contiguous(memory_format=torch.channels_last), bias


def upsample_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(nearest_2x(x)) computed on x's own resolution: one 2x2 convolution with four
    output phases (16 multiply-adds per input pixel and channel pair instead of the 36 the
    upsampled 3x3 takes), then one strided copy that interleaves the phases into the 2x output.
    x channels-last (N, C, H, W); the result is channels-last (N, out, 2H, 2W)."""
    n, _, h, w = x.shape
    out_c = weight.shape[0] // 4
    # (N, 4*out, H+1, W+1), phase (a, b) at offset (a, b). The bias is added in the copy below:
    # PyTorch adds a convolution's bias in a pass of its own.
    y = F.conv2d(x, weight, None, padding=1)
    nhwc = y.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # a view
    sn, sh, sw, _ = nhwc.stride()
    # out[n, 2i+a, 2j+b, c] = y[n, i+a, j+b, (2a+b)*out + c], as one strided view of y.
    phases = nhwc.as_strided((n, h, 2, w, 2, out_c), (sn, sh, sh + 2 * out_c, sw, sw + out_c, 1))
    out = torch.empty((n, 2 * h, 2 * w, out_c), dtype=y.dtype, device=y.device)
    if bias is None:
        out.view(n, h, 2, w, 2, out_c).copy_(phases)
    else:
        torch.add(phases, bias, out=out.view(n, h, 2, w, 2, out_c))
    return out.permute(0, 3, 1, 2)


def _phase_conv_fits(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


class Upsample2DAnySize(nn.Module):
    """Drop-in for diffusers' Upsample2D (interpolating, optionally with its conv): the same
    forward with nearest_2x for the interpolation. Other configurations (a transposed conv, an
    explicit output size, a norm) run the block's own forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        # conv(nearest_2x(x)) as one phase convolution at x's resolution, for channels-last
        # inputs, once use_phase_conv has been called (the fused VAE). The same function summed
        # in another order: outputs agree with upsample-then-conv to bf16 rounding.
        self.phase_conv: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def use_phase_conv(self) -> bool:
        """Run conv(nearest_2x(x)) as one phase convolution from now on (weights as they are
        now: call it after the model has moved to its device and dtype)."""
        b = self.block
        conv = (b.conv if b.name == "conv" else b.Conv2d_0) if b.use_conv else None
        if conv is None or not _phase_conv_fits(conv):
            return False
        self.phase_conv = phase_weights(conv)
        return True

    def forward(self, hidden_states: torch.Tensor, output_size: int | None = None, *args, **kwargs) -> torch.Tensor:
        b = self.block
        if output_size is not None or b.use_conv_transpose or not b.interpolate or b.norm is not None \
                or hidden_states.dim() != 4 or args or kwargs:
            return b(hidden_states, output_size, *args, **kwargs)
        if self.phase_conv is not None and hidden_states.is_contiguous(memory_format=torch.channels_last) \
                and (hidden_states.dtype, hidden_states.device) == (self.phase_conv[0].dtype, self.phase_conv[0].device):
            return upsample_conv(hidden_states, *self.phase_conv)
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


def use_phase_convs(model: nn.Module) -> int:
    """Every guarded upsampler in model computes its conv at the input's resolution
    (upsample_conv) from now on; returns how many do."""
    return sum(m.use_phase_conv() for m in model.modules() if isinstance(m, Upsample2DAnySize))
