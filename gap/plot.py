"""`--plot`: the sets' mean residual spectra on one chart, and a row of residual crops per set."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .sets import ImageSet

THUMBNAILS = 6


def draw_gap(sets: list["ImageSet"], frequencies: np.ndarray, labels: dict[str, str], path: str) -> None:
    """labels: set name -> legend text (e.g. its AUC against business)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig = plt.figure(figsize=(2 * THUMBNAILS, 4 + 2 * len(sets)))
    grid = fig.add_gridspec(1 + len(sets), THUMBNAILS, height_ratios=[4] + [2] * len(sets))
    chart = fig.add_subplot(grid[0, :])
    for image_set in sets:
        chart.plot(frequencies, image_set.mean_spectrum(), label=labels.get(image_set.name, image_set.name))
    chart.set_xlabel("frequency (cycles per pixel)")
    chart.set_ylabel("log10 power of the noise residual")
    chart.set_title("Mean residual spectra (native resolution, azimuthal average)")
    chart.legend(fontsize=8)
    chart.grid(alpha=0.3)
    for row, image_set in enumerate(sets, start=1):
        for col in range(THUMBNAILS):
            ax = fig.add_subplot(grid[row, col])
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(image_set.images):
                thumb = image_set.images[col].features.thumbnail
                limit = float(np.percentile(np.abs(thumb), 99)) or 1.0
                ax.imshow(thumb, cmap="gray", vmin=-limit, vmax=limit, interpolation="nearest")
            if col == 0:
                ax.set_ylabel(image_set.name, fontsize=9)
    fig.tight_layout()
    partial = f"{path}.tmp.png"
    fig.savefig(partial, dpi=90)
    plt.close(fig)
    os.replace(partial, path)
