"""Start-up of a fresh process, by phase: import + CUDA context, model load, fused-kernel swap,
and the batch-size probe (which also JITs Triton's kernels when their cache is cold). What a
`ddaug augment` process pays before its first batch; bench/augment_bench.py's start-up column
is measured in a process that has already imported diffusers and built the model folder.

    python bench/startup_phases.py MODEL_DIR              # run it twice: cold, then warm cache
    rm -rf ~/.triton/cache && python bench/startup_phases.py MODEL_DIR
"""

from __future__ import annotations

import os
import sys
import time

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from augment import DiffusionFlavour, RecipeSettings, load_components, resolve_spec  # noqa: E402


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.zeros(1, device="cuda")
    t1 = time.perf_counter()
    comps = load_components(resolve_spec(sys.argv[1]), dtype=torch.bfloat16, vae_dtype=torch.bfloat16,
                            device="cuda")
    t2 = time.perf_counter()
    flavour = DiffusionFlavour(comps, RecipeSettings(dtype="bf16"), "cuda")
    flavour.fuse_norms()
    t3 = time.perf_counter()
    flavour.fit_batch_size()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    print(f"import + CUDA context {t1 - T0:.2f}s, load {t2 - t1:.2f}s, flavour + fuse {t3 - t2:.2f}s, "
          f"probe (+ Triton JIT when cold) {t4 - t3:.2f}s: {t4 - T0:.1f}s in all", flush=True)


if __name__ == "__main__":
    main()
