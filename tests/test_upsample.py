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
