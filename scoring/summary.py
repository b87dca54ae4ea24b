"""Scores read back: quantiles for `inspect`, histograms for `--scores-plot`, and which samples a
`keep` fraction keeps (the loader, `ddaug plan`)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Hashable, Iterable

# The score fields a recipe may rank by, and whether a lower value is the better sample: a low
# loss is an answer the model finds likely; a high image gain is one that needs its picture.
RANK_FIELDS = {"loss": True, "image_gain": False}
SUMMARY_FIELDS = ("loss", "loss_blank", "image_gain")
QUANTILES = (0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def sample_score(meta: Any, field: str = "loss") -> float | None:
    """A sample json's score field, or None when it was not scored (or not with --image-gain)."""
    block = meta.get("score") if isinstance(meta, dict) else None
    value = block.get(field) if isinstance(block, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def score_quantiles(values: list[float]) -> dict[str, float] | None:
    """n, mean, min, the QUANTILES (linear interpolation) and max of a list of scores."""
    if not values:
        return None
    xs = sorted(values)
    out: dict[str, float] = {"n": len(xs), "mean": round(statistics.fmean(xs), 4), "min": round(xs[0], 4)}
    for q in QUANTILES:
        pos = q * (len(xs) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        out[f"p{round(q * 100)}"] = round(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo), 4)
    out["max"] = round(xs[-1], 4)
    return out


def format_quantiles(name: str, q: dict[str, float]) -> str:
    middle = "  ".join(f"{k} {v:.3f}" for k, v in q.items() if k.startswith("p"))
    return f"score.{name:<10} n {q['n']}  mean {q['mean']:.3f}  min {q['min']:.3f}  {middle}  max {q['max']:.3f}"


def kept_keys(scores: Iterable[tuple[Hashable, float]], fraction: float, by: str = "loss") -> set[Hashable]:
    """The best `fraction` of the scored samples by `by`: round(fraction * n) of them (at least
    one while fraction > 0), ties broken by id so the choice is the same on every machine."""
    if by not in RANK_FIELDS:
        raise ValueError(f"cannot rank by {by!r}; use one of {', '.join(RANK_FIELDS)}")
    items = list(scores)
    sign = 1.0 if RANK_FIELDS[by] else -1.0
    items.sort(key=lambda kv: (sign * kv[1], str(kv[0])))
    n = max(1, round(fraction * len(items))) if fraction > 0 and items else 0
    return {k for k, _ in items[:n]}


def plot_scores(scores: dict[str, list[float]], path: str) -> None:
    """One histogram per score field present (loss, loss_blank, image_gain), with its median
    and 10%/90% quantiles marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fields = [f for f in SUMMARY_FIELDS if scores.get(f)]
    fig, axes = plt.subplots(1, len(fields), figsize=(5 * len(fields), 3.6), squeeze=False)
    for ax, field in zip(axes[0], fields):
        values = scores[field]
        q = score_quantiles(values)
        ax.hist(values, bins=min(60, max(10, len(values) // 5)), color="#4477aa")
        for name, style in (("p10", ":"), ("p50", "-"), ("p90", ":")):
            ax.axvline(q[name], color="#cc3311", linestyle=style, label=f"{name} {q[name]:.3f}")
        ax.set_title(f"{field} ({len(values)} samples)")
        ax.set_xlabel({"loss": "mean answer-token loss (nats)", "loss_blank": "loss with the image blanked",
                       "image_gain": "loss_blank - loss"}[field])
        ax.set_ylabel("samples")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
