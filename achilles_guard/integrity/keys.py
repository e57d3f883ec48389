"""Signing keys for fingerprints (HMAC-SHA256): read from a key file or `env:VARIABLE`, never from the
command line itself. No torch here: `guard fleet` checks a key before it starts any worker."""

from __future__ import annotations

import os
from pathlib import Path

from achilles_guard.errors import UsageError

__all__ = ["MIN_KEY_BYTES", "read_key"]

MIN_KEY_BYTES = 16


def read_key(spec: str) -> bytes:
    """A signing key from `env:VAR` or a file path (never the secret itself on the command line)."""
    if spec.startswith("env:"):
        value = os.environ.get(spec[4:])
        if not value:
            raise UsageError(f"signing key: environment variable {spec[4:]} is not set or empty")
        key = value.encode().strip()
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"signing key {spec!r}: give a key file path (a regular file) or env:VARIABLE")
        key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:  # one rule for env: keys and key files
        raise UsageError(f"signing key {spec}: too short ({len(key)} bytes); use at least {MIN_KEY_BYTES} random bytes")
    return key
