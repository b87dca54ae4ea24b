"""The embedding stage: image embeddings from a CLIP- or SigLIP-style model (anything transformers
loads with AutoModel that has `get_image_features`), compared by cosine similarity."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ddaug.pipeline.command import UserError

log = logging.getLogger(__name__)


class ImageEmbedder:
    """Loads the model once (safetensors only, no remote code); `embed` gives unit vectors."""

    def __init__(self, name: str, device: str, batch_size: int = 32):
        import torch
        from transformers import AutoImageProcessor, AutoModel

        self.device = device
        self.batch_size = batch_size
        self.name = name
        try:
            self.processor = AutoImageProcessor.from_pretrained(name)
            self.model = AutoModel.from_pretrained(name, use_safetensors=True).to(device).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"--embed-model {name}: cannot load it ({str(exc).splitlines()[0]})") from None
        if not hasattr(self.model, "get_image_features"):
            raise UserError(f"--embed-model {name}: {type(self.model).__name__} has no image embedding "
                            f"(get_image_features); give a CLIP or SigLIP model")
        self._torch = torch

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        """len(images) x D float32, each row of unit length."""
        torch = self._torch
        rows = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                inputs = self.processor(images=images[start: start + self.batch_size], return_tensors="pt")
                features = self.model.get_image_features(**{k: v.to(self.device) for k, v in inputs.items()})
                if not isinstance(features, torch.Tensor):  # some models return an output object
                    features = features.pooler_output
                rows.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def save_tiny_clip(path: str) -> str:
    """A tiny random CLIP (image side 32) saved as safetensors with its image processor: it proves
    the embedding stage runs and is wired, nothing about how well it finds duplicates."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(path, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path
