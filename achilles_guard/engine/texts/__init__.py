"""Default probe texts: short paragraphs in different genres, written for this project."""

from __future__ import annotations

from importlib import resources

__all__ = ["default_texts"]


def default_texts() -> list[tuple[str, str]]:
    """`[(name, text)]` of the packaged probe texts, in a fixed order."""
    files = sorted(f for f in resources.files(__package__).iterdir() if f.name.endswith(".txt"))
    return [(f.name.removesuffix(".txt"), f.read_text(encoding="utf-8").strip()) for f in files]
