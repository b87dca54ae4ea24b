"""ddaug's one-step recipe equals diffusers' own SDXL img2img pipeline driven exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline

from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec
from ddaug.augment.models import TINY_TRAINED


def _pipeline_output(model_dir, latents, timestep, seed, original_size, target_size):
    """The reference: the stock pipeline from the saved folder, strength=1.0, timesteps=[t],
    zero embeddings, the same latents and a generator seeded like ddaug's per-sample one."""
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(model_dir, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    unet_cfg = pipe.unet.config
    pooled_dim = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
    out = pipe(image=latents, strength=1.0, timesteps=[timestep], guidance_scale=0.0,
               prompt_embeds=torch.zeros(1, 77, unet_cfg.cross_attention_dim),
               pooled_prompt_embeds=torch.zeros(1, pooled_dim),
               generator=torch.Generator("cpu").manual_seed(seed), output_type="pt",
               original_size=original_size, target_size=target_size)
    return out.images  # [0, 1]


@pytest.mark.parametrize("which", ["euler", "lcm", "tiny"])
def test_one_step_matches_diffusers_pipeline(which, tiny_model_dir, tiny_lcm_dir, photos):
    """tiny-random (Euler and LCM) and the trained `tiny` preset, whose committed folder the
    stock pipeline loads as it would a hub folder."""
    model_dir = {"euler": tiny_model_dir, "lcm": tiny_lcm_dir, "tiny": TINY_TRAINED}[which]
    comps = load_components(resolve_spec("tiny" if which == "tiny" else model_dir))
    assert type(comps.scheduler).__name__ == ("LCMScheduler" if which == "lcm" else "EulerDiscreteScheduler")
    flavour = DiffusionFlavour(comps, RecipeSettings(strength=0.025, dtype="fp32"), "cpu")
    assert flavour.timestep == 25

    image = photos["coffee"]  # 61x83: exercises padding too
    seed = 1234
    ours = flavour([image], [seed])[0]

    padded = torch.from_numpy(flavour.pad_image(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    latents = flavour.encode(padded, flavour._generators([seed]))
    ref = _pipeline_output(model_dir, latents, 25, seed, image.shape[:2], tuple(padded.shape[-2:]))
    ref_pixels = (ref[0, :, :61, :83].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()

    assert ours.shape == image.shape
    diff = np.abs(ours.astype(int) - ref_pixels.astype(int))
    assert diff.max() <= 1, diff.max()          # float tolerance after uint8 rounding
    assert (diff == 0).mean() > 0.99


def test_strength_maps_to_timestep_and_one_unet_call(photos):
    comps = load_components(resolve_spec("tiny-random"))
    calls = []
    comps.unet.register_forward_hook(lambda *a: calls.append(1))
    for strength, t in [(0.025, 25), (0.1, 100), (1.0, 999)]:
        flavour = DiffusionFlavour(comps, RecipeSettings(strength=strength, dtype="fp32"), "cpu")
        assert flavour.timestep == t
        assert flavour.provenance()["timestep"] == t
    calls.clear()
    flavour([photos["astronaut"], photos["chelsea"]], [1, 2])
    assert len(calls) == 1  # one batched UNet call, no CFG duplicate


def test_vae_mode_loads_no_unet_call(photos):
    comps = load_components(resolve_spec("tiny-random"))
    calls = []
    comps.unet.register_forward_hook(lambda *a: calls.append(1))
    flavour = DiffusionFlavour(comps, RecipeSettings(mode="vae", dtype="fp32"), "cpu")
    out = flavour([photos["rocket"]], [0])[0]
    assert out.shape == photos["rocket"].shape and not calls
    assert "timestep" not in flavour.provenance()


def test_cond_empty_encodes_the_empty_prompt(tiny_model_dir):
    comps = load_components(resolve_spec(tiny_model_dir), text_encoders=True)
    flavour = DiffusionFlavour(comps, RecipeSettings(cond="empty", dtype="fp32"), "cpu")
    embeds, pooled = flavour._cond
    assert embeds.shape == (1, 77, 32) and pooled.shape == (1, 32)
    assert embeds.abs().sum() > 0  # the encoded "" is not zeros
    zeros = DiffusionFlavour(comps, RecipeSettings(cond="zeros", dtype="fp32"), "cpu")._cond
    assert zeros[0].abs().sum() == 0 and zeros[1].abs().sum() == 0


def test_non_finite_output_is_not_returned(photos):
    comps = load_components(resolve_spec("tiny-random"))
    flavour = DiffusionFlavour(comps, RecipeSettings(mode="vae", dtype="fp32"), "cpu")
    with torch.no_grad():
        next(comps.vae.decoder.conv_out.parameters()).fill_(float("nan"))
    assert flavour([photos["rocket"]], [0]) == [None]


def test_fast_path_matches_the_eager_path(tiny_model_dir, photos):
    """The VAE compiled with dynamic shapes gives the eager result, for batches of two canvases
    and for a lone image (run beside a copy of itself). CI has no GPU, so the graphs compile
    with the aot_eager backend: it checks what dynamo captures; inductor's kernels are checked
    on the GPU by bench/augment_bench.py."""
    settings = RecipeSettings(strength=0.025, dtype="fp32")
    eager = DiffusionFlavour(load_components(resolve_spec(tiny_model_dir)), settings, "cpu")
    fast = DiffusionFlavour(load_components(resolve_spec(tiny_model_dir)), settings, "cpu")
    fast.compile_vae(backend="aot_eager")
    batches = [([photos["astronaut"], photos["chelsea"]], [1, 2]), ([photos["coffee"]], [3])]
    for images, seeds in batches:
        ref, got = eager(images, seeds), fast(images, seeds)
        assert len(got) == len(images)
        for a, b in zip(ref, got):
            assert a.shape == b.shape
            assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_one_step_is_read_off_affine_schedulers_only():
    """The recipe's scheduler arithmetic becomes constants (so a batch never waits on the host)
    for Euler and LCM, whose pipeline match is tested above through those constants; a step that
    clips or adds noise is left to the scheduler's own calls."""
    from diffusers import DDPMScheduler, EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LCMScheduler

    from ddaug.augment.recipe import OneStep

    cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    euler = OneStep.read_off(EulerDiscreteScheduler(**cfg), 25)
    assert euler is not None and euler.latents == 1.0 and euler.eps == pytest.approx(-euler.noise)
    assert OneStep.read_off(LCMScheduler(**cfg), 25) is not None
    assert OneStep.read_off(DDPMScheduler(**cfg, clip_sample=True), 25) is None
    assert OneStep.read_off(EulerAncestralDiscreteScheduler(**cfg), 25) is None


def test_pinned_pool_reuses_the_smallest_fitting_buffer_and_never_hands_one_out_twice():
    from ddaug.augment.recipe import PinnedPool

    pool = PinnedPool(pin=False, granule=1024, keep=3)
    a, b, c = pool.take(3000), pool.take(100), pool.take(2000)  # 3072, 1024, 2048 bytes
    assert [t.numel() for t in (a, b, c)] == [3072, 1024, 2048]
    pool.give(a, b, c, None)
    got = pool.take(1500)
    assert got is c  # the smallest that fits, found among buffers of other sizes
    again = pool.take(1500)
    assert again is a and again is not got
    assert pool.take(5000).numel() == 5120  # nothing free fits: a new one
    pool.give(got, again, b, pool.take(10), pool.take(10))
    assert len(pool._free) == 3  # keeps the largest `keep`
