"""ddaug's nearest 2x upsampling (augment/upsample.py): PyTorch's result, bit for bit, in the
input's own memory format; and every VAE upsampler a DiffusionFlavour runs is the guarded one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec
from ddaug.augment.upsample import Upsample2DAnySize, nearest_2x


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_nearest_2x_is_pytorchs_nearest_in_the_same_layout(layout):
    x = torch.randn(3, 6, 7, 5, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=layout)
    out = nearest_2x(x)
    assert torch.equal(out, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.is_contiguous(memory_format=layout)


def test_the_recipes_vae_upsamples_through_the_guard(tiny_model_dir):
    from diffusers.models.upsampling import Upsample2D

    flavour = DiffusionFlavour(load_components(resolve_spec(tiny_model_dir)), RecipeSettings(dtype="fp32"), "cpu")
    kinds = [type(m) for m in flavour.vae.modules()]
    assert Upsample2DAnySize in kinds
    guarded = {id(m.block) for m in flavour.vae.modules() if isinstance(m, Upsample2DAnySize)}
    bare = [m for m in flavour.vae.modules() if type(m) is Upsample2D and id(m) not in guarded]
    assert not bare
    # The decoder through the guard equals diffusers' forward of the same blocks.
    up = next(m for m in flavour.vae.modules() if isinstance(m, Upsample2DAnySize))
    x = torch.randn(2, up.block.channels, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(up(x), up.block(x))


def test_components_shared_by_two_flavours_are_guarded_once(tiny_model_dir):
    comps = load_components(resolve_spec(tiny_model_dir))
    for _ in range(2):
        flavour = DiffusionFlavour(comps, RecipeSettings(dtype="fp32"), "cpu")
    assert not any(isinstance(m.block, Upsample2DAnySize)
                   for m in flavour.vae.modules() if isinstance(m, Upsample2DAnySize))


@pytest.mark.parametrize("shape", [(2, 6, 7, 5), (1, 4, 1, 1), (3, 8, 4, 9)])
def test_the_phase_conv_is_upsample_then_conv(shape):
    """conv3x3(nearest_2x(x)) at x's resolution: the same function (fp32: summation order only),
    edges included, channels-last out; odd sizes and a 1x1 input."""
    from ddaug.augment.upsample import phase_weights, upsample_conv

    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(shape[1], 5, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(torch.randn(5, generator=g))
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        got = upsample_conv(x, *phase_weights(conv))
    assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()


def test_a_vae_decoder_with_phase_convs_matches_diffusers(tiny_model_dir):
    """Every upsampler of the tiny VAE switched to the phase conv: the decoder's output equals
    diffusers' own forward to fp32 rounding; NCHW inputs keep the plain path."""
    import copy

    from ddaug.augment.upsample import guard_upsamplers, use_phase_convs

    vae = load_components(resolve_spec(tiny_model_dir)).vae.float().eval()
    ref = copy.deepcopy(vae)
    guard_upsamplers(vae)
    assert use_phase_convs(vae) == sum(isinstance(m, Upsample2DAnySize) for m in vae.modules()) > 0
    vae.to(memory_format=torch.channels_last)
    z = torch.randn(2, vae.config.latent_channels, 6, 5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref.decode(z).sample
        got = vae.decode(z.contiguous(memory_format=torch.channels_last)).sample
    assert (got - want).abs().max().item() < 1e-4
    up = next(m for m in vae.modules() if isinstance(m, Upsample2DAnySize))
    x = torch.randn(1, up.block.channels, 3, 4)
    with torch.no_grad():
        assert torch.equal(up(x), up.block(x))  # NCHW: upsample, then the block's own conv
