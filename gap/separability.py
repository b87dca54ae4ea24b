"""How well a plain classifier tells two sets apart from their forensic features: the
cross-validated ROC AUC of scikit-learn's logistic regression (0.5: indistinguishable)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ddaug.pipeline.command import UserError

# Verdicts read off the AUC once its interval excludes chance.
VERDICTS = ((0.85, "large gap"), (0.65, "clear gap"), (0.0, "small gap"))


def _classifier():
    # Newton-Cholesky suits many more images than features, and needs a few iterations where
    # lbfgs needs dozens (each slow when BLAS threads fight over a busy CPU).
    return make_pipeline(StandardScaler(), LogisticRegression(solver="newton-cholesky", max_iter=1000,
                                                              class_weight="balanced"))


def verdict(auc: float, ci_low: float) -> str:
    if ci_low <= 0.5:
        return "no detectable gap"
    return next(text for floor, text in VERDICTS if auc >= floor)


def separability(a: np.ndarray, b: np.ndarray, *, feature_names: list[str], folds: int = 5,
                 seed: int = 0) -> dict[str, Any]:
    """AUC of `a` (label 1) against `b`: the mean over stratified folds, each fold's AUC scored on
    its held-out images (pooling held-out scores across folds biases AUC below 0.5 under the
    null), with a 95% t-interval over the folds; plus the features that weigh most."""
    k = min(folds, len(a), len(b))
    if k < 2:
        raise UserError(f"need at least 2 usable images per set (got {len(a)} and {len(b)}); raise --samples")
    x = np.vstack([a, b])
    y = np.r_[np.ones(len(a), dtype=int), np.zeros(len(b), dtype=int)]
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    fold_aucs = cross_val_score(_classifier(), x, y, cv=cv, scoring="roc_auc")
    auc = float(fold_aucs.mean())
    sem = float(stats.sem(fold_aucs))
    low, high = (auc, auc) if sem == 0 else stats.t.interval(0.95, k - 1, loc=auc, scale=sem)
    weights = _classifier().fit(x, y)[-1].coef_[0]
    top = np.argsort(-np.abs(weights))[:3]
    return {"auc": round(auc, 4), "ci": [round(max(0.0, low), 4), round(min(1.0, high), 4)],
            "fold_aucs": [round(float(v), 4) for v in fold_aucs], "n": [len(a), len(b)],
            "verdict": verdict(auc, max(0.0, low)),
            "top_features": [{"feature": feature_names[i], "weight": round(float(weights[i]), 3)} for i in top]}
