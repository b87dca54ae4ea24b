"""The shard store (atomic writing, output folder, schema, reading back) and the trainer's side
(loader, mixing and stages, collator, exports)."""

from .collate import ChatCollator
from .loader import CheckpointableLoader, LoaderError, MixedShardDataset, ShardSource, TrainingStage
from .recipe import Recipe, load_recipe, plan
from .schema import build_sample, validate_sample
from .store import Failure, OutputFolder, StoreError
from .writer import ShardWriter

__all__ = ["ChatCollator", "CheckpointableLoader", "LoaderError", "MixedShardDataset", "ShardSource",
           "TrainingStage", "Recipe", "load_recipe", "plan", "build_sample", "validate_sample", "Failure",
           "OutputFolder", "StoreError", "ShardWriter"]
