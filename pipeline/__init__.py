"""The executor shared by every command that writes shards, and process placement."""

from .job import Job, JobAbort, JobSummary, SampleFailure, Stage
from .placement import Placement, resolve_placement

__all__ = ["Job", "JobAbort", "JobSummary", "SampleFailure", "Stage", "Placement", "resolve_placement"]
