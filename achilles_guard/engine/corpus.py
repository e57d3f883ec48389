"""Documents of a local corpus: a .txt/.raw file, a .jsonl file (one document per line) or a directory.

    docs = load_corpus(Path("wiki.test.raw"))      # ["...whole file..."]

Read by `guard eval`, the studies (research/evaluation.py tokenizes and windows them) and the
`finetune` defence (its training text).
"""

from __future__ import annotations

import json
from pathlib import Path

from achilles_guard.errors import InputError

__all__ = ["CORPUS_SUFFIXES", "load_corpus"]

CORPUS_SUFFIXES = (".txt", ".raw", ".jsonl")


def load_corpus(path: Path, *, text_field: str = "text", max_documents: int | None = None) -> list[str]:
    """Documents from a .txt/.raw file (one document), a .jsonl file (one per line) or a directory of them."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CORPUS_SUFFIXES)
        if not files:
            raise InputError(f"--data {path}: the directory holds no {', '.join(CORPUS_SUFFIXES)} files")
    elif path.is_file():
        files = [path]
    else:
        raise InputError(f"--data {path}: no such file or directory")
    docs: list[str] = []
    for file in files:
        docs.extend(_read_documents(file, text_field))
        if max_documents is not None and len(docs) >= max_documents:
            docs = docs[:max_documents]
            break
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise InputError(f"--data {path}: no text found (empty files, or no {text_field!r} field in the JSON lines)")
    return docs


def _read_documents(file: Path, text_field: str) -> list[str]:
    try:
        content = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"--data {file}: cannot read it as UTF-8 text ({err})") from None
    if file.suffix != ".jsonl":
        return [content]
    docs = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"--data {file}:{number}: not a JSON line ({err.msg})") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if isinstance(value, str):
            docs.append(value)
    return docs
