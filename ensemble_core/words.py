"""Counted words in what the project prints: ``1 job``, ``2 jobs``, never ``1 jobs``."""

from __future__ import annotations


def plural(count: int, word: str, many: str | None = None) -> str:
    """``count`` and ``word``, the plural (``many``, else ``word`` + "s") unless ``count`` is 1."""
    return f"{count} {word if count == 1 else (many or word + 's')}"


def every(count: int, word: str, many: str | None = None) -> str:
    """``the 1 job`` or ``all 5 jobs``: every one of ``count`` things."""
    return f"the {plural(count, word, many)}" if count == 1 else f"all {plural(count, word, many)}"
