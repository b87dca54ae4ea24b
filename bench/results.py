"""Where every benchmark's markdown block goes: stdout, and appended to --results when given."""

from __future__ import annotations


def emit(lines: list[str], results: str | None) -> None:
    text = "\n".join(lines)
    print(text)
    if results:
        with open(results, "a", encoding="utf-8") as f:
            f.write(text + "\n")
