"""GroupNorm (+ SiLU) in two Triton kernels, and the module surgery that puts them in diffusers'
VAE and UNet.

Why: eager PyTorch runs a GroupNorm as a moments kernel plus an affine kernel that cannot
vectorise (its per-channel scale and shift broadcast), then SiLU as another pass, then the
residual add and a division by output_scale_factor = 1 as two more. In the SDXL VAE decoder at
COCO sizes those elementwise passes were half of the GPU time (bench/RESULTS.md,
"COCO-like photos: per-shape costs and canvases of 64 and 128").
Here one kernel reads a group for its moments and one reads it again to write the normalised,
activated output. No compilation step beyond Triton's JIT of two small kernels (cached on disk).

Both layouts are read: NCHW (a program per (sample, group) chunk) and channels-last (a
program per tile of rows, all of a sample's channels at once, merged into groups afterwards),
so a VAE kept channels-last runs its convolutions in cuDNN's own layout without transposes.

In NCHW, per-sample statistics are reduced in a fixed order that depends only on the sample's
own shape. In channels-last, the groups are merged from per-channel partials with PyTorch's
reductions over the whole batch, whose order on CUDA may change with the batch size (the last
bits), as cuDNN's convolutions do. ddaug's outputs do not depend on either: the job always
batches a block of inputs the same way (pipeline/job.py). A per-sample Triton merge was tried
and dropped: it added 1.7-5 s of cold kernel JIT to start-up for no measurable throughput. Off CUDA, or without Triton, the same
modules run PyTorch's own ops in diffusers' order (bit-identical to the unfused model).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the PyTorch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Triton's CPU interpreter (TRITON_INTERPRET=1, read when the kernels are defined) runs the same
# kernels on CPU tensors: how the tests check them on machines without a GPU.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# Elements of one group that one moments program reduces (at least), the most programs per
# group (a constant, so the normalise kernel compiles once for every size), and elements per
# normalise program.
MOMENTS_CHUNK = 32768
MOMENTS_BLOCK = 1024
MAX_SPLITS = 128
NORMALIZE_BLOCK = 2048


if triton is not None:
    # Sizes that vary with the model's widths are not specialised on (each specialisation is
    # another JIT compile, ~0.4 s); hw and the group size are, so loads vectorise.
    @triton.jit
    def _welford_add(v, mask, count, mean, m2):
        # One more value per lane (where mask) into running (count, mean, m2): Welford's update.
        count += mask.to(tl.float32)
        delta = v - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (v - mean), 0.0)
        return count, mean, m2

    @triton.jit(do_not_specialize=["channels", "cpg", "splits"])
    def _moments_kernel(x_ptr, bias_ptr, part_ptr, group_numel, hw, channels, cpg, chunk, splits,
                        HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        # One program: a chunk of one (sample, group); per-lane Welford, then merged across lanes.
        group = tl.program_id(0)
        split = tl.program_id(1)
        base = group.to(tl.int64) * group_numel
        start = split * chunk
        end = tl.minimum(start + chunk, group_numel)
        count = tl.zeros([BLOCK], tl.float32)
        mean = tl.zeros([BLOCK], tl.float32)
        m2 = tl.zeros([BLOCK], tl.float32)
        groups = channels // cpg
        bias_base = (group // groups) * channels + (group % groups) * cpg
        for off in range(start, end, BLOCK):
            idx = off + tl.arange(0, BLOCK)
            mask = idx < end
            v = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += tl.load(bias_ptr + bias_base + idx // hw, mask=mask, other=0.0).to(tl.float32)
            count, mean, m2 = _welford_add(v, mask, count, mean, m2)
        total = tl.sum(count, 0)
        group_mean = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
        spread = mean - group_mean
        group_m2 = tl.sum(m2 + count * spread * spread, 0)
        out = part_ptr + (group * splits + split) * 3
        tl.store(out, total)
        tl.store(out + 1, group_mean)
        tl.store(out + 2, group_m2)

    @triton.jit(do_not_specialize=["channels", "cpg", "splits", "eps"])
    def _normalize_kernel(x_ptr, y_ptr, weight_ptr, beta_ptr, bias_ptr, part_ptr, hw, channels, cpg,
                          splits, eps, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                          SPLITS: tl.constexpr, BLOCK: tl.constexpr):
        # One program: a block of one (sample, channel) plane, so scale and shift are scalars.
        plane = tl.program_id(0)
        n = plane // channels
        c = plane % channels
        group = n * (channels // cpg) + c // cpg
        s = tl.arange(0, SPLITS)
        parts = part_ptr + (group * splits + s) * 3
        valid = s < splits
        count = tl.load(parts, mask=valid, other=0.0)
        mean_s = tl.load(parts + 1, mask=valid, other=0.0)
        m2_s = tl.load(parts + 2, mask=valid, other=0.0)
        total = tl.sum(count, 0)
        mean = tl.sum(count * mean_s, 0) / total
        spread = mean_s - mean
        var = tl.sum(m2_s + count * spread * spread, 0) / total
        rstd = 1.0 / tl.sqrt(var + eps)
        scale = tl.load(weight_ptr + c).to(tl.float32) * rstd
        shift = tl.load(beta_ptr + c).to(tl.float32) - mean * scale
        if HAS_BIAS:
            shift += tl.load(bias_ptr + n * channels + c).to(tl.float32) * scale
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < hw
        base = plane.to(tl.int64) * hw
        y = tl.load(x_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) * scale + shift
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + base + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["splits"])
    def _moments_nhwc_kernel(x_ptr, bias_ptr, part_ptr, hw, chunk, splits, C: tl.constexpr,
                             HAS_BIAS: tl.constexpr, ROWS: tl.constexpr):
        # Channels-last: one program reads rows [start, end) of one sample, all C channels at
        # once (coalesced), and writes per-channel (count, mean, m2); groups merge on the host.
        # Row tiles on grid axis 0 (up to 2^31 - 1 programs); axes 1 and 2 stop at 65,535, which
        # a 1024² activation's tiles would pass.
        # Sums of v - pivot, the pivot being each channel's value in the chunk's first row:
        # shifted sums keep the variance exact where plain sums of squares cancel (a mean far
        # from 0), at two adds per value; Welford's update costs a division per value, which
        # made this pass compute-bound at a fifth of the memory rate. The bias shifts the mean
        # only: it cancels in v - pivot.
        split = tl.program_id(0)
        n = tl.program_id(1)
        start = split * chunk
        end = tl.minimum(start + chunk, hw)
        cols = tl.arange(0, C)
        base = n.to(tl.int64) * hw * C
        pivot = tl.load(x_ptr + base + start.to(tl.int64) * C + cols).to(tl.float32)
        s1 = tl.zeros([ROWS, C], tl.float32)
        s2 = tl.zeros([ROWS, C], tl.float32)
        for off in range(start, end, ROWS):
            rows = off + tl.arange(0, ROWS)
            mask = (rows < end)[:, None] & (cols < C)[None, :]
            v = tl.load(x_ptr + base + rows[:, None].to(tl.int64) * C + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            d = tl.where(mask, v - pivot[None, :], 0.0)
            s1 += d
            s2 += d * d
        total = (end - start).to(tl.float32)
        sum1 = tl.sum(s1, 0)
        col_mean = pivot + sum1 / total
        if HAS_BIAS:
            col_mean += tl.load(bias_ptr + n * C + cols).to(tl.float32)
        col_m2 = tl.maximum(tl.sum(s2, 0) - sum1 * sum1 / total, 0.0)
        out = part_ptr + ((n * splits + split) * 3) * C + cols
        tl.store(out, tl.zeros([C], tl.float32) + total)
        tl.store(out + C, col_mean)
        tl.store(out + 2 * C, col_m2)

    @triton.jit
    def _normalize_nhwc_kernel(x_ptr, y_ptr, scale_ptr, shift_ptr, hw, C: tl.constexpr,
                               ACT: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        n = tl.program_id(1)
        cols = tl.arange(0, C)
        mask = (rows < hw)[:, None] & (cols < C)[None, :]
        offs = n.to(tl.int64) * hw * C + rows[:, None].to(tl.int64) * C + cols[None, :]
        scale = tl.load(scale_ptr + n * C + cols)[None, :]
        shift = tl.load(shift_ptr + n * C + cols)[None, :]
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale + shift
        if ACT:
            y = y * tl.sigmoid(y)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["channels", "scale"])
    def _residual_kernel(h_ptr, skip_ptr, bias_ptr, per_sample, hw, channels, scale, HAS_BIAS: tl.constexpr,
                         CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
        # h = (h + skip + bias[c]) * scale, in place, over memory order: a resnet's conv2 bias
        # and residual add. One sample per grid row: Triton compiles another kernel for an int
        # argument past 2^31, which a whole batch's element count passes at 0.3 MP x 64 (a cold
        # JIT in the middle of a job), and one sample's does not below 16 MP.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < per_sample
        base = tl.program_id(1).to(tl.int64) * per_sample
        y = tl.load(h_ptr + base + offs, mask=mask, other=0.0).to(tl.float32) + \
            tl.load(skip_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            c = offs % channels if CHANNELS_LAST else offs // hw
            y += tl.load(bias_ptr + c, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + base + offs, (y * scale).to(h_ptr.dtype.element_ty), mask=mask)


def kernels_available(device: torch.device) -> bool:
    """Whether a model on device gets the fused modules: CUDA only. A CPU run is never routed
    through Triton's interpreter (far slower), even with TRITON_INTERPRET set; the tests call
    the kernels and fuse_group_norms directly for that."""
    return triton is not None and device.type == "cuda"


def _on_kernel_device(x: torch.Tensor) -> bool:
    return triton is not None and (x.is_cuda or _INTERPRETED)


def _channels_last(x: torch.Tensor) -> bool:
    """(N, C, ...) stored as (N, ..., C): a channels-last 4-D tensor, or the (N, C, L) view of
    one that diffusers' attention hands its norm. The channel count must be a power of two
    (a Triton block) of at most 1024."""
    c = x.shape[1]
    if x.dim() < 3 or c & (c - 1) or c > 1024 or x.is_contiguous():
        return False
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 3 and x.stride() == (x.shape[2] * c, 1, c)


# CUDA grids stop at 65,535 programs on axes 1 and 2. The NCHW normalise kernel puts a plane's
# tiles there, so a plane past 65,535 tiles (134 MP; ddaug's decoder refuses inputs over about
# 89 MP) runs PyTorch's ops rather than failing to launch. The channels-last kernels put their
# tiles on axis 0 and the batch on axis 1.
MAX_GRID_Y = 65535


def triton_usable(x: torch.Tensor, norm: nn.GroupNorm) -> bool:
    if not (_on_kernel_device(x) and x.dim() >= 3 and norm.affine and x.shape[1] == norm.num_channels):
        return False
    if x.is_contiguous():
        return triton.cdiv(x[0, 0].numel(), NORMALIZE_BLOCK) <= MAX_GRID_Y and x.shape[0] <= MAX_GRID_Y
    return _channels_last(x) and x.shape[0] <= MAX_GRID_Y


def _per_channel(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    """A (C,) or (N, C) offset as broadcastable to x (N, C, ...)."""
    return None if bias is None else bias.reshape(*bias.shape[-2:], *([1] * (x.dim() - 2)))


def group_norm_act(x: torch.Tensor, norm: nn.GroupNorm, *, act: bool, bias: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + bias)) (without silu when act is False); bias is an optional (C,)
    or (N, C) per-channel offset added before the norm: the previous conv's bias, a UNet's time
    embedding."""
    if not triton_usable(x, norm):
        if bias is not None:
            x = x + _per_channel(bias, x)
        y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        return F.silu(y) if act else y
    if not x.is_contiguous():
        return _group_norm_act_nhwc(x, norm, act, bias)
    n, channels = x.shape[:2]
    hw = x[0, 0].numel()
    cpg = channels // norm.num_groups
    group_numel = cpg * hw
    chunk = max(MOMENTS_CHUNK, triton.cdiv(group_numel, MAX_SPLITS))
    chunk = triton.cdiv(chunk, MOMENTS_BLOCK) * MOMENTS_BLOCK
    splits = triton.cdiv(group_numel, chunk)
    parts = torch.empty((n * norm.num_groups, splits, 3), device=x.device, dtype=torch.float32)
    if bias is not None:
        bias = bias.expand(n, channels).contiguous()
    bias_arg = bias if bias is not None else parts  # never read when HAS_BIAS is False
    _moments_kernel[(n * norm.num_groups, splits)](
        x, bias_arg, parts, group_numel, hw, channels, cpg, chunk, splits,
        HAS_BIAS=bias is not None, BLOCK=MOMENTS_BLOCK, num_warps=4)
    y = torch.empty_like(x)
    _normalize_kernel[(n * channels, triton.cdiv(hw, NORMALIZE_BLOCK))](
        x, y, norm.weight, norm.bias, bias_arg, parts, hw, channels, cpg, splits, norm.eps,
        HAS_BIAS=bias is not None, ACT=act, SPLITS=MAX_SPLITS, BLOCK=NORMALIZE_BLOCK, num_warps=4)
    return y


NHWC_TILE = 4096  # elements of a channels-last tile: rows x channels


def _group_norm_act_nhwc(x: torch.Tensor, norm: nn.GroupNorm, act: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """group_norm_act on a channels-last tensor: per-channel moments in one kernel, the groups'
    statistics and each channel's scale and shift from them in a few small ops, then one
    normalise kernel. cuDNN's convolutions read and write this layout natively, so a VAE kept
    channels-last needs none of the NCHW<->NHWC transposes eager bf16 pays around each one."""
    n, channels = x.shape[:2]
    hw = x[0, 0].numel()
    groups, cpg = norm.num_groups, channels // norm.num_groups
    rows = max(NHWC_TILE // channels, 1)
    chunk = max(rows, triton.cdiv(MOMENTS_CHUNK // channels, rows) * rows)
    splits = triton.cdiv(hw, chunk)
    parts = torch.empty((n, splits, 3, channels), device=x.device, dtype=torch.float32)
    if bias is not None:
        bias = bias.expand(n, channels).contiguous()
    _moments_nhwc_kernel[(splits, n)](x, bias if bias is not None else parts, parts, hw, chunk, splits,
                                      C=channels, HAS_BIAS=bias is not None, ROWS=rows, num_warps=8)
    count, mean_c, m2_c = (p.reshape(n, splits, groups, cpg) for p in parts.unbind(2))
    total = count.sum((1, 3))
    mean = (count * mean_c).sum((1, 3)) / total
    m2 = (m2_c + count * (mean_c - mean[:, None, :, None]) ** 2).sum((1, 3))
    rstd = torch.rsqrt(m2 / total + norm.eps)  # (N, G)
    scale = (norm.weight.float().view(groups, cpg) * rstd[..., None]).reshape(n, channels)
    shift = norm.bias.float() - (mean[..., None].expand(n, groups, cpg).reshape(n, channels)) * scale
    if bias is not None:
        shift = shift + bias.float() * scale
    y = torch.empty_like(x)
    _normalize_nhwc_kernel[(triton.cdiv(hw, rows), n)](x, y, scale.contiguous(), shift.contiguous(), hw,
                                                       C=channels, ACT=act, ROWS=rows, num_warps=8)
    return y


def residual_add_(hidden: torch.Tensor, skip: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    """hidden = (hidden + skip + bias) * scale, in place; bias per channel or None."""
    layout_ok = hidden.is_contiguous() or hidden.is_contiguous(memory_format=torch.channels_last)
    if _on_kernel_device(hidden) and hidden.dim() == 4 and layout_ok and skip.shape == hidden.shape \
            and skip.stride() == hidden.stride() and not torch.is_grad_enabled() and hidden.shape[0] <= MAX_GRID_Y:
        per_sample, hw = hidden[0].numel(), hidden[0, 0].numel()
        _residual_kernel[(triton.cdiv(per_sample, NORMALIZE_BLOCK), hidden.shape[0])](
            hidden, skip, bias if bias is not None else hidden, per_sample, hw, hidden.shape[1], scale,
            HAS_BIAS=bias is not None, CHANNELS_LAST=not hidden.is_contiguous(), BLOCK=NORMALIZE_BLOCK,
            num_warps=4)
        return hidden
    out = hidden + skip if bias is None else hidden + skip + _per_channel(bias, hidden)
    return out * scale


def _conv_no_bias(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # PyTorch adds a cuDNN convolution's bias in a separate broadcast pass that cannot vectorise
    # (a fifth of the VAE's GPU time); the fused kernels add it while they read the output anyway.
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


class FusedGroupNorm(nn.Module):
    """Drop-in for an nn.GroupNorm, optionally followed by SiLU (act=True)."""

    def __init__(self, norm: nn.GroupNorm, act: bool):
        super().__init__()
        self.norm = norm
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_act(x, self.norm, act=self.act)


class FusedResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D forward (no resampling, time embedding added or absent) in fewer
    passes: each norm+SiLU pair is one kernel pair, conv1's bias and the time embedding are added
    inside the second norm, and conv2's bias, the shortcut's bias and the residual in one in-place
    kernel. Where the kernels cannot run (CPU, no Triton, training) it is the block's own forward."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        b = self.block
        if torch.is_grad_enabled() or not _on_kernel_device(input_tensor) or input_tensor.dim() != 4:
            return b(input_tensor, temb, *args, **kwargs)
        if not triton_usable(input_tensor, b.norm1):
            # e.g. an attention block's channels-last view at a width the channels-last kernels
            # do not take: one copy keeps the rest of the net in a layout they read.
            input_tensor = input_tensor.contiguous()
        hidden = _conv_no_bias(b.conv1, group_norm_act(input_tensor, b.norm1, act=True))
        bias = b.conv1.bias
        if b.time_emb_proj is not None and temb is not None:
            bias = _add(bias, b.time_emb_proj(temb if b.skip_time_act else b.nonlinearity(temb)))
        hidden = group_norm_act(hidden, b.norm2, act=True, bias=bias)
        hidden = _conv_no_bias(b.conv2, b.dropout(hidden))
        bias = b.conv2.bias
        shortcut = input_tensor
        if b.conv_shortcut is not None:
            shortcut = _conv_no_bias(b.conv_shortcut, input_tensor)
            bias = _add(bias, b.conv_shortcut.bias)
        return residual_add_(hidden, shortcut, bias, 1.0 / b.output_scale_factor)


def _fusable_resnet(module: nn.Module) -> bool:
    from diffusers.models.resnet import ResnetBlock2D

    return (type(module) is ResnetBlock2D and module.upsample is None and module.downsample is None
            # "default" adds a projected time embedding before norm2; the VAE's blocks say "group"
            # and have no projection, which is the same forward.
            and (module.time_embedding_norm == "default"
                 or (module.time_embedding_norm != "scale_shift" and module.time_emb_proj is None))
            and isinstance(module.nonlinearity, nn.SiLU)
            and all(type(c) is nn.Conv2d and c.padding_mode == "zeros"
                    for c in (module.conv1, module.conv2, module.conv_shortcut) if c is not None)
            and isinstance(module.norm1, nn.GroupNorm) and isinstance(module.norm2, nn.GroupNorm))


def fuse_group_norms(model: nn.Module) -> int:
    """Swaps, in place, diffusers' ResnetBlock2D for FusedResnetBlock, norm-out + SiLU pairs
    (conv_norm_out / conv_act) for one fused norm, and every other nn.GroupNorm for a
    FusedGroupNorm. Returns how many norms now run fused."""
    fused = 0
    for parent in list(model.modules()):
        if isinstance(parent, (FusedResnetBlock, FusedGroupNorm)) or _fusable_resnet(parent):
            continue  # already swapped, or a block whose wrapper uses its norms as they are
        if isinstance(getattr(parent, "conv_norm_out", None), nn.GroupNorm) and \
                isinstance(getattr(parent, "conv_act", None), nn.SiLU):
            parent.conv_norm_out = FusedGroupNorm(parent.conv_norm_out, act=True)
            parent.conv_act = nn.Identity()
            fused += 1
        for name, child in list(parent.named_children()):
            if _fusable_resnet(child):
                setattr(parent, name, FusedResnetBlock(child))
                fused += 2
            elif type(child) is nn.GroupNorm:
                setattr(parent, name, FusedGroupNorm(child, act=False))
                fused += 1
    return fused
