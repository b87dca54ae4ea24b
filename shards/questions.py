"""Question pools: image-independent detailed-description questions, used by the captioner (what
it asks) and by the trainer's loader (rewording a stage's caption questions, shards/loader.py).

Each language has disjoint wording sets per training stage, so the early (large, lower-quality)
data and the final (small, high-quality) data never share question words: the model learns to
describe, not to key on one phrasing. The question of a sample is a pure function of the run
seed and the sample key, so reruns and other processes pick the same one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass

LANGS = ("en", "zh")
MAX_QUESTIONS_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    lang: str
    pool: str  # e.g. "en/stage1", or "file:questions.txt"


_BUILTIN: dict[str, dict[str, list[str]]] = {
    "en": {
        "stage1": [
            "Describe this image in detail.",
            "Give a detailed description of what this picture shows.",
            "What is in this image? Describe it thoroughly.",
            "Write a detailed account of everything visible in this picture.",
            "Describe the contents of this image as completely as you can.",
            "Explain in detail what can be seen in this image.",
        ],
        "stage2": [
            "Provide a comprehensive description of the scene, including objects, colors and layout.",
            "Take a careful look and describe every notable element of this photo.",
            "Could you walk me through this image, detail by detail?",
            "Portray this picture in words, covering the main subject, background and style.",
            "Tell me precisely what this image depicts, leaving nothing important out.",
            "Summarize the visual content here in a rich, detailed paragraph.",
        ],
    },
    "zh": {
        "stage1": [
            "详细描述图中有什么？",
            "请详细描述这张图片。",
            "这张图片里有哪些内容？请详细说明。",
            "请尽可能完整地描述图片中的内容。",
            "仔细看这张图，描述你看到的一切。",
            "请对这幅图像进行详细的描述。",
        ],
        "stage2": [
            "请全面介绍画面中的物体、颜色和布局。",
            "用一段细致的文字刻画这张照片的主体、背景和风格。",
            "能逐一说说这幅画面里的各个细节吗？",
            "这幅图展现了怎样的场景？请写得具体一些。",
            "请把图像所呈现的视觉信息完整地讲述出来。",
            "观察这张图片，给出一份详尽的画面说明。",
        ],
    },
}

# Instruct data: the VLM writes a question about the image and its answer, as JSON.
_INSTRUCT_PROMPTS = {
    "en": [
        ('Look at the image and write one question a user might ask about it, then answer it '
         'accurately using only what is visible. Reply with JSON only, in the form '
         '{"question": "...", "answer": "..."}.'),
        ('Create a question-answer pair about this image: a specific question about its content and '
         'a detailed, correct answer. Output a single JSON object with the keys "question" and "answer".'),
    ],
    "zh": [
        ('观察这张图片，提出一个用户可能会问的问题，并只根据图中可见的内容准确作答。'
         '只输出 JSON，格式为 {"question": "...", "answer": "..."}。'),
        ('请针对这张图片生成一个问答对：一个关于图片内容的具体问题，以及详细、正确的回答。'
         '输出一个包含 "question" 和 "answer" 两个键的 JSON 对象。'),
    ],
}
INSTRUCT_RETRY = {
    "en": ('Your previous reply could not be parsed. Reply with exactly one JSON object and nothing '
           'else: {"question": "<a question about the image>", "answer": "<its answer>"}.'),
    "zh": ('上一次的回复无法解析。请只输出一个 JSON 对象，不要输出其他内容：'
           '{"question": "<关于图片的问题>", "answer": "<回答>"}。'),
}


class QuestionError(Exception):
    """A bad --questions file, stage or language; one line for the user."""


def builtin_stages() -> list[str]:
    return sorted({s for pools in _BUILTIN.values() for s in pools})


def builtin_pool(lang: str, stage: str) -> list[Question]:
    if lang not in _BUILTIN:
        raise QuestionError(f"no built-in questions for language {lang!r} (have {', '.join(LANGS)})")
    if stage not in _BUILTIN[lang]:
        raise QuestionError(f"no built-in question stage {stage!r} (have {', '.join(builtin_stages())})")
    tag = "s" + stage.removeprefix("stage")
    return [Question(f"{lang}-{tag}-{i + 1:02d}", text, lang, f"{lang}/{stage}")
            for i, text in enumerate(_BUILTIN[lang][stage])]


def instruct_prompts(lang: str) -> list[Question]:
    return [Question(f"{lang}-instruct-{i + 1:02d}", text, lang, f"{lang}/instruct")
            for i, text in enumerate(_INSTRUCT_PROMPTS[lang])]


def detect_lang(text: str) -> str:
    """zh if the text has CJK ideographs, else en (good enough for question pools)."""
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def load_questions_file(path: str) -> list[Question]:
    """txt: one question per line (ids q001...); json: a list of {"id", "text"[, "lang"]} or a
    {id: text} object. Languages are detected when not given."""
    pool = f"file:{os.path.basename(path)}"
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise QuestionError(f"--questions: {path} is not a regular file")
        if info.st_size > MAX_QUESTIONS_BYTES:
            raise QuestionError(f"--questions: {path} is {info.st_size} bytes; a question file is at most "
                                f"{MAX_QUESTIONS_BYTES // 2**20} MiB")
        with open(path, encoding="utf-8-sig") as f:
            raw = f.read()
    except OSError as exc:
        raise QuestionError(f"--questions: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise QuestionError(f"--questions: {path} is not UTF-8 text (a binary file?)") from None
    if "\0" in raw:
        raise QuestionError(f"--questions: {path} holds NUL bytes: not a text file")
    entries: list[tuple[str, str, str | None]] = []
    if path.endswith(".json"):
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise QuestionError(f"--questions: {path} is not valid json ({exc})") from None
        if isinstance(data, dict):
            data = [{"id": k, "text": v} for k, v in data.items()]
        if not isinstance(data, list):
            raise QuestionError(f"--questions: {path} must hold a list of {{id, text}} or an {{id: text}} object")
        for i, e in enumerate(data):
            if not (isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()):
                raise QuestionError(f"--questions: entry {i} of {path} needs a non-empty \"text\"")
            entries.append((str(e.get("id") or f"q{i + 1:03d}"), e["text"].strip(), e.get("lang")))
    else:
        lines = [ln.strip() for ln in raw.splitlines()]
        entries = [(f"q{i + 1:03d}", ln, None) for i, ln in enumerate(x for x in lines if x and not x.startswith("#"))]
    if not entries:
        raise QuestionError(f"--questions: {path} holds no questions")
    ids = [e[0] for e in entries]
    if len(set(ids)) != len(ids):
        raise QuestionError(f"--questions: duplicate ids in {path}")
    return [Question(qid, text.replace("<image>", "").strip(), lang or detect_lang(text), pool)
            for qid, text, lang in entries]


def _unit(seed: int, key: str, salt: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}\0{salt}".encode()).digest()[:8], "big")


@dataclass
class QuestionPicker:
    """Picks a sample's question (or instruct prompt) from --lang/--stage or a --questions file."""

    lang: str = "en"                       # en | zh | mix
    stage: str = "stage1"
    custom: list[Question] | None = None   # replaces the built-in pools

    def __post_init__(self):
        if self.lang not in (*LANGS, "mix"):
            raise QuestionError(f"--lang must be one of {', '.join(LANGS)}, mix")
        if self.custom is None:
            for lang in LANGS:
                builtin_pool(lang, self.stage)  # fail early on an unknown stage

    def language(self, seed: int, key: str) -> str:
        if self.lang != "mix":
            return self.lang
        return LANGS[_unit(seed, key, "lang") % len(LANGS)]

    def caption_question(self, seed: int, key: str) -> Question:
        if self.custom is not None:
            pool = self.custom
        else:
            pool = builtin_pool(self.language(seed, key), self.stage)
        return pool[_unit(seed, key, "question") % len(pool)]

    def instruct_prompt(self, seed: int, key: str) -> Question:
        prompts = instruct_prompts(self.language(seed, key))
        return prompts[_unit(seed, key, "instruct") % len(prompts)]


def format_pools(custom: list[Question] | None = None) -> str:
    """What `ddaug caption --list-questions` prints."""
    lines = []
    groups = [(None, custom)] if custom else [(f"{lang}/{stage}", builtin_pool(lang, stage))
                                              for lang in LANGS for stage in builtin_stages()]
    if not custom:
        groups += [(f"{lang}/instruct (prompts for --task instruct)", instruct_prompts(lang)) for lang in LANGS]
    for title, questions in groups:
        lines.append(f"[{title or questions[0].pool}]")
        lines += [f"  {q.id:<14} {q.text}" for q in questions]
    return "\n".join(lines)
