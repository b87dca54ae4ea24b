"""The shard store: atomic writing, the output folder, the sample schema, reading back."""

from .schema import build_sample, validate_sample
from .store import Failure, OutputFolder, StoreError
from .writer import ShardWriter

__all__ = ["build_sample", "validate_sample", "Failure", "OutputFolder", "StoreError", "ShardWriter"]
