"""Train the `tiny` family: an SDXL-shaped AutoencoderKL and UNet, small enough to commit.

1. The VAE (8x down, 4 latent channels) learns to reconstruct random crops of the training
   photos (photos.TRAIN): random downscales, the eight flips/rotations, colour jitter; L1 loss
   plus SD's tiny KL term, and a little latent noise so the decoder tolerates what one denoising
   step leaves behind.
2. Its scaling_factor is set to 1 / std of its latents, as SD's was.
3. The UNet learns to predict the noise (epsilon) added to those latents at t <= 100, the range
   ddaug uses, with zero text conditioning and random SDXL size conditioning (time_ids).
4. The family is saved with save_pretrained (fp16 safetensors, diffusers' pipeline layout,
   SDXL's Euler scheduler config) and measured on the held-out photos (evaluate.py); the
   figures go into the model card (README.md in the folder) and one JSON line on stdout.

GPU (fits the budget: step counts come from timing the first steps, unless given):
    python -m ddaug.augment.tiny.train OUT --budget 420
Reproduce a run exactly: the model card's command, which names the step counts.
CPU smoke test (a minute or two):
    python -m ddaug.augment.tiny.train /tmp/tiny --device cpu --budget 60 --batch 4 --crop 64 \\
        --photo-max-side 256 --eval-max-side 128
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .photos import HELD_OUT, TRAIN

log = logging.getLogger(__name__)

SEED = 0

# SDXL's VAE shape (AutoencoderKL, 4 levels = 8x down, 4 latent channels, attention in the
# middle block) at small widths: ~5M parameters, 10 MB as fp16.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(64, 128, 128, 128), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256, force_upcast=True,
)
# SDXL's UNet shape (no attention at the first level, cross-attention below, text_time added
# conditioning with 6 size values) at small widths: ~2.7M parameters.
UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 96),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 1), attention_head_dim=(1, 2, 3), use_linear_projection=True,
    cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=6 * 16 + 32, norm_num_groups=16,
)


@dataclass(frozen=True)
class Hyper:
    crop: int = 128                 # VAE training crops (pixels)
    batch: int = 64                 # VAE crops per step
    vae_lr: float = 4e-4
    kl_weight: float = 1e-6         # SD's, on per-sample sums
    latent_noise: float = 0.05      # up to this x latent std added before decoding, half the batch
    unet_crop: int = 256            # UNet training crops (pixels; latents are 1/8)
    unet_batch: int = 64
    unet_lr: float = 4e-4
    max_timestep: int = 100         # the UNet learns t in [1, max_timestep]
    warmup: int = 100               # linear warm-up steps, then cosine decay to 5%
    scales: tuple[float, ...] = (1.0, 0.8, 0.64, 0.5, 0.4)   # downscales of each photo
    photo_max_side: int = 0         # 0 = native size (CPU smoke tests shrink the photos)
    vae_share: float = 0.75         # of the training time, the rest for the UNet
    reserve_s: float = 60.0         # budget kept for latents, saving and the evaluation
    scale_batches: int = 16         # batches of crops for the latent std


def _lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Photos:
    """The training photos at several downscales, on the device, and random crops of them."""

    def __init__(self, arrays: list[np.ndarray], hp: Hyper, min_side: int, device: torch.device, seed: int):
        self.levels: list[list[torch.Tensor]] = []  # per photo: (3, H, W) uint8 at each scale
        for arr in arrays:
            im = Image.fromarray(arr)
            if hp.photo_max_side and max(im.size) > hp.photo_max_side:
                f = hp.photo_max_side / max(im.size)
                im = im.resize((round(im.width * f), round(im.height * f)), Image.Resampling.LANCZOS)
            levels = []
            for s in hp.scales:
                w, h = round(im.width * s), round(im.height * s)
                if min(w, h) < min_side:
                    continue
                lvl = im if s == 1.0 else im.resize((w, h), Image.Resampling.LANCZOS)
                levels.append(torch.from_numpy(np.asarray(lvl).copy()).permute(2, 0, 1).to(device))
            if levels:
                self.levels.append(levels)
        if not self.levels:
            raise SystemExit(f"no training photo is at least {min_side} pixels on its short side")
        self.device = device
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device).manual_seed(seed)

    def crops(self, n: int, size: int) -> torch.Tensor:
        """n random crops, (n, 3, size, size) in [-1, 1], flipped/rotated and colour-jittered."""
        out = []
        for _ in range(n):
            levels = self.levels[self.rng.integers(len(self.levels))]
            img = levels[self.rng.integers(len(levels))]
            y = self.rng.integers(img.shape[1] - size + 1)
            x = self.rng.integers(img.shape[2] - size + 1)
            crop = img[:, y:y + size, x:x + size]
            k = int(self.rng.integers(8))  # the 8 flips/rotations: a local autoencoder has no "up"
            crop = torch.rot90(crop, k % 4, dims=(1, 2))
            out.append(crop.flip(2) if k >= 4 else crop)
        x = torch.stack(out).float() / 255.0
        return self._jitter(x) * 2 - 1

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        rand = lambda *shape: torch.rand(*shape, device=self.device, generator=self.gen)  # noqa: E731
        gains = 0.85 + 0.3 * rand(n, 3, 1, 1)                      # tint (grey photos get colour)
        x = x * gains
        luma = x.mean(dim=1, keepdim=True)
        x = luma + (x - luma) * (0.6 + 0.7 * rand(n, 1, 1, 1))     # saturation
        perm = torch.stack([torch.randperm(3, device=self.device, generator=self.gen) for _ in range(n)])
        keep = rand(n) < 0.75                                       # a quarter get their channels shuffled
        perm = torch.where(keep[:, None], torch.arange(3, device=self.device).expand(n, 3), perm)
        x = torch.gather(x, 1, perm[:, :, None, None].expand_as(x))
        return x.clamp(0, 1)


class Latents:
    """Scaled posterior means of every training photo level (and its mirror image), and random
    crops of them for the UNet."""

    def __init__(self, vae, photos: Photos, scaling: float, min_side: int, device: torch.device, amp: bool,
                 seed: int):
        self.items: list[torch.Tensor] = []
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=amp):
            for levels in photos.levels:
                for img in levels:
                    if min(img.shape[1:]) < min_side:
                        continue
                    h, w = img.shape[1] // 8 * 8, img.shape[2] // 8 * 8
                    x = img[None, :, :h, :w].float() / 127.5 - 1
                    for flipped in (x, x.flip(3)):
                        z = vae.encode(flipped).latent_dist.mean.float() * scaling
                        self.items.append(z[0])
        if not self.items:
            raise SystemExit(f"no training photo level is at least {min_side} pixels on its short side")
        self.rng = np.random.default_rng(seed)

    def crops(self, n: int, size: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            z = self.items[self.rng.integers(len(self.items))]
            y, x = self.rng.integers(z.shape[1] - size + 1), self.rng.integers(z.shape[2] - size + 1)
            out.append(z[:, y:y + size, x:x + size])
        return torch.stack(out)


def _steps_for(seconds: float, step_s: float) -> int:
    steps = int(seconds / max(step_s, 1e-6))
    return steps // 50 * 50 if steps >= 100 else max(steps, 1)


def _train_loop(name: str, step_fn, opt, params, lr: float, hp: Hyper, steps: int | None,
                time_s: float, deadline: float, device: torch.device) -> tuple[int, list[float]]:
    """Runs step_fn with warm-up + cosine LR. Without a step count, the first steps are timed and
    the count is what fits time_s (rounded down to 50s). Stops early only at the deadline."""
    losses: list[float] = []
    calib = (3, 13)  # time steps 3..12: after cuDNN's autotuning, before the count is fixed
    total = steps if steps else 10 ** 9
    step = 0
    while step < total:
        if step == calib[0]:
            _sync(device)
            t_calib = time.time()
        if step == calib[1] and not steps:
            _sync(device)
            step_s = (time.time() - t_calib) / (calib[1] - calib[0])
            total = max(_steps_for(time_s, step_s), calib[1])
            log.info("%s: %.3f s/step -> %d steps in %.0f s", name, step_s, total, time_s)
        for g in opt.param_groups:
            g["lr"] = _lr(step, total if total < 10 ** 9 else 10 ** 6, lr, hp.warmup)
        loss = step_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step == 1 or step % 50 == 0 or step == total:
            losses.append(loss.item())  # the only host syncs: the GPU runs ahead otherwise
            log.info("%s step %d/%d loss %.5f", name, step, total, losses[-1])
        if time.time() > deadline:
            log.warning("%s: the budget ran out at step %d", name, step)
            break
    if not losses or not (step == 1 or step % 50 == 0 or step == total):  # stopped by the deadline
        losses.append(loss.item())
    return step, losses


def train_vae(photos: Photos, hp: Hyper, steps: int | None, time_s: float, deadline: float,
              device: torch.device, amp: bool):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG, scaling_factor=1.0).to(device).train()
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=hp.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    pixels = 3 * hp.crop * hp.crop

    def step_fn():
        x = photos.crops(hp.batch, hp.crop)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            moments = vae.encode(x).latent_dist.parameters
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        # Half the batch gets extra latent noise (relative to the latents' spread) so the decoder
        # stays smooth where one denoising step leaves a small error.
        level = hp.latent_noise * torch.rand(z.shape[0], 1, 1, 1, device=device) * (torch.rand(z.shape[0], 1, 1, 1, device=device) < 0.5)
        z = z + level * z.detach().std() * torch.randn_like(z)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            rec = vae.decode(z).sample
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        return (rec.float() - x).abs().mean() + hp.kl_weight * kl / pixels

    done, losses = _train_loop("vae", step_fn, opt, params, hp.vae_lr, hp, steps, time_s, deadline, device)
    return vae.eval(), done, losses


@torch.no_grad()
def latent_scale(vae, photos: Photos, hp: Hyper, device: torch.device, amp: bool) -> float:
    """1 / std of the posterior means over fixed random crops, to 4 significant digits."""
    zs = []
    for _ in range(hp.scale_batches):
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            zs.append(vae.encode(photos.crops(hp.batch, hp.crop)).latent_dist.mean.float())
    std = float(torch.cat(zs).std())
    return float(f"{1.0 / std:.4g}")


def train_unet(latents: Latents, scheduler, hp: Hyper, steps: int | None, time_s: float, deadline: float,
               device: torch.device, amp: bool):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**UNET_CONFIG).to(device).train()
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=hp.unet_lr, betas=(0.9, 0.99), weight_decay=0.0)
    alphas = scheduler.alphas_cumprod.to(device)
    cfg = unet.config
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    size = hp.unet_crop // 8
    n = hp.unet_batch
    text = torch.zeros(n, 77, cfg.cross_attention_dim, device=device)
    pooled = torch.zeros(n, pooled_dim, device=device)

    def step_fn():
        z0 = latents.crops(n, size)
        t = torch.randint(1, hp.max_timestep + 1, (n,), device=device)
        eps = torch.randn_like(z0)
        a = alphas[t].view(n, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # = Euler's scale_model_input(add_noise(z0, eps, t), t)
        # ddaug passes the image's real size as SDXL's size conditioning: make the UNet indifferent to it.
        hw = torch.randint(64, 2049, (n, 2), device=device).float()
        time_ids = torch.cat([hw, torch.zeros(n, 2, device=device), torch.ceil(hw / 32) * 32], dim=1)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            pred = unet(zt, t, encoder_hidden_states=text,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        return F.mse_loss(pred.float(), eps)

    done, losses = _train_loop("unet", step_fn, opt, params, hp.unet_lr, hp, steps, time_s, deadline, device)
    return unet.eval(), done, losses


def save_family(folder: str, vae, unet) -> None:
    """diffusers' SDXL img2img pipeline layout without text encoders (ddaug's zero conditioning
    needs none), fp16 weights (diffusers loads them back as fp32)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    from ddaug.augment.models import SDXL_SCHEDULE

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=vae.to("cpu", torch.float16), unet=unet.to("cpu", torch.float16),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULE, interpolation_type="linear"),
        text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True, add_watermarker=False)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)


def model_card(info: dict) -> str:
    from .evaluate import figures_markdown

    f = info["figures"]
    train, held = ("\n".join(f"- {p['name']} ({p['package']}/{p['path']}, {p['licence']}, sha256 {p['sha256'][:16]})"
                             for p in info["photos"][part]) for part in ("train", "held_out"))
    return f"""# ddaug `tiny`: a tiny SDXL-shaped VAE + UNet trained on offline photos

Made by `augment/tiny/train.py` for offline demos and fidelity tests; not a generative model.
Diffusers pipeline layout (fp16 safetensors, no text encoders: ddaug's zero conditioning needs
none), SDXL's Euler scheduler config.

- VAE: AutoencoderKL {VAE_CONFIG['block_out_channels']}, 8x down, 4 latent channels,
  scaling_factor {info['scaling_factor']}; {info['vae_params'] / 1e6:.2f}M parameters.
- UNet: UNet2DConditionModel {UNET_CONFIG['block_out_channels']}, text_time conditioning, epsilon
  prediction at t in [1, {info['hyper']['max_timestep']}] with zero conditioning; {info['unet_params'] / 1e6:.2f}M parameters.
- Trained on {info['device']} (torch {info['torch']}, diffusers {info['diffusers']}) in {info['train_seconds']:.0f} s:
  VAE {info['vae_steps']} steps of {info['hyper']['batch']} crops of {info['hyper']['crop']}² (L1 {info['vae_loss'][0]:.4f} at step 1, {info['vae_loss'][-1]:.4f} at the end),
  UNet {info['unet_steps']} steps of {info['hyper']['unet_batch']} latent crops of {info['hyper']['unet_crop'] // 8}² (MSE {info['unet_loss'][0]:.4f} at step 1, {info['unet_loss'][-1]:.4f} at the end).
- Reproduce: `{info['command']}` (seed {SEED}; hyper-parameters: `{json.dumps(info['hyper'])}`).

{figures_markdown(f)}
## Data

Training photos (random crops at scales {info['hyper']['scales']}, 8 flips/rotations, colour jitter):
{train}

Held out, never trained on (the photos `ddaug demo` and the tests use):
{held}
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ddaug.augment.tiny.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", help="folder to write the family to (replaced)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    ap.add_argument("--vae-steps", type=int, help="fixed VAE step count (default: what fits the budget)")
    ap.add_argument("--unet-steps", type=int, help="fixed UNet step count (default: what fits the budget)")
    ap.add_argument("--batch", type=int, help=f"VAE crops per step (default {Hyper.batch}); UNet the same")
    ap.add_argument("--crop", type=int, help=f"VAE crop size (default {Hyper.crop}); UNet twice that")
    ap.add_argument("--photo-max-side", type=int, default=0, help="shrink training photos first (smoke tests)")
    ap.add_argument("--eval-max-side", type=int, default=0,
                    help="centre-crop held-out photos to this size for the evaluation (0 = whole photos)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    from diffusers.utils import logging as dlog

    dlog.set_verbosity_error()
    start = time.time()
    deadline_total = start + args.budget
    device = torch.device(args.device)
    amp = device.type == "cuda"  # bf16 autocast on the GPU; CPU smoke runs stay fp32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    hp = Hyper(photo_max_side=args.photo_max_side)
    if args.batch:
        hp = replace(hp, batch=args.batch, unet_batch=args.batch)
    if args.crop:
        hp = replace(hp, crop=args.crop, unet_crop=2 * args.crop)
    torch.manual_seed(SEED)
    np.random.seed(SEED)

    train_photos, skipped = [], []
    for p in TRAIN:
        try:
            train_photos.append((p, p.load()))
        except FileNotFoundError as exc:  # another package version may lack one: say so, go on
            log.warning("skipping %s", exc)
            skipped.append(p.name)
    photos = Photos([a for _, a in train_photos], hp, min_side=hp.crop, device=device, seed=SEED)
    log.info("%d training photos (%s skipped), %d levels", len(train_photos), skipped or "none",
             sum(len(lv) for lv in photos.levels))

    reserve = min(hp.reserve_s, args.budget / 4)
    train_time = max(deadline_total - reserve - time.time(), 1.0)
    vae, vae_steps, vae_loss = train_vae(photos, hp, args.vae_steps, train_time * hp.vae_share,
                                         deadline_total - reserve, device, amp)
    scaling = latent_scale(vae, photos, hp, device, amp)
    vae.register_to_config(scaling_factor=scaling)
    log.info("vae: %d steps, scaling_factor %s", vae_steps, scaling)

    from diffusers import EulerDiscreteScheduler

    from ddaug.augment.models import SDXL_SCHEDULE

    latents = Latents(vae, photos, scaling, hp.unet_crop, device, amp, SEED)
    unet_time = max(deadline_total - reserve - time.time(), 1.0)
    unet, unet_steps, unet_loss = train_unet(latents, EulerDiscreteScheduler(**SDXL_SCHEDULE), hp, args.unet_steps,
                                             unet_time, deadline_total - reserve * 0.5, device, amp)
    train_seconds = time.time() - start
    vae_params = sum(p.numel() for p in vae.parameters())
    unet_params = sum(p.numel() for p in unet.parameters())
    del latents
    save_family(args.output, vae, unet)
    del vae, unet
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.backends.cudnn.benchmark = False  # every held-out photo is another shape: no autotuning

    from .evaluate import held_out_figures

    dtypes = ("fp32", "bf16")
    figures = held_out_figures(args.output, str(device), dtypes, max_side=args.eval_max_side)
    import diffusers

    command = (f"python -m ddaug.augment.tiny.train OUT --device {device.type} --vae-steps {vae_steps} "
               f"--unet-steps {unet_steps} --budget {max(args.budget, 3600):.0f}")
    for flag, value in (("--batch", args.batch), ("--crop", args.crop), ("--photo-max-side", args.photo_max_side),
                        ("--eval-max-side", args.eval_max_side)):
        if value:
            command += f" {flag} {value}"
    info = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU",
        torch=torch.__version__, diffusers=diffusers.__version__, hyper=asdict(hp), command=command,
        vae_steps=vae_steps, unet_steps=unet_steps, vae_loss=vae_loss, unet_loss=unet_loss,
        scaling_factor=scaling, vae_params=vae_params, unet_params=unet_params, train_seconds=train_seconds,
        figures=figures,
        photos={"train": [dict(asdict(p), sha256=p.sha256()) for p, _ in train_photos],
                "held_out": [dict(asdict(p), sha256=p.sha256()) for p in HELD_OUT]},
    )
    with open(os.path.join(args.output, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(info))
    size = sum(os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(args.output) for name in names)
    summary = {k: figures[f"{m}_{d}"] for m in ("vae", "img2img") for d in dtypes for k in [f"{m}_{d}"]}
    summary.update(noise_left_t25=round(figures["noise_left_t25"], 4), best_shift=figures["best_shift"],
                   swapped_channels=figures["swapped_channels"], vae_steps=vae_steps, unet_steps=unet_steps,
                   scaling_factor=scaling, seconds=round(time.time() - start, 1), megabytes=round(size / 1e6, 2),
                   device=info["device"], eval_device=figures["device"])
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
