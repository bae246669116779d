"""Stream shapes and parameter counts of every built-in encoder and fusion module at the papers' sizes.

Everything is built from recipe entries through the registry, with random weights (nothing is
downloaded; Whisper is built on the meta device, the laion-clap models on the CPU). Prints the
Markdown tables of docs/components.md ("Sizes at the papers' settings"); regenerate them with

    HF_HUB_OFFLINE=1 python benchmarks/param_counts.py [--llm-width 2560]

Takes about a minute (HTSAT-large alone is 280M parameters); ``--quick`` skips HTSAT-large and PANN.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from alm_kit.config.schema import ComponentConfig
from alm_kit.interfaces import StreamInfo
from alm_kit.registry.build import build_component

#: laion-clap's fixed STFT and mel weights (buffers in alm-kit: they never train); counted, and shown apart
FRONT_END = ("spectrogram_extractor", "logmel_extractor")
#: HTS-AT with CLAP's audio settings (48 kHz, hop 480, 10 s), as TinyGiantALM's event stream
HTSAT_48K = {"sample_rate": 48000, "hop_size": 480, "clip_seconds": 10.0, "output": "fine_grained"}


@dataclass
class Row:
    label: str
    entry: str
    used_in: str
    info: StreamInfo
    params: int
    front_end: int = 0
    input: str = ""


def count(module: torch.nn.Module) -> tuple[int, int]:
    """(parameters + fixed front-end weights, the fixed front-end weights): the totals the papers report."""
    fixed = sum(b.numel() for n, b in module.named_buffers() if any(k in n for k in FRONT_END))
    return sum(p.numel() for p in module.parameters()) + fixed, fixed


def entry_text(name: str, params: dict[str, Any]) -> str:
    inner = ", ".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in params.items())
    return f"`{name}` {{{inner}}}" if params else f"`{name}`"


def build_encoder(name: str, params: dict[str, Any]) -> torch.nn.Module:
    spec = ComponentConfig(name, dict(params))
    if name == "whisper":  # 635M parameters: shapes only
        with torch.device("meta"):
            return build_component("encoder", spec, "model.encoders.0")
    return build_component("encoder", spec, "model.encoders.0")


def rate(info: StreamInfo) -> str:
    return "—" if info.frame_rate is None else f"{info.frame_rate:g}"


def frames(info: StreamInfo) -> str:
    return f"{info.num_frames if info.num_frames is not None else 'T'} × {info.frame_dim}"


def encoder_rows(quick: bool) -> tuple[list[Row], dict[str, StreamInfo]]:
    specs = [
        ("Whisper large-v3, 4 taps", "whisper", {"size": "large-v3", "layers": [7, 15, 23, 31]}, "ALARM", "large-v3"),
        ("Whisper large-v3-turbo", "whisper", {"size": "large-v3-turbo"}, "TinyGiantALM", "turbo"),
        ("HTS-AT as in Mellow (SED)", "htsat", {}, "Mellow", "htsat-mellow"),
        ("HTS-AT at CLAP's settings", "htsat", HTSAT_48K, "TinyGiantALM", "htsat-48k"),
        ("CLAP HTSAT-tiny (embedding)", "clap", {"model": "HTSAT-tiny"}, "TinyGiantALM", "clap-tiny"),
        ("CLAP HTSAT-tiny (frames)", "clap", {"model": "HTSAT-tiny", "frames": True}, "ALARM-style", "clap-tiny-frames"),
        ("CLAP HTSAT-base (frames)", "clap", {"model": "HTSAT-base", "frames": True}, "", "clap-base"),
    ]
    if not quick:
        specs += [
            ("CLAP HTSAT-large (frames)", "clap", {"model": "HTSAT-large", "frames": True}, "", "clap-large"),
            ("CLAP PANN-14 (frames)", "clap", {"model": "PANN-14", "frames": True}, "", "pann-14"),
            ("CLAP PANN-10 (frames)", "clap", {"model": "PANN-10", "frames": True}, "", "pann-10"),
            ("CLAP PANN-6 (frames)", "clap", {"model": "PANN-6", "frames": True}, "", "pann-6"),
        ]
    rows, infos = [], {}
    for label, name, params, used_in, key in specs:
        enc = build_encoder(name, params)
        total, fixed = count(enc)
        s = enc.spec
        where = f"{s.sample_rate / 1000:g} kHz, {s.clip_seconds:g} s ({s.clip_samples:,} samples), pad {s.pad}"
        rows.append(Row(label, entry_text(name, params), used_in, enc.info, total, fixed, where))
        infos[key] = enc.info
        del enc
    return rows, infos


def fusion_rows(infos: dict[str, StreamInfo], llm_width: int) -> list[Row]:
    tga = [infos["turbo"], infos["htsat-48k"], infos["clap-tiny"]]
    alarm = [infos["large-v3"], infos["htsat-48k"], infos["clap-tiny-frames"]]
    adapters = {"target_rate": 25, "width": 1024, "output_dim": llm_width}
    cross = {"hidden_dim": 1024, "num_heads": 16, "ffn_ratio": 4.0}
    perceiver = {"num_latents": 20, "hidden_dim": 768, "num_heads": 4, "num_layers": 6, "ffn_ratio": 1.0}
    specs = [
        ("concat (N = 300)", "concat", {"length": 300, "temporal_only": True}, "TinyGiantALM", tga,
         "Whisper-turbo + HTS-AT 48 kHz + CLAP-tiny"),
        ("concat, every stream's frames", "concat", {"length": 300}, "", tga,
         "Whisper-turbo + HTS-AT 48 kHz + CLAP-tiny"),
        ("downsample (adapters, joined)", "downsample", adapters, "ALARM adapters", alarm,
         "Whisper large-v3 + HTS-AT 48 kHz + CLAP-tiny frames"),
        ("chain: adapters → cross_attention", "chain",
         {"steps": [{"name": "downsample", "params": adapters}, {"name": "cross_attention", "params": cross}]},
         "ALARM-CA", alarm, "as above"),
        ("chain: Whisper adapter → perceiver", "chain",
         {"steps": [{"name": "downsample", "params": {**adapters, "adapt": [True, False, False]}},
                    {"name": "perceiver", "params": perceiver}]},
         "ALARM-P", alarm, "as above"),
    ]
    rows = []
    for label, name, params, used_in, streams, inputs in specs:
        fusion = build_component("fusion", ComponentConfig(name, params), "model.fusion", streams)
        total, _ = count(fusion)
        entry = entry_text(name, params) if name != "chain" else "`chain` {steps: " + " → ".join(
            entry_text(s["name"], s["params"]) for s in params["steps"]) + "}"
        parts = ""
        if name == "chain":
            parts = " (" + " + ".join(f"{count(step)[0]:,}" for step in fusion.steps) + ")"
        rows.append(Row(label, entry, used_in, fusion.info, total, input=inputs + parts))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llm-width", type=int, default=2560,
                        help="decoder width the ALARM adapters map to (2560: Qwen3-4B, the paper; 1024: Qwen3-0.6B)")
    parser.add_argument("--quick", action="store_true", help="skip HTSAT-large and the PANN models")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)

    encoders, infos = encoder_rows(args.quick)
    print("| encoder | recipe entry | used in | input | frames (T × D) | frames/s | pooled | parameters |")
    print("|---|---|---|---|---|---|---|---|")
    for r in encoders:
        fixed = f" (fixed STFT/mel: {r.front_end:,})" if r.front_end else ""
        print(f"| {r.label} | {r.entry} | {r.used_in} | {r.input} | {frames(r.info)} | {rate(r.info)} | "
              f"{r.info.pooled_dim or '—'} | **{r.params:,}**{fixed} |")
    by_label = {r.label: r.params for r in encoders}
    tga = sum(by_label[k] for k in ("Whisper large-v3-turbo", "HTS-AT at CLAP's settings",
                                    "CLAP HTSAT-tiny (embedding)"))
    print(f"\nTinyGiantALM's three encoders (Whisper-turbo + HTS-AT + CLAP HTSAT-tiny): {tga:,} parameters.")

    print(f"\nFusion modules (ALARM sizes with a decoder width of {args.llm_width}):\n")
    print("| fusion | recipe entry | used in | streams in | frames out (T × D) | frames/s | pooled | parameters |")
    print("|---|---|---|---|---|---|---|---|")
    for r in fusion_rows(infos, args.llm_width):
        print(f"| {r.label} | {r.entry} | {r.used_in} | {r.input} | {frames(r.info)} | {rate(r.info)} | "
              f"{r.info.pooled_dim or '—'} | **{r.params:,}** |")


if __name__ == "__main__":
    main()
