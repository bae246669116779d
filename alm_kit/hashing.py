"""Content hashes of files (feature-cache keys, checkpoint fingerprints, import provenance), read in blocks."""

from __future__ import annotations

import hashlib
from pathlib import Path


def update_with_file(digest, path: str | Path, block: int = 1 << 20):
    """Feed a file's bytes into a hashlib object; returns it."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest


def file_sha256(path: str | Path) -> str:
    return update_with_file(hashlib.sha256(), path).hexdigest()
