"""Inputs: folders, path lists, webdataset tars and LLaMA-Factory datasets, as SourceItems."""

from .decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from .items import ImageRef, SourceItem, make_key
from .readers import SourceError, read_sources

__all__ = ["IMAGE_EXTENSIONS", "ImageDecodeError", "decode_image", "ImageRef", "SourceItem",
           "make_key", "SourceError", "read_sources"]
