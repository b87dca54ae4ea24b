"""The fused group-norm kernels (augment/groupnorm.py) compute what diffusers' modules compute.

On a GPU they replace the VAE's and UNet's norms; here the same Triton kernels run through
Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernels are defined, so in a
subprocess), and the swap without kernels must leave every output bit-identical.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from ddaug.augment.groupnorm import FusedGroupNorm, FusedResnetBlock, fuse_group_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=8, attention_head_dim=4, sample_size=16).eval()


def test_swap_covers_every_norm_and_changes_nothing_without_kernels():
    for make, run in [(tiny_vae, lambda m: m(torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))).sample),
                      (tiny_unet, lambda m: m(torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), 10,
                                              encoder_hidden_states=torch.ones(2, 5, 16)).sample)]:
        model = make()
        reference = copy.deepcopy(model)
        assert fuse_group_norms(model) > 0
        # Every GroupNorm is now behind a fused module: a resnet wrapper or a drop-in norm.
        for parent in model.modules():
            if isinstance(parent, (FusedResnetBlock, FusedGroupNorm)) or type(parent).__name__ == "ResnetBlock2D":
                continue
            assert not any(type(c) is nn.GroupNorm for c in parent.children()), type(parent).__name__
        assert any(isinstance(m, FusedResnetBlock) for m in model.modules())
        assert fuse_group_norms(model) == 0  # idempotent
        with torch.no_grad():
            assert torch.equal(run(reference), run(model))  # CPU without the interpreter: PyTorch's ops


INTERPRETED_CHECKS = textwrap.dedent("""
    import copy, json, sys
    import torch, torch.nn.functional as F
    from torch import nn
    sys.path.insert(0, {tests!r})
    from ddaug.augment.groupnorm import group_norm_act, residual_add_, fuse_group_norms, triton_usable
    from test_groupnorm import tiny_vae, tiny_unet
    out = {{}}
    torch.manual_seed(0)
    # (shape, groups, bias shape): one group spread over several programs (49,152 values), a
    # per-sample bias, a per-channel bias, a 3-D input as attention's norm passes it.
    for name, shape, groups, bias_shape in [("multi-split", (2, 8, 96, 128), 2, None),
                                            ("per-sample bias", (3, 16, 12, 20), 4, (3, 16)),
                                            ("channel bias", (2, 32, 8, 8), 8, (32,)),
                                            ("3-d", (2, 64, 300), 32, None)]:
        norm = nn.GroupNorm(groups, shape[1])
        with torch.no_grad():
            norm.weight.normal_(); norm.bias.normal_()
        x = torch.randn(shape) * 3 + 5  # a mean far from 0: the moments must not cancel
        bias = torch.randn(bias_shape) if bias_shape else None
        with torch.no_grad():
            for act in (True, False):
                xb = x if bias is None else x + bias.reshape(*bias.shape, *([1] * (x.dim() - 2)))
                ref = F.group_norm(xb, groups, norm.weight, norm.bias, norm.eps)
                ref = F.silu(ref) if act else ref
                out[f"{{name}} act={{act}}"] = (group_norm_act(x, norm, act=act, bias=bias) - ref).abs().max().item()
    # Channels-last (the layout a fused VAE runs in): 4-D, and the (N, C, L) view attention
    # passes its norm; several programs per sample (8 x 40 x 64 rows of 16 channels).
    for name, x, groups, bias_shape in [
            ("nhwc", (torch.randn(2, 16, 40, 64) * 3 + 5).to(memory_format=torch.channels_last), 4, (2, 16)),
            ("nhwc 3-d", torch.randn(2, 300, 32).transpose(1, 2), 8, None),
            # 512 channels: 19 row tiles per sample
            ("nhwc many tiles", (torch.randn(2, 512, 40, 30) * 2 - 3).to(memory_format=torch.channels_last), 32,
             (2, 512))]:
        norm = nn.GroupNorm(groups, x.shape[1])
        with torch.no_grad():
            norm.weight.normal_(); norm.bias.normal_()
        bias = torch.randn(bias_shape) if bias_shape else None
        with torch.no_grad():
            xb = x if bias is None else x + bias.reshape(*bias.shape, *([1] * (x.dim() - 2)))
            ref = F.silu(F.group_norm(xb, groups, norm.weight, norm.bias, norm.eps))
            y = group_norm_act(x, norm, act=True, bias=bias)
        assert y.stride() == x.stride(), (name, y.stride(), x.stride())  # same layout out
        out[name] = (y - ref).abs().max().item()
    # One sample per grid row; (3, 16, 20, 30) spreads each sample over 5 programs.
    for layout in (torch.contiguous_format, torch.channels_last):
        for shape in ((2, 8, 6, 10), (3, 16, 20, 30)):
            h, skip = (torch.randn(shape).contiguous(memory_format=layout) for _ in range(2))
            b = torch.randn(shape[1])
            want = (h + skip + b[:, None, None]) * 0.5
            out[f"residual {{shape}} {{layout}}"] = (residual_add_(h.clone(), skip, b, 0.5) - want).abs().max().item()
    with torch.no_grad():
        vae = tiny_vae(); ref = copy.deepcopy(vae); fuse_group_norms(vae)
        x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))
        out["vae"] = (vae(x).sample - ref(x).sample).abs().max().item()
        vae.to(memory_format=torch.channels_last)  # as DiffusionFlavour.fuse_norms runs it
        xcl = x.contiguous(memory_format=torch.channels_last)
        out["vae channels-last"] = (vae(xcl).sample - ref(x).sample).abs().max().item()
        # A sample's norm does not depend on its batch mates (the model as a whole may: CPU
        # convolutions pick kernels by batch size).
        norm = vae.decoder.up_blocks[0].resnets[0].block.norm1
        h = torch.randn(3, norm.num_channels, 24, 40)
        out["norm batch-independent"] = torch.equal(group_norm_act(h, norm, act=True)[1:2],
                                                    group_norm_act(h[1:2], norm, act=True))
        unet = tiny_unet(); ref = copy.deepcopy(unet); fuse_group_norms(unet)
        z, e = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 16)
        out["unet"] = (unet(z, 10, encoder_hidden_states=e).sample - ref(z, 10, encoder_hidden_states=e).sample).abs().max().item()
    # Shapes whose launch grid would pass CUDA's 65,535 limit on axis 1 take PyTorch's path
    # (meta tensors: the check reads shapes only).
    wide = nn.GroupNorm(2, 4)
    out["grid-limited shapes fall back"] = (
        not triton_usable(torch.empty(1, 4, 1, 65535 * 2048 + 1, device="meta"), wide)
        and triton_usable(torch.empty(1, 4, 1, 65535 * 2048, device="meta"), wide))
    print(json.dumps(out))
""")


def test_triton_kernels_match_pytorch_in_the_interpreter():
    pytest.importorskip("triton")
    script = INTERPRETED_CHECKS.format(tests=os.path.join(ROOT, "tests"))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result.pop("norm batch-independent") is True
    assert result.pop("grid-limited shapes fall back") is True
    for name, err in result.items():
        assert err < 1e-4, (name, err)  # fp32: only summation order differs
    assert len(result) == 18


def test_a_cpu_run_never_goes_through_the_interpreter(tmp_path):
    """TRITON_INTERPRET in a user's environment must not route a CPU run through Triton's
    (far slower) interpreter: fused modules are for CUDA models only."""
    import numpy as np
    from PIL import Image

    from conftest import read_samples

    (tmp_path / "in").mkdir()
    Image.fromarray(np.full((40, 56, 3), 120, np.uint8)).save(tmp_path / "in" / "a.png")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "ddaug", "augment", str(tmp_path / "in"), "-o",
                           str(tmp_path / "out"), "--model", "tiny-random", "--device", "cpu", "-q"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (sample,) = read_samples(tmp_path / "out").values()
    assert json.loads(sample["json"])["augment"]["fused_norms"] is False
