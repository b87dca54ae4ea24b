"""The `tiny` model family: a tiny SDXL-shaped VAE + UNet trained here on offline photos.

photos.py lists the training and held-out photos, train.py trains and saves the family,
evaluate.py measures it on the held-out photos, and weights/ holds the committed result, which
the `tiny` preset (augment.models.TINY_TRAINED) loads like any diffusers folder.
"""
