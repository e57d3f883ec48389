"""Errors that reach the user: each carries its exit code and a message that says what to do.

Exit codes (docs/design.md): 0 ok, 1 finding, 2 usage or input error, 3 runtime failure.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FINDING",
    "EXIT_USAGE",
    "EXIT_RUNTIME",
    "GuardError",
    "UsageError",
    "InputError",
    "UnsafeModelError",
    "ModelLoadError",
    "TextError",
    "RuntimeFailure",
    "first_line",
]

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    return (str(err).strip() or type(err).__name__).splitlines()[0]


class GuardError(Exception):
    """Base class: `str(err)` is the one line the user sees; `exit_code` is what the CLI returns."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(GuardError):
    """An option value is out of range or inconsistent with another."""


class InputError(GuardError):
    """A path or file given by the user cannot be used."""


class UnsafeModelError(GuardError):
    """Loading the model would execute code or unpickle data the user did not opt into."""

    def __init__(self, path, reason: str):
        super().__init__(f"refusing to load {path}: {reason}")
        self.path = path
        self.reason = reason


class ModelLoadError(GuardError):
    """The directory is not a loadable model (no config, unknown architecture, broken weights)."""


class TextError(GuardError):
    """A probe text is empty, too short, or tokenizes to nothing."""


class RuntimeFailure(GuardError):
    """The work could not finish (out of memory, non-finite baseline...)."""

    exit_code = EXIT_RUNTIME
