"""Low-level forensic features of one image, at its native resolution.

Resizing would erase exactly the traces that matter (resampling kernels, decoder upsampling,
JPEG blocks), so features come from fixed-size crops taken where they lie. Per crop: the noise
residual (the picture minus its 3x3 median, the classic forensic residual that removes content
and keeps the fine texture a generator or codec leaves), its azimuthally averaged log power
spectrum (periodic traces show as bumps, missing high frequencies as a drop) and a few
residual statistics. An image's features are the mean over its crops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, stats

# ITU-R BT.601 luma and the chroma differences a JPEG encoder subsamples.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
STAT_NAMES = ("log_residual_std", "residual_kurtosis", "residual_skew", "log_chroma_to_luma",
              "rgb_residual_correlation")


@dataclass
class ImageFeatures:
    vector: np.ndarray      # log spectrum bins, then STAT_NAMES
    spectrum: np.ndarray    # log10 power per radial frequency bin (the plot's curve)
    thumbnail: np.ndarray   # the residual of the first crop, for the picture


def frequencies(crop: int) -> np.ndarray:
    """Centre of each radial bin in cycles per pixel (bin r holds radius r/crop, r = 1..crop/2)."""
    return np.arange(1, crop // 2 + 1) / crop


def crop_origins(height: int, width: int, crop: int, count: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Up to `count` non-overlapping crop positions on the image's crop grid, drawn by rng."""
    grid = [(y, x) for y in range(0, height - crop + 1, crop) for x in range(0, width - crop + 1, crop)]
    pick = rng.choice(len(grid), size=min(count, len(grid)), replace=False)
    return [grid[i] for i in sorted(pick)]


def _radial_bins(crop: int) -> np.ndarray:
    f = np.fft.fftfreq(crop)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2) * crop
    return np.rint(radius).astype(np.int64)


class FeatureExtractor:
    def __init__(self, crop: int = 64, crops_per_image: int = 16):
        if crop < 16 or crop % 2:
            raise ValueError("crop must be an even number of pixels, at least 16")
        self.crop = crop
        self.crops_per_image = crops_per_image
        self._bins = _radial_bins(crop)
        self._bin_counts = np.bincount(self._bins.ravel())
        self._window = np.outer(np.hanning(crop), np.hanning(crop)).astype(np.float32)

    @property
    def n_features(self) -> int:
        return self.crop // 2 + len(STAT_NAMES)

    def feature_names(self) -> list[str]:
        return [f"residual power at {f:.3f} cycles/px" for f in frequencies(self.crop)] + list(STAT_NAMES)

    def residual(self, crops: np.ndarray) -> np.ndarray:
        """k x H x W x C float crops -> their median-filter noise residuals, per crop and channel."""
        return crops - ndimage.median_filter(crops, size=(1, 3, 3, 1), mode="reflect")

    def _spectra(self, luma: np.ndarray) -> np.ndarray:
        centred = (luma - luma.mean(axis=(1, 2), keepdims=True)) * self._window
        power = (np.abs(np.fft.fft2(centred)) ** 2).reshape(len(luma), -1)
        bins = self._bins.ravel()
        radial = np.stack([np.bincount(bins, weights=row) for row in power]) / self._bin_counts
        return np.log10(radial[:, 1: self.crop // 2 + 1] + 1e-6)

    def __call__(self, rgb: np.ndarray, rng: np.random.Generator) -> ImageFeatures:
        """rgb: HxWx3 uint8, at least crop x crop. Crops are drawn from rng."""
        height, width = rgb.shape[:2]
        crops = np.stack([rgb[y: y + self.crop, x: x + self.crop]
                          for y, x in crop_origins(height, width, self.crop, self.crops_per_image, rng)])
        res = self.residual(crops.astype(np.float32))
        luma = res @ _LUMA
        spectrum = self._spectra(luma).mean(axis=0)
        return ImageFeatures(np.concatenate([spectrum, self._stats(res, luma)]), spectrum, luma[0])

    @staticmethod
    def _stats(res: np.ndarray, luma: np.ndarray) -> np.ndarray:
        """STAT_NAMES, each the mean over the crops."""
        flat = luma.reshape(len(luma), -1).astype(np.float64)
        std = flat.std(axis=1)
        # Chroma residual energy against luma: JPEG's 4:2:0 subsampling and demosaicing both
        # shape it, and a VAE decoder shapes it its own way.
        chroma_std = (res - luma[..., None]).reshape(len(res), -1).std(axis=1)
        textured = std > 1e-6  # a flat crop has no residual at all: kurtosis 0, skew 0
        kurt, skew = np.zeros(len(flat)), np.zeros(len(flat))
        if textured.any():
            kurt[textured] = stats.kurtosis(flat[textured], axis=1)
            skew[textured] = stats.skew(flat[textured], axis=1)
        corr = []
        for channels in res.reshape(len(res), -1, 3).transpose(0, 2, 1).astype(np.float64):
            ok = np.all(channels.std(axis=1) > 1e-6)
            corr.append(np.corrcoef(channels)[np.triu_indices(3, 1)].mean() if ok else 1.0)
        return np.array([np.log10(std + 1e-3).mean(), kurt.mean(), skew.mean(),
                         np.log10((chroma_std + 1e-3) / (std + 1e-3)).mean(), float(np.mean(corr))])
