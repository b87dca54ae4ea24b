"""The languages `translate` knows: what the model is told, which script each writes, how long a
translation into it runs, and the checks that tell a translation from a failure.

Checks per sample (docs/translate.md has the table):

- length ratio: non-space characters of the translation over those of the source (protected
  spans left out). For the same content each language writes about `length` non-space
  characters per English one (Chinese 0.4, Japanese and Korean 0.55, German 1.15, ...), so a
  pair's expected ratio is length(to) / length(from) and its band is half to twice that: an
  answer left in the source language, a translation cut short or one looping on itself falls
  outside it. Sources under MIN_RATIO_CHARS are not judged (a word or two varies too much).
- target share: the share of the translation's letters written in the target language. Where
  the target's script is not the source's (English to Chinese, Russian, Arabic...), it is
  counted per character by Unicode script. Where both share a script (English to French,
  Chinese to Japanese), py3langid decides each sentence between the two languages, weighted
  by its letters.
"""

from __future__ import annotations

import bisect
import re
import threading
from dataclasses import dataclass

MIN_RATIO_CHARS = 20     # source non-space characters below which the length ratio is not judged
RATIO_BAND = (0.5, 2.0)  # times the pair's expected ratio
MIN_SEGMENT_LETTERS = 12  # a sentence shorter than this is not given to the language identifier

# Unicode blocks of the scripts the checks tell apart; any other letter counts as "other".
_SCRIPT_RANGES = sorted([
    (0x0041, 0x005A, "Latin"), (0x0061, 0x007A, "Latin"), (0x00C0, 0x024F, "Latin"), (0x1E00, 0x1EFF, "Latin"),
    (0x0370, 0x03FF, "Greek"), (0x1F00, 0x1FFF, "Greek"),
    (0x0400, 0x052F, "Cyrillic"),
    (0x0590, 0x05FF, "Hebrew"), (0xFB1D, 0xFB4F, "Hebrew"),
    (0x0600, 0x06FF, "Arabic"), (0x0750, 0x077F, "Arabic"), (0x08A0, 0x08FF, "Arabic"),
    (0xFB50, 0xFDFF, "Arabic"), (0xFE70, 0xFEFF, "Arabic"),
    (0x0900, 0x097F, "Devanagari"),
    (0x0E00, 0x0E7F, "Thai"),
    (0x1100, 0x11FF, "Hangul"), (0x3130, 0x318F, "Hangul"), (0xAC00, 0xD7AF, "Hangul"),
    (0x3040, 0x309F, "Hiragana"), (0x30A0, 0x30FF, "Katakana"), (0x31F0, 0x31FF, "Katakana"),
    (0xFF66, 0xFF9F, "Katakana"),
    (0x3400, 0x4DBF, "Han"), (0x4E00, 0x9FFF, "Han"), (0xF900, 0xFAFF, "Han"), (0x20000, 0x3134F, "Han"),
])
_STARTS = [r[0] for r in _SCRIPT_RANGES]


def script_of(ch: str) -> str:
    code = ord(ch)
    i = bisect.bisect_right(_STARTS, code) - 1
    if i >= 0 and code <= _SCRIPT_RANGES[i][1]:
        return _SCRIPT_RANGES[i][2]
    return "other"


@dataclass(frozen=True)
class Language:
    code: str                  # as given to --from/--to
    name: str                  # as the model is told
    langid: str                # py3langid's label
    scripts: frozenset[str]    # the scripts its text is written in
    length: float              # non-space characters per English one, for the same content


def _lang(code: str, name: str, scripts: str, length: float, langid: str | None = None) -> Language:
    return Language(code, name, langid or code, frozenset(scripts.split()), length)


LANGUAGES: dict[str, Language] = {lang.code: lang for lang in [
    _lang("en", "English", "Latin", 1.0),
    _lang("zh", "Simplified Chinese", "Han", 0.4),
    _lang("zh-Hant", "Traditional Chinese", "Han", 0.4, langid="zh"),
    _lang("ja", "Japanese", "Han Hiragana Katakana", 0.55),
    _lang("ko", "Korean", "Hangul", 0.55),
    _lang("fr", "French", "Latin", 1.15),
    _lang("de", "German", "Latin", 1.15),
    _lang("es", "Spanish", "Latin", 1.1),
    _lang("it", "Italian", "Latin", 1.1),
    _lang("pt", "Portuguese", "Latin", 1.1),
    _lang("nl", "Dutch", "Latin", 1.1),
    _lang("pl", "Polish", "Latin", 1.1),
    _lang("tr", "Turkish", "Latin", 1.05),
    _lang("vi", "Vietnamese", "Latin", 1.0),
    _lang("id", "Indonesian", "Latin", 1.15),
    _lang("ru", "Russian", "Cyrillic", 1.05),
    _lang("uk", "Ukrainian", "Cyrillic", 1.05),
    _lang("ar", "Arabic", "Arabic", 0.85),
    _lang("fa", "Persian", "Arabic", 0.9),
    _lang("he", "Hebrew", "Hebrew", 0.8),
    _lang("el", "Greek", "Greek", 1.1),
    _lang("hi", "Hindi", "Devanagari", 1.0),
    _lang("th", "Thai", "Thai", 0.9),
]}


def language(code: str) -> Language:
    """The Language of a --from/--to code (case-insensitive); ValueError naming the known ones."""
    found = {c.lower(): lang for c, lang in LANGUAGES.items()}.get(code.strip().lower())
    if found is None:
        raise ValueError(f"unknown language {code!r}; known: {', '.join(LANGUAGES)}")
    return found


def ratio_band(source: Language, target: Language) -> tuple[float, float]:
    expected = target.length / source.length
    return round(expected * RATIO_BAND[0], 3), round(expected * RATIO_BAND[1], 3)


def non_space_chars(text: str) -> int:
    return sum(1 for ch in text if not ch.isspace())


# -- language identification ----------------------------------------------------------------------
_identifier = None
_identifier_lock = threading.Lock()


def identifier():
    """py3langid's model (about 2 s to load), once per process, shared by the loader threads: it is
    only read while classifying."""
    global _identifier
    with _identifier_lock:
        if _identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return _identifier


def _scores(text: str, labels: set[str]) -> dict[str, float]:
    """Probabilities of text over labels alone (renormalised among them)."""
    ranked = {lang: p for lang, p in identifier().rank(text) if lang in labels}
    total = sum(ranked.values()) or 1.0
    return {lang: p / total for lang, p in ranked.items()}


def detect(text: str) -> tuple[Language, float]:
    """The known language text is most likely in, with its probability among the known ones.
    Scripts that only one known language writes decide first (py3langid is unsure on a word of
    Chinese); other text goes to py3langid, restricted to the known languages."""
    letters = [script_of(ch) for ch in text if ch.isalpha()]
    if letters:
        kana = sum(s in ("Hiragana", "Katakana") for s in letters) / len(letters)
        han = sum(s == "Han" for s in letters) / len(letters)
        hangul = sum(s == "Hangul" for s in letters) / len(letters)
        if kana >= 0.1:
            return LANGUAGES["ja"], 1.0
        if hangul >= 0.5:
            return LANGUAGES["ko"], 1.0
        if han >= 0.5:
            return LANGUAGES["zh"], 1.0
    labels = {lang.langid for lang in LANGUAGES.values()}
    scores = _scores(text, labels)
    best = max(scores, key=scores.get)
    code = next(lang for lang in LANGUAGES.values() if lang.langid == best)
    return code, round(scores[best], 4)


_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s*|\n+")


def target_share(text: str, source: Language, target: Language) -> tuple[float | None, str]:
    """(share of text's letters in the target language, method); None where it cannot be told."""
    letters = [ch for ch in text if ch.isalpha()]
    if not letters:
        return None, "none"
    if not target.scripts & source.scripts:
        inside = sum(script_of(ch) in target.scripts for ch in letters)
        return round(inside / len(letters), 4), "script"
    if target.langid == source.langid:
        return None, "none"  # one label for both (Simplified and Traditional Chinese)
    pair = {source.langid, target.langid}
    counted = in_target = 0
    for sentence in _SENTENCE_END.split(text):
        n = sum(1 for ch in sentence if ch.isalpha())
        if n < MIN_SEGMENT_LETTERS:
            continue
        scores = _scores(sentence, pair)
        counted += n
        in_target += n if scores.get(target.langid, 0.0) >= scores.get(source.langid, 0.0) else 0
    if not counted:
        return None, "langid"
    return round(in_target / counted, 4), "langid"
