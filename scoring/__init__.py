"""Score samples by a VLM's loss on their answers: how well the model predicts each answer
given the image (and, blanked, without it)."""

from .conversation import AnswerLoss
from .run import ScoreOptions, run_score
from .summary import kept_keys, score_quantiles

__all__ = ["AnswerLoss", "ScoreOptions", "run_score", "kept_keys", "score_quantiles"]
