"""`ddaug leakage`: find eval images, or near copies of them, inside training shards."""

from .fingerprints import STAGES, Thresholds
from .run import LeakageOptions, run_leakage

__all__ = ["STAGES", "Thresholds", "LeakageOptions", "run_leakage"]
