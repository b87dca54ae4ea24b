"""ddaug: diffusion-domain data for fine-tuning vision-language models.

The jobs, each a shell command (`ddaug --help`) and a Python entry point:

- recaption diffusion-generated images with a VLM (`run_caption`),
- translate the conversations of general data through an LLM server (`run_translate`),
- score each sample by the VLM's loss on its answers, with and without the image (`run_score`),
- give natural photos a diffusion model's traits at near-zero strength (`run_augment`),
- mix and stage the resulting webdataset shards for a trainer (`MixedShardDataset`,
  `CheckpointableLoader`, `ChatCollator`, `load_recipe`), or export them to a trainer's own
  format (`export`).

Only the names in `__all__` are public; everything else may change without notice. Importing
`ddaug` is cheap: each name loads its module (and torch, diffusers...) on first use.

    from ddaug import MixedShardDataset, CheckpointableLoader
    ds = MixedShardDataset({"business": "out/cap", "general": "out/general"},
                           weights={"business": 10, "general": 1}, seed=0)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddaug.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_PUBLIC = {
    # the trainer's side
    "MixedShardDataset": "ddaug.shards.loader",
    "CheckpointableLoader": "ddaug.shards.loader",
    "ShardSource": "ddaug.shards.loader",
    "TrainingStage": "ddaug.shards.loader",
    "LoaderError": "ddaug.shards.loader",
    "ChatCollator": "ddaug.shards.collate",
    "Recipe": "ddaug.shards.recipe",
    "load_recipe": "ddaug.shards.recipe",
    "plan": "ddaug.shards.recipe",
    "export": "ddaug.shards.export",
    "inspect_shards": "ddaug.shards.inspect",
    # writing shards
    "RunOptions": "ddaug.pipeline.command",
    "UserError": "ddaug.pipeline.command",
    "JobSummary": "ddaug.pipeline.job",
    "run_augment": "ddaug.augment.run",
    "AugmentOptions": "ddaug.augment.run",
    "RecipeSettings": "ddaug.augment.recipe",
    "DiffusionFlavour": "ddaug.augment.recipe",
    "run_caption": "ddaug.captioning.run",
    "CaptionOptions": "ddaug.captioning.run",
    "GenerationSettings": "ddaug.captioning.vlm",
    "run_translate": "ddaug.translate.run",
    "TranslateOptions": "ddaug.translate.run",
    "run_score": "ddaug.scoring.run",
    "ScoreOptions": "ddaug.scoring.run",
    # checking for eval images in training data
    "run_leakage": "ddaug.leakage.run",
    "LeakageOptions": "ddaug.leakage.run",
    "LeakageThresholds": "ddaug.leakage.fingerprints",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from ddaug.augment.recipe import DiffusionFlavour, RecipeSettings
    from ddaug.augment.run import AugmentOptions, run_augment
    from ddaug.captioning.run import CaptionOptions, run_caption
    from ddaug.captioning.vlm import GenerationSettings
    from ddaug.leakage.fingerprints import LeakageThresholds
    from ddaug.leakage.run import LeakageOptions, run_leakage
    from ddaug.pipeline.command import RunOptions, UserError
    from ddaug.pipeline.job import JobSummary
    from ddaug.shards.collate import ChatCollator
    from ddaug.shards.export import export
    from ddaug.shards.inspect import inspect_shards
    from ddaug.shards.loader import CheckpointableLoader, LoaderError, MixedShardDataset, ShardSource, TrainingStage
    from ddaug.shards.recipe import Recipe, load_recipe, plan
    from ddaug.scoring.run import ScoreOptions, run_score
    from ddaug.translate.run import TranslateOptions, run_translate
