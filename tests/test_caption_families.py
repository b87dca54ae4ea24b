"""The transformers backend batches every VLM family: tiny random models of five families,
built in code, caption the same images with --batch-size 4 and --batch-size 1, and the answers
match. A family's missing optional dependency is one line naming the package."""

from __future__ import annotations

import json
import pytest
import torch
from PIL import Image

from conftest import invoke, read_samples, sample_meta

# A minimal chat template: the family's image placeholder where the image goes.
_TEMPLATE = ("{% for m in messages %}<|u|>{% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
             "{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|e|>{% endfor %}"
             "{% if add_generation_prompt %}<|a|>{% endif %}")
_IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"] + \
    [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def _tokenizer(specials: list[str], bos: str, **extra):
    """A byte-level BPE tokenizer with a fixed vocabulary (special tokens, then the 256 byte
    symbols) and no merges. Trained merges would not do: tokenizers' trainer breaks frequency
    ties in a per-process random order, so the vocabulary, and the random model's answers with
    it, changed from run to run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<pad>", bos, "<|e|>", "<|u|>", "<|a|>", *specials]
    vocab = {tok: i for i, tok in enumerate(symbols + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens(symbols)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token="<|e|>", pad_token="<pad>", **extra)


def _text_config(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, **kw)


def _llava():
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = _tokenizer(["<image>"], "<s>")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 28},
                                                             crop_size={"height": 28, "width": 28}),
                          tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1, chat_template=_TEMPLATE.replace("IMAGE", "<image>"))
    cfg = LlavaConfig(vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14,
                                         projection_dim=32),
                      text_config=dict(model_type="llama", **_text_config(tok)),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default")
    return proc, LlavaForConditionalGeneration(cfg)


def _idefics3():
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessor,
                              Idefics3Processor)

    tok = _tokenizer(_IDEFICS_TOKENS, "<s>")
    # 28-pixel tiles, up to 2x2 of them plus the global image: images are split per sample.
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessor(size={"longest_edge": 56},
                                                                    max_image_size={"longest_edge": 28}),
                             tokenizer=tok, image_seq_len=1, chat_template=_TEMPLATE.replace("IMAGE", "<image>"))
    cfg = Idefics3Config(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=28, patch_size=14),
                         text_config=dict(model_type="llama", **_text_config(tok)), scale_factor=2,
                         image_token_id=tok.convert_tokens_to_ids("<image>"))
    return proc, Idefics3ForConditionalGeneration(cfg)


def _gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    marks = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = _tokenizer(list(marks.values()), "<bos>", extra_special_tokens=marks)
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessor(size={"height": 28, "width": 28}), tokenizer=tok,
                           image_seq_length=4, chat_template=_TEMPLATE.replace("IMAGE", "<start_of_image>"))
    ids = {k: tok.convert_tokens_to_ids(v) for k, v in marks.items()}
    cfg = Gemma3Config(text_config=_text_config(tok, head_dim=8, sliding_window=64),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, image_size=28, patch_size=7),
                       mm_tokens_per_image=4, image_token_id=ids["image_token"], boi_token_id=ids["boi_token"],
                       eoi_token_id=ids["eoi_token"])
    return proc, Gemma3ForConditionalGeneration(cfg)


def _mllama():
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    tok = _tokenizer(["<|image|>", "<|python_tag|>"], "<|begin_of_text|>")
    proc = MllamaProcessor(image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=2),
                           tokenizer=tok, chat_template=_TEMPLATE.replace("IMAGE", "<|image|>"))
    cfg = MllamaConfig(text_config=_text_config(tok, cross_attention_layers=[1]),
                       vision_config=dict(image_size=28, patch_size=14, hidden_size=32, intermediate_layers_indices=[0],
                                          vision_output_dim=64, num_hidden_layers=2, num_global_layers=1,
                                          attention_heads=2, intermediate_size=64, max_num_tiles=2,
                                          supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
                       image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    return proc, MllamaForConditionalGeneration(cfg)


FAMILIES = {"llava": _llava, "idefics3": _idefics3, "gemma3": _gemma3, "mllama": _mllama}


def _save(folder, build) -> str:
    torch.manual_seed(0)
    processor, model = build()
    model.eval()
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def same_bucket_dir(tmp_path, photos):
    """Four photos at different aspect ratios but nearly equal pixel counts: one batch of 4."""
    d = tmp_path / "imgs"
    d.mkdir()
    for (name, arr), size in zip(photos.items(), [(96, 72), (72, 96), (90, 76), (84, 84)]):
        Image.fromarray(arr).resize(size).save(d / f"{name}.png")
    return d


def _answers(folder) -> dict[str, str]:
    return {k: sample_meta(m)["messages"][1]["content"] for k, m in read_samples(folder).items()}


@pytest.mark.parametrize("family", ["qwen2-vl", *FAMILIES])
def test_every_family_batches_with_the_same_answers_as_one_by_one(family, tmp_path, same_bucket_dir):
    from ddaug.captioning import save_tiny_vlm

    folder = save_tiny_vlm(str(tmp_path / family)) if family == "qwen2-vl" else _save(tmp_path / family,
                                                                                       FAMILIES[family])
    runs = {}
    for batch in (4, 1):
        out = tmp_path / f"out{batch}"
        result = invoke("-v", "caption", same_bucket_dir, "-o", out, "--vlm", folder, "--device", "cpu",
                        "--max-new-tokens", 6, "--batch-size", batch)
        # the batch ran as one: no fall-back to one image at a time
        assert "one by one" not in result.output, result.output
        failed = (out / "failures.jsonl").read_text().splitlines() if (out / "failures.jsonl").exists() else []
        # a random model may end an answer at once ("empty answer"): the same in both runs
        runs[batch] = (_answers(out), sorted(json.loads(line)["key"] for line in failed))
    assert runs[4] == runs[1]
    assert len(runs[4][0]) >= 3 and len(runs[4][0]) + len(runs[4][1]) == 4


def test_a_missing_optional_dependency_is_one_line(tmp_path, same_bucket_dir, monkeypatch):
    """SmolVLM's processor needs num2words; without it the run ends with one line naming it."""
    import transformers.models.smolvlm.processing_smolvlm as smolvlm_processing
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    monkeypatch.setattr(smolvlm_processing, "num2words", str)  # present while the folder is made
    tok = _tokenizer(_IDEFICS_TOKENS, "<s>")
    SmolVLMProcessor(image_processor=SmolVLMImageProcessor(size={"longest_edge": 56},
                                                           max_image_size={"longest_edge": 28}),
                     tokenizer=tok, video_processor=SmolVLMVideoProcessor(), image_seq_len=1,
                     chat_template=_TEMPLATE.replace("IMAGE", "<image>")).save_pretrained(tmp_path / "smolvlm")
    monkeypatch.setattr(smolvlm_processing, "num2words", None)  # what transformers sets when it is not installed
    result = invoke("caption", same_bucket_dir, "-o", tmp_path / "out", "--vlm", tmp_path / "smolvlm",
                    "--device", "cpu", expect_ok=False)
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "num2words" in lines[0] and "pip install num2words" in lines[0], result.output
    assert not (tmp_path / "out" / "run.json").exists()  # the corrected command is not refused
