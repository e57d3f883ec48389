"""The files a model directory's loaders read besides the weights: tokenizer, chat template, generation config.

Swapping two entries of `tokenizer.json`'s vocabulary, or editing the chat template, changes what
the served model says without touching one weight. The fingerprint therefore records the sha256 of
each such file's exact bytes (and which of them were absent), and verify compares them:

    digests = loader_file_digests(root)          # {"tokenizer.json": "9f2c...", ...} at scan time
    check = check_loader_files(root, digests)    # at verify time: FileCheck(findings=(FileFinding...))

A file counts as a loader file unless it is known that no loader reads it: every top-level regular
file except the weights, config.json, documentation, licences, images and hidden files, plus the
subfolders in `LOADER_GLOBS`. `LOADER_FILES` names the roles of the usual ones (what transformers'
`AutoTokenizer`, `GenerationConfig` and processors read); `*.py` is remote code (`trust_remote_code`,
which a serving stack may enable even though guard never does). A loader
file that appears after the scan (a new `chat_template.jinja` overrides the template inside
`tokenizer_config.json`) or disappears (a missing `generation_config.json` changes the sampling
defaults) is a finding as much as a changed one. The other regular files of the directory (README,
licence) are listed as not covered, so a verdict says what it did not look at. config.json has its own
check (canonical form) and the weights theirs (tensor records).

A GGUF file carries its tokenizer and chat template in its metadata, which the GGUF metadata digest
covers; transformers' GGUF tokenizer does not read files next to it, so there is nothing to record.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LOADER_FILES", "LOADER_GLOBS", "FileFinding", "FileCheck", "loader_file_digests", "check_loader_files"]

LOADER_FILES = {
    "tokenizer.json": "tokenizer",
    "tokenizer_config.json": "tokenizer",
    "special_tokens_map.json": "tokenizer",
    "added_tokens.json": "tokenizer",
    "vocab.json": "tokenizer",
    "vocab.txt": "tokenizer",
    "merges.txt": "tokenizer",
    "tokenizer.model": "tokenizer",
    "spiece.model": "tokenizer",
    "sentencepiece.bpe.model": "tokenizer",
    "chat_template.jinja": "chat template",
    "chat_template.json": "chat template",
    "generation_config.json": "generation config",
    "preprocessor_config.json": "processor",
    "processor_config.json": "processor",
}
LOADER_GLOBS = (  # files in subfolders that loaders read
    ("additional_chat_templates/*.jinja", "chat template"),
    ("custom_generate/*.py", "remote code"),
)
# Top-level files no loader reads: documentation, licences, images, hidden files, guard's own red-team marker.
# Everything else at the top level that is neither a weight file nor config.json counts as a loader input,
# so a tokenizer class with its own vocabulary file name (`*.spm`, `bpe.codes`, `tekken.json`...) is covered too.
_NOT_LOADED_SUFFIXES = (".md", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp", ".pdf")
_NOT_LOADED_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "COPYING", "USE_POLICY", ".")
_NOT_LOADED_NAMES = {"TAMPERED_BY_GUARD.json", "achilles-guard-source.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".gguf", ".bin", ".bin.index.json", ".pt", ".pth",
                    ".ckpt", ".h5", ".msgpack", ".onnx")
_OWN_CHECK = {"config.json"}  # compared in canonical form by the config check


def _top_level_role(name: str) -> str | None:
    """A top-level file's role for the loaders, None when no loader reads it (or it has its own check)."""
    if name in LOADER_FILES:
        return LOADER_FILES[name]
    if name in _OWN_CHECK or name in _NOT_LOADED_NAMES or name.endswith(_WEIGHT_SUFFIXES):
        return None
    if name.endswith(_NOT_LOADED_SUFFIXES) or name.upper().startswith(_NOT_LOADED_PREFIXES):
        return None
    if name.endswith(".py"):
        return "remote code"
    if name.endswith((".tiktoken", ".model", ".spm")):
        return "tokenizer"
    if name.endswith(".jinja"):
        return "chat template"
    return "loader input"


@dataclass(frozen=True)
class FileFinding:
    name: str  # relative to the model directory, "/" separated
    role: str  # tokenizer | chat template | generation config | processor | remote code
    kind: str  # changed | missing | added
    expected_sha256: str | None
    actual_sha256: str | None

    @property
    def detail(self) -> str:
        return {
            "changed": "bytes differ from the fingerprinted file",
            "missing": "was fingerprinted but is gone (the loader now falls back to a default)",
            "added": "is new since the scan (the loader reads it, and it may override what was fingerprinted)",
        }[self.kind]


@dataclass(frozen=True)
class FileCheck:
    recorded: bool  # the fingerprint records loader files (False: written before guard recorded them)
    compared: tuple[str, ...]  # loader files compared (recorded or present now), sorted
    findings: tuple[FileFinding, ...]
    uncovered: tuple[str, ...]  # other regular files of the directory that no check reads (README.md...)
    unchecked: tuple[str, ...] = ()  # loader files present now but not compared (the fingerprint records none)


def _role(name: str) -> str | None:
    path = Path(name)
    if len(path.parts) == 1:
        return _top_level_role(name)
    return next((role for pattern, role in LOADER_GLOBS if path.match(pattern) and
                 len(path.parts) == len(Path(pattern).parts)), None)


def _present(root: Path) -> dict[str, str]:
    """Loader files of `root` -> role, following symlinks; only regular files (never a device or a FIFO)."""
    out = {p.name: role for p in root.iterdir() if (role := _top_level_role(p.name)) and p.is_file()}
    for pattern, role in LOADER_GLOBS:
        for path in root.glob(pattern):
            if path.is_file():
                out.setdefault(path.relative_to(root).as_posix(), role)
    return out


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()  # streamed: memory bounded by the buffer


def loader_file_digests(root: str | Path) -> dict[str, str]:
    """{relative name: sha256 of its bytes} for every loader file present in the directory `root`."""
    root = Path(root)
    return {name: _sha256(root / name) for name in sorted(_present(root))}


def _uncovered(root: Path, loader: set[str]) -> tuple[str, ...]:
    return tuple(sorted(
        p.name for p in root.iterdir()
        if p.is_file() and p.name not in loader and p.name not in _OWN_CHECK and not p.name.endswith(_WEIGHT_SUFFIXES)
    ))


def check_loader_files(root: str | Path, recorded: dict[str, str] | None) -> FileCheck:
    """The loader files of `root` against the fingerprint's record (None: it has none; nothing compared)."""
    root = Path(root)
    present = _present(root)
    uncovered = _uncovered(root, set(present))
    if recorded is None:
        return FileCheck(False, (), (), uncovered, unchecked=tuple(sorted(present)))
    actual = {name: _sha256(root / name) for name in present}
    findings = []
    for name in sorted(set(recorded) | set(actual)):
        want, have = recorded.get(name), actual.get(name)
        if want == have:
            continue
        kind = "missing" if have is None else "added" if want is None else "changed"
        findings.append(FileFinding(name, present.get(name) or _role(name) or "loader file", kind, want, have))
    return FileCheck(True, tuple(sorted(set(recorded) | set(actual))), tuple(findings), uncovered)
