"""`ddaug leakage`: find eval images, or near copies of them, inside training shards."""

from .fingerprints import STAGES, LeakageThresholds
from .run import LeakageOptions, run_leakage

__all__ = ["STAGES", "LeakageThresholds", "LeakageOptions", "run_leakage"]
