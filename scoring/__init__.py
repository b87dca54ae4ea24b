"""Score samples by a VLM's loss on their answers: how well the model predicts each answer
given the image (and, blanked, without it). `ddaug.scoring.run.run_score` runs it; the
summaries and the recipe's `keep` live in `ddaug.scoring.summary`."""

from .summary import kept_keys, sample_score, score_quantiles

__all__ = ["kept_keys", "sample_score", "score_quantiles"]
