"""Run several fusions one after another, e.g. ALARM's adapters and then cross-attention.

Every step but the last maps streams to streams (``Fusion.forward_streams``: the ``downsample``
adapters); the last one joins them into one stream. Steps are named like ``model.fusion`` itself
and resolved through the same registry, so plugin fusions can be steps too::

    fusion:
      name: chain
      params:
        steps:
          - {name: downsample, params: {target_rate: 25, width: 1024}}   # adapters, not joined
          - {name: cross_attention, params: {num_heads: 16}}              # joins
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from alm_kit.interfaces import AudioFeatures, Fusion, StreamInfo
from alm_kit.registry.build import resolve_component


@dataclass
class FusionStep:
    """One step: a registered fusion and its params, as a recipe's ``model.fusion`` entry."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


class ChainFusion(Fusion):
    """Fusions in sequence: each inner step hands its streams to the next; the last one joins."""

    @dataclass
    class Config:
        steps: list[FusionStep]
        #: (class, validated Config) of every step, filled in when the recipe is read
        resolved: list[tuple[type, Any]] = field(default_factory=list, init=False, repr=False, compare=False)

        def __post_init__(self) -> None:
            if len(self.steps) < 2:
                raise ValueError("steps must list at least two fusions (a single one goes in model.fusion itself)")
            # a step's ConfigError (key steps.N...) is reported below model.fusion.params by the caller
            self.resolved = [resolve_component("fusion", step, f"steps.{i}") for i, step in enumerate(self.steps)]

    def __init__(self, config: Config, streams: list[StreamInfo]) -> None:
        super().__init__(config, streams)
        steps: list[Fusion] = []
        infos = streams
        for i, (cls, step_config) in enumerate(config.resolved):
            step = cls(step_config, infos)
            steps.append(step)
            if i == len(config.resolved) - 1:
                break
            if step.stream_infos is None:
                raise ValueError(f"steps.{i} ({config.steps[i].name}) only joins streams, so it can only be the "
                                 "last step; inner steps hand streams on (e.g. downsample)")
            infos = step.stream_infos
        self.steps = nn.ModuleList(steps)
        self.info = steps[-1].info
        self.stream_infos = steps[-1].stream_infos

    def forward_streams(self, features: list[AudioFeatures]) -> list[AudioFeatures]:
        for step in self.steps:
            features = step.forward_streams(features)
        return features

    def forward(self, features: list[AudioFeatures]) -> AudioFeatures:
        for step in self.steps[:-1]:
            features = step.forward_streams(features)
        return self.steps[-1](features)
