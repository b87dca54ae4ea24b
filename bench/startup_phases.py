"""Start-up of a fresh process, by phase: import torch + CUDA context, import diffusers' model
classes, UNet load, VAE load, fused-kernel swap, and the batch-size probe (which also JITs
Triton's kernels when their cache is cold). What a `ddaug augment` process pays before its first
batch; bench/augment_bench.py's start-up column is measured in a process that has already
imported diffusers and built the model folder.

    python bench/startup_phases.py MODEL_DIR              # run it twice: cold, then warm cache
    rm -rf ~/.triton/cache && python bench/startup_phases.py MODEL_DIR
    python bench/startup_phases.py MODEL_DIR --profile 30 # cProfile of the load, top 30 by cumulative time
"""

from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()
import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N of the load phase")
    args = ap.parse_args()
    phases: list[tuple[str, float]] = []
    mark = [T0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases.append((name, now - mark[0]))
        mark[0] = now

    torch.zeros(1, device="cuda")
    phase("import torch + CUDA context")
    from ddaug.augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec
    import diffusers.models  # noqa: F401  (what load_components imports first)
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    phase("import ddaug + diffusers' model classes")
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    comps = load_components(resolve_spec(args.model_dir), dtype=torch.bfloat16, vae_dtype=torch.bfloat16,
                            device="cuda")
    torch.cuda.synchronize()
    phase("load UNet + VAE + scheduler")
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile // 2)
    flavour = DiffusionFlavour(comps, RecipeSettings(dtype="bf16"), "cuda")
    flavour.fuse_norms()
    phase("flavour + fuse")
    flavour.fit_batch_size()
    torch.cuda.synchronize()
    phase("probe (+ Triton JIT when cold)")
    print(", ".join(f"{name} {secs:.2f}s" for name, secs in phases)
          + f": {time.perf_counter() - T0:.1f}s in all", flush=True)


if __name__ == "__main__":
    main()
