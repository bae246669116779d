"""What a WAV header says that libsndfile keeps to itself: a file whose sample data ends early.

libsndfile decodes such a file without a word (only the samples present); a copy or a download
cut off midway looks like this, and training or evaluating on it silently uses a shorter clip.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

from alm_kit.errors import AlmKitWarning


def wav_shortfall(source: str | Path | io.BytesIO) -> tuple[int, int] | None:
    """(bytes of samples the header declares, bytes present) when a WAV file ends early, else None.

    Other formats, and streamed WAVs (data size 0 or 0xFFFFFFFF), give None.
    """
    f = open(source, "rb") if isinstance(source, (str, Path)) else source
    try:
        f.seek(0)
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        while len(chunk := f.read(8)) == 8:
            size = int.from_bytes(chunk[4:], "little")
            if chunk[:4] == b"data":
                start = f.tell()
                present = f.seek(0, io.SEEK_END) - start
                return (size, present) if 0 < size < 0xFFFFFFFF and present < size else None
            f.seek(size + (size & 1), io.SEEK_CUR)
        return None
    finally:
        if f is not source:
            f.close()


def warn_if_cut_short(source: str | Path | io.BytesIO, name: str) -> None:
    """A warning (:class:`AlmKitWarning`) naming ``name`` when ``source`` is a WAV cut short."""
    short = wav_shortfall(source)
    if short is not None:
        warnings.warn(f"{name}: WAV data cut short: the header declares {short[0]} bytes of samples, the file "
                      f"holds {short[1]} ({short[1] / short[0]:.0%}); only those are used", AlmKitWarning,
                      stacklevel=2)
