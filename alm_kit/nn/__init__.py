"""Shared building blocks (masks, pooling, masked normalisation); written once, used by every component."""
