"""The shard store (atomic writing, output folder, schema, reading back) and the trainer's side
(loader, mixing and stages, collator, exports). Names load their modules on first use: writing
shards needs no torch, the loader does."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ddaug.lazy import lazy_exports

_PUBLIC = {
    "ChatCollator": ".collate",
    **dict.fromkeys(["CheckpointableLoader", "LoaderError", "MixedShardDataset", "ShardSource", "TrainingStage"],
                    ".loader"),
    **dict.fromkeys(["Recipe", "load_recipe", "plan"], ".recipe"),
    **dict.fromkeys(["build_sample", "validate_sample"], ".schema"),
    **dict.fromkeys(["Failure", "OutputFolder", "StoreError"], ".store"),
    "ShardWriter": ".writer",
}
__all__ = list(_PUBLIC)
__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC)

if TYPE_CHECKING:  # for type checkers and IDEs
    from .collate import ChatCollator
    from .loader import CheckpointableLoader, LoaderError, MixedShardDataset, ShardSource, TrainingStage
    from .recipe import Recipe, load_recipe, plan
    from .schema import build_sample, validate_sample
    from .store import Failure, OutputFolder, StoreError
    from .writer import ShardWriter
