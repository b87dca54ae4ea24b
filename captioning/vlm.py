"""The transformers backend: any AutoModelForImageTextToText + AutoProcessor with a chat template.

`--vlm` takes a preset, a hub id or a local folder. Weights load from safetensors only; remote
code runs only when the user passes --trust-remote-code. torch and transformers load when a
model does: the openai backend uses this module's settings and prompts without them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from .replies import Reply

log = logging.getLogger(__name__)

VLM_PRESETS = {
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "smolvlm": "HuggingFaceTB/SmolVLM-Instruct",
    "tiny-random": "tiny-random",  # built in code: a tiny Qwen2-VL with an in-process tokenizer
}


class VLMLoadError(Exception):
    """A VLM that cannot be loaded or used; one line for the user."""


@dataclass(frozen=True)
class GenerationSettings:
    """How the VLM writes its answers, for both backends: length limit and sampling. Recorded in
    each sample's `caption` block (without the seed, which `run.json` holds)."""

    max_new_tokens: int = 512  # answers cut here are flagged truncated
    temperature: float = 0.0   # 0: greedy
    top_p: float = 1.0         # nucleus sampling, with temperature > 0
    seed: int = 0              # sampling seed (the run's --seed)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("seed")
        out["do_sample"] = not self.greedy
        return out


@dataclass
class Prompt:
    """One request: an image (already capped to the pixel budget) and the user text."""

    image: Image.Image | None   # the picture (transformers backend; None when data is given)
    text: str
    data: bytes | None = None   # original file bytes, sent as-is by the openai backend when usable
    mime: str | None = None


# -- the tiny random model -------------------------------------------------------------------------
_TINY_TEXTS = [
    "Describe this image in detail.", "详细描述图中有什么？", "A cat sits on a red sofa near the window.",
    "The photo shows a rocket on a launch pad under a clear blue sky.", "一杯咖啡放在木桌上，旁边有一个勺子。",
    '{"question": "What color is the car?", "answer": "The car is red."}',
]
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# A minimal ChatML-style template written for the tiny model; real models bring their own.
_TINY_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def save_tiny_vlm(folder: str, seed: int = 0) -> str:
    """Build a tiny Qwen2-VL (2 text layers, 2 vision blocks) with a byte-level BPE tokenizer
    trained in process, and save model + processor with save_pretrained (safetensors)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TINY_TEXTS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=_SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIAL}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 256),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=_TINY_TEMPLATE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         bos_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


_tiny_lock = threading.Lock()
_tiny_folder: str | None = None


def _tiny_vlm_folder() -> str:
    global _tiny_folder
    with _tiny_lock:
        if _tiny_folder is None:
            _tiny_folder = save_tiny_vlm(tempfile.mkdtemp(prefix="ddaug-tiny-vlm-"))
        return _tiny_folder


def resolve_vlm(name: str) -> str:
    """A preset name, hub id or folder -> what from_pretrained takes."""
    if name == "tiny-random":
        return _tiny_vlm_folder()
    return VLM_PRESETS.get(name, os.path.expanduser(name))


def missing_package(exc: ImportError) -> str:
    """The pip name in transformers' "... Install it with `pip install X`" messages, else the
    module that failed to import."""
    m = re.search(r"pip install ([A-Za-z0-9_.\-]+)", str(exc))
    return m.group(1) if m else (exc.name or str(exc).splitlines()[0]).split(".")[0]


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # torch dtypes, by name: torch loads with a model


def load_vlm(name: str, *, device: "str", dtype: str, trust_remote_code: bool = False):
    """(processor, model) of a preset, hub id or folder, on device in eval mode; VLMLoadError
    with one line when it cannot be loaded or has no chat template."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve_vlm(name)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, DTYPES[dtype]), use_safetensors=True, trust_remote_code=trust_remote_code)
    except ImportError as exc:  # a family's optional dependency (SmolVLM: num2words)
        raise VLMLoadError(f"cannot load VLM {name!r}: it needs the Python package "
                           f"{missing_package(exc)} (pip install {missing_package(exc)})") from None
    except (OSError, ValueError, KeyError) as exc:
        hint = "" if trust_remote_code else " (if the model needs its own code, pass --trust-remote-code)"
        raise VLMLoadError(f"cannot load VLM {name!r}: {str(exc).splitlines()[0]}{hint}") from None
    if not getattr(processor, "chat_template", None):
        raise VLMLoadError(f"VLM {name!r} has no chat template; use an instruction-tuned model")
    model.to(torch.device(device)).eval()
    return processor, model


# -- generation ------------------------------------------------------------------------------------
class TransformersVLM:
    backend = "transformers"

    def __init__(self, name: str, *, device: str, dtype: str, settings: GenerationSettings,
                 trust_remote_code: bool = False):
        import torch

        self.model_name = name
        self.settings = settings
        self.device = torch.device(device)
        self.processor, self.model = load_vlm(name, device=self.device, dtype=dtype,
                                              trust_remote_code=trust_remote_code)
        self.dtype = self.model.dtype
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"  # generation appends on the right: pad on the left
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        eos = self.model.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id]
        self.eos_ids = {int(e) for e in eos if e is not None}
        self.pad_id = tokenizer.pad_token_id

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model_name,
                "dtype": str(self.dtype).removeprefix("torch.")}

    def _inputs(self, prompts: list[Prompt]):
        texts = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p.text}]}],
            add_generation_prompt=True, tokenize=False) for p in prompts]
        # One list of images per prompt: processors that tile or count images per sample (Idefics3,
        # SmolVLM, Gemma3, Mllama) refuse a flat list for a batch of 2+; the others take both.
        batch = self.processor(text=texts, images=[[p.image] for p in prompts], return_tensors="pt", padding=True)
        return batch.to(self.device)

    def generate(self, prompts: list[Prompt], max_new_tokens: int | None = None) -> list[Reply]:
        import torch

        with torch.inference_mode():
            t0 = time.monotonic()
            batch = self._inputs(prompts)
            kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens or self.settings.max_new_tokens,
                                      "pad_token_id": self.pad_id}
            if self.settings.greedy:
                kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            else:
                torch.manual_seed(self.settings.seed)
                kwargs.update(do_sample=True, temperature=self.settings.temperature, top_p=self.settings.top_p)
            out = self.model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1]:].cpu()
            seconds = (time.monotonic() - t0) / len(prompts)
            prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
            replies = []
            for row, n_prompt in zip(new.tolist(), prompt_tokens):
                stop = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
                tokens = row if stop is None else row[:stop]
                text = self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                replies.append(Reply(text, "length" if stop is None else "stop", int(n_prompt),
                                     len(tokens) + (stop is not None), seconds))
            return replies
