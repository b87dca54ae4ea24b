"""Start-up of a fresh process, by phase: import torch (+ the CUDA context), import ddaug and
diffusers' model classes, load UNet + VAE + scheduler, fused-kernel swap, the batch-size probe
(which also JITs Triton's kernels when their cache is cold) and the first batch. What a
`ddaug augment` process pays before its first batch is done.

Each run is a fresh process. `--imports selective` (what ddaug does) imports
UNet2DConditionModel and AutoencoderKL from their defining modules (augment/models.py
`diffusers_model_classes`); `--imports stock` imports them as `from diffusers import ...` does,
which loads every model class of diffusers.models' sub-packages. `--repeat N` alternates N fresh
processes of each and reports wall and CPU seconds per phase, with the load average.

    python bench/startup_phases.py --device cpu --repeat 5          # the committed `tiny` model
    python bench/startup_phases.py /tmp/sdxl --repeat 3             # run it twice: cold, then warm cache
    rm -rf ~/.triton/cache && python bench/startup_phases.py /tmp/sdxl
    python bench/startup_phases.py /tmp/sdxl --profile 30           # cProfile of the load, top 30
    python bench/startup_phases.py --chain --repeat 3               # what each heavy import adds
"""

from __future__ import annotations

import time

T0, C0 = time.perf_counter(), time.process_time()
import checkout  # noqa: E402,F401  (ddaug from this checkout, installed or not)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import emit  # noqa: E402

WAYS = ("stock", "selective")

# What each import adds to a fresh process after the ones above it: the heavy chains that every
# diffusers model class pulls in, then the model classes themselves.
CHAIN = [("import torch", "import torch"),
         ("torch._dynamo (diffusers.utils.torch_utils)", "import torch._dynamo"),
         ("transformers' PreTrainedModel (diffusers.loaders.lora_base)", "from transformers import PreTrainedModel"),
         ("scipy.stats (diffusers.loaders.single_file_utils)", "import scipy.stats"),
         ("the rest of diffusers.utils", "import diffusers.utils")]
CLASSES = {"stock": "from diffusers import AutoencoderKL, UNet2DConditionModel",
           "selective": "from ddaug.augment.models import diffusers_model_classes; diffusers_model_classes()"}


def chain_process(way: str) -> None:
    steps = []
    for name, stmt in CHAIN + [(f"the two model classes, {way}", CLASSES[way])]:
        c, n = time.process_time(), len(sys.modules)
        exec(stmt, {})
        steps.append((name, time.process_time() - c, len(sys.modules) - n))
    print(json.dumps(steps), flush=True)


def chain(args) -> None:
    """CPU seconds and modules that each import in CHAIN adds, in fresh processes."""
    runs: dict[str, list] = {way: [] for way in WAYS}
    for _ in range(args.repeat):
        for way in WAYS:
            proc = subprocess.run([sys.executable, __file__, "--chain-one", way], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            runs[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    rows = []
    for i, (name, _, modules) in enumerate(runs["selective"][0]):
        ways = WAYS if i == len(CHAIN) else ("selective",)
        for way in ways:
            cpu = [run[i][1] for run in runs[way]]
            label = runs[way][0][i][0]
            rows.append(f"| {label} | {min(cpu):.2f}-{max(cpu):.2f} | {runs[way][0][i][2]} |")
    emit([f"## What each import adds to a fresh augment process ({datetime.date.today()})",
          f"- {os.cpu_count()} CPU cores (shared), load average {os.getloadavg()[0]:.2f} at the end, python "
          f"{platform.python_version()}; command: `python bench/startup_phases.py --chain --repeat {args.repeat}`",
          "", "| import (who asks for it) | CPU seconds (range) | modules added |", "|---|---|---|", *rows, ""],
         args.results)


def one_process(args) -> None:
    """The phases of this process, as one JSON line: [name, wall s, cpu s] each."""
    phases: list[tuple[str, float, float]] = []
    mark = [T0, C0]

    def phase(name: str) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        phases.append((name, now - mark[0], cpu - mark[1]))
        mark[:] = [now, cpu]

    import torch

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=args.device)
    phase("import torch" + (" + CUDA context" if cuda else ""))
    from ddaug.augment.models import diffusers_model_classes, load_components, resolve_spec
    from ddaug.augment.recipe import DiffusionFlavour, RecipeSettings

    if args.imports == "stock":
        from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    else:
        diffusers_model_classes()
    phase("import ddaug + diffusers' model classes")
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    dtype = "bf16" if cuda else "fp32"
    torch_dtype = torch.bfloat16 if cuda else torch.float32
    comps = load_components(resolve_spec(args.model_dir), dtype=torch_dtype, vae_dtype=torch_dtype,
                            device=args.device)
    if cuda:
        torch.cuda.synchronize()
    phase("load UNet + VAE + scheduler")
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)
    flavour = DiffusionFlavour(comps, RecipeSettings(dtype=dtype), args.device)
    flavour.fuse_norms()
    phase("flavour + fuse")
    flavour.fit_batch_size()
    if cuda:
        torch.cuda.synchronize()
    phase("probe (+ Triton JIT when cold)")
    from skimage import data

    image = flavour.pad_image(data.astronaut()[:args.side, :args.side])
    flavour([image], [0])
    if cuda:
        torch.cuda.synchronize()
    phase(f"first batch (1 image, {args.side}²)")
    print(json.dumps(phases), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", default="tiny", help="a diffusers folder or a preset (default: tiny)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--imports", choices=WAYS, default="selective", help=argparse.SUPPRESS)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--chain-one", choices=WAYS, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--chain", action="store_true", help="what each heavy import adds, in fresh processes")
    ap.add_argument("--repeat", type=int, default=1, help="fresh processes of each import way")
    ap.add_argument("--side", type=int, default=512, help="the first batch's image side")
    ap.add_argument("--profile", type=int, default=0, help="print cProfile's top N of the load phase (one process)")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.chain_one:
        return chain_process(args.chain_one)
    if args.chain:
        return chain(args)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one or args.profile:
        return one_process(args)
    runs: dict[str, list[tuple[float, list]]] = {way: [] for way in WAYS}
    rows = []
    for i in range(args.repeat):
        for way in WAYS:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, args.model_dir, "--device", args.device, "--imports", way,
                                   "--side", str(args.side), "--one"], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            phases = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[way].append((wall, phases))
            cells = " | ".join(f"{w:.2f} ({c:.2f})" for _, w, c in phases)
            rows.append(f"| {way} | {i + 1} | {load:.2f} | {cells} | **{wall:.2f}** |")
            print(rows[-1], flush=True)
    names = [name for name, _, _ in runs[WAYS[0]][0][1]]
    summary = []
    for way in WAYS:
        walls = [w for w, _ in runs[way]]
        imports = [p[1][1] for _, p in runs[way]]
        imports_cpu = [p[1][2] for _, p in runs[way]]
        to_loaded = [sum(c for _, _, c in p[:3]) for _, p in runs[way]]  # the phases' sum: load moves
        summary.append(f"- {way}: whole process median {statistics.median(walls):.2f} s (range {min(walls):.2f}-"
                       f"{max(walls):.2f}); import ddaug + model classes median {statistics.median(imports):.2f} s wall, "
                       f"{statistics.median(imports_cpu):.2f} s CPU (range {min(imports_cpu):.2f}-{max(imports_cpu):.2f}); "
                       f"imports + load, CPU median {statistics.median(to_loaded):.2f} s (range {min(to_loaded):.2f}-"
                       f"{max(to_loaded):.2f})")
    import diffusers
    import torch

    lines = [f"## Start-up of a fresh augment process by phase, {args.device}, model {args.model_dir} "
             f"({datetime.date.today()})",
             f"- {os.cpu_count()} CPU cores (shared), python {platform.python_version()}, torch {torch.__version__}, "
             f"diffusers {diffusers.__version__}",
             f"- command: `python bench/startup_phases.py {args.model_dir} --device {args.device} --repeat {args.repeat} "
             f"--side {args.side}`",
             "- cells: wall seconds (CPU seconds of the process); the last column is the process's wall time from "
             "spawn to exit, interpreter start-up included; stock imports the model classes as `from diffusers "
             "import ...`, selective from their defining modules (what ddaug does)",
             "", "| imports | run | load avg (1 min) | " + " | ".join(names) + " | process |",
             "|---|---|---|" + "---|" * len(names) + "---|", *rows, "", *summary, ""]
    emit(lines, args.results)


if __name__ == "__main__":
    main()
