"""A training-style loop over a ddaug recipe: what a fine-tuning script does with the shards.

    accelerate launch --multi_gpu --num_processes 2 examples/train_mix.py recipe.yaml --vlm VLM   # GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/train_mix.py recipe.yaml --vlm VLM --cpu

Each process reads its own part of every shard set (split by rank and DataLoader worker),
draws the recipe's business:general mix, switches stage on schedule, and can resume from the
loader state saved with a checkpoint.
"""

import argparse
import collections
import json

from accelerate import Accelerator
from transformers import AutoProcessor

from ddaug.shards import ChatCollator, CheckpointableLoader, load_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--vlm", required=True, help="processor to tokenize with (hub id or folder)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="processes on CPU (gloo), e.g. to try it on a laptop")
    parser.add_argument("--report", default=None, help="write per-rank counts here (json lines)")
    args = parser.parse_args()

    accelerator = Accelerator(cpu=args.cpu)
    recipe = load_recipe(args.recipe)
    dataset = recipe.dataset(rank=accelerator.process_index, world_size=accelerator.num_processes)
    collate = ChatCollator(AutoProcessor.from_pretrained(args.vlm))
    # Keep the stage and source of each sample next to the tensors, for logging.
    loader = CheckpointableLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                                  collate_fn=lambda samples: (collate(samples), [(s["stage"], s["source"], s["key"])
                                                                                 for s in samples]))
    counts, keys, stages = collections.Counter(), [], []
    for step, (batch, info) in enumerate(loader):
        # model(**batch).loss.backward(); optimizer.step()  <- a real trainer goes here
        assert (batch["labels"] != -100).any()
        for stage, source, key in info:
            counts[f"{stage}/{source}"] += 1
            keys.append(key)
        if not stages or stages[-1] != info[-1][0]:
            stages.append(info[-1][0])
            accelerator.print(f"step {step}: stage {info[-1][0]}")
    state = loader.state_dict()  # save with the model checkpoint to resume mid-stage
    accelerator.print(f"rank {accelerator.process_index}: {dict(counts)}")
    if args.report:
        with open(f"{args.report}.{accelerator.process_index}", "w") as f:
            json.dump({"rank": accelerator.process_index, "counts": counts, "keys": keys, "stages": stages,
                       "state_slots": len(state["slots"])}, f)


if __name__ == "__main__":
    main()
