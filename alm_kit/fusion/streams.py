"""Checks shared by the fusions that lead with one stream (cross-attention queries, Perceiver main stream)."""

from __future__ import annotations

from alm_kit.interfaces import StreamInfo


def leading_stream(kind: str, streams: list[StreamInfo], index: int, key: str) -> StreamInfo:
    """``streams[index]``, after checking that there is something to fuse it with."""
    if len(streams) < 2:
        raise ValueError(f"{kind} fusion needs at least two encoder streams")
    if not 0 <= index < len(streams):
        raise ValueError(f"{key} {index} is not one of the {len(streams)} streams")
    return streams[index]
