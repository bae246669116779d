"""Training throughput with frozen encoders: encoding every step vs. the feature cache, one process.

    python benchmarks/train_throughput.py [--threads 2] [--steps 16] [--warmup 3] [--examples 48]

A TinyGiantALM-shaped recipe scaled down (random weights, nothing downloaded): three frozen
encoders -- Whisper (16 kHz), HTS-AT (48 kHz) and CLAP (48 kHz, the pooled anchor) -- on 10 s
clips, concat fusion to a fixed number of tokens, the query-guided E-Branchformer projector and
a small Llama-style decoder trained in full (``tokenizer: builtin:tiny``); the encoders hold
about as many parameters as the decoder, as in the paper (732M vs 0.6B).

(a) ``training.cache_features=off``: decode + resample + the three encoders every step;
(b) ``training.cache_features=disk``: features read from the disk cache (built beforehand with
    the same code as ``alm-kit cache``, whose time is reported).

Both runs go through the real engine (``Trainer.fit``); samples/s is measured from the
engine's metrics (the median step time over ``--repeats`` alternating runs, after ``--warmup``
steps each, so that a busy neighbour on a shared CPU slows a few steps rather than the figure).
f = median share of (a)'s step time spent inside the encoders' forward (timed with forward
hooks), so the ideal speed-up from caching is
1/(1-f). Targets (issue 3): actual/ideal >= 0.9 and actual >= 2x. Also printed: peak resident
memory during each phase (sampled from /proc/self/statm) and, on CUDA, peak allocated memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

SECONDS = 10.0
#: proportions of the paper's model: encoders ~1.2x the decoder's parameters (732M vs 0.6B), a
#: projector of 2 blocks at the decoder's width against a much deeper decoder
DECODER = {
    "model_type": "llama", "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 12,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
}
WHISPER = {"size": "tiny", "n_state": 256, "n_head": 4, "n_layer": 3, "clip_seconds": SECONDS, "pad": "zero"}
HTSAT = {  # AudioSet HTS-AT at CLAP's 48 kHz / hop 480 settings, narrower
    "output": "fine_grained", "sample_rate": 48000, "clip_seconds": SECONDS, "window_size": 1024,
    "hop_size": 480, "mel_bins": 64, "fmax": 14000, "spec_size": 256, "embed_dim": 24,
    "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8], "repeat_frames": False, "drop_path_rate": 0.0,
}
CLAP = {"model": "HTSAT-tiny", "clip_seconds": SECONDS, "embed_dim": 16, "depths": [1, 1, 1, 1],
        "num_heads": [1, 2, 4, 8], "joint_dim": 256}


def recipe_dict(manifest: Path, out: Path, cache_dir: Path, threads: int, batch: int) -> dict:
    return {
        "name": "throughput",
        "model": {
            "encoders": [
                {"name": "whisper", "train": "frozen", "params": WHISPER},
                {"name": "htsat", "train": "frozen", "params": HTSAT},
                {"name": "clap", "train": "frozen", "params": CLAP},
            ],
            "fusion": {"name": "concat", "params": {"length": 64}},  # the paper: 300 tokens
            "projector": {"name": "ebranchformer", "params": {
                "num_blocks": 2, "num_heads": 4, "cgmlp_units": 384, "ffn_units": 384, "dropout": 0.0,
                "gate_slice": [256 + 192, 256 + 192 + 256]}},  # CLAP's anchor after whisper + htsat pooled
            "decoder": {"name": "causal_lm", "params": {"tokenizer": "builtin:tiny", "config": DECODER}},
            "layout": {"name": "placeholder", "params": {}},
        },
        "data": {"train": str(manifest)},
        "training": {"output_dir": str(out), "batch_size": batch, "lr": 1e-4, "seed": 0, "device": "cpu",
                     "log_every": 1, "num_threads": threads, "cache_dir": str(cache_dir),
                     "max_response_tokens": 128},
    }


def write_data(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    rate = 16000
    rows = []
    t = np.arange(int(SECONDS * rate)) / rate
    for i in range(n):
        wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(len(t))
        sf.write(str(root / f"clip{i}.flac"), wave.astype(np.float32), rate)
        rows.append({"id": f"ex{i}", "audio": f"clip{i}.flac",
                     "prompt": "<audio>\nDescribe the sound, its pitch and how loud it is, in one sentence.",
                     "response": "A steady tone with some noise in the background; it stays at the same pitch "
                                 f"and loudness for the whole clip, number {i}."})
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


class PeakRSS:
    """Highest resident set size while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def _watch(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.cuda_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def run(recipe, run_dir: Path, warmup: int, time_encoders: bool) -> dict:
    """Train through the engine; per-step wall times (and encoder times) after the warm-up."""
    from alm_kit.training.engine import Trainer

    trainer = Trainer(recipe, progress=False, run_dir=run_dir)
    durations: list[float] = []
    if time_encoders:
        starts = {}
        for name, enc in trainer.model.encoders.items():
            enc.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
            enc.register_forward_hook(lambda m, a, o, n=name: durations.append(time.perf_counter() - starts[n]))
    with PeakRSS() as mem:
        result = trainer.fit()
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [0.0] + [r["elapsed_s"] for r in records if "samples_per_s" in r]
    steps = np.diff(elapsed)[warmup:]
    out = {"steps": steps.tolist(), "peak_rss": mem.peak, "cuda_peak": mem.cuda_peak}
    if time_encoders:
        per_step = len(trainer.model.encoders)
        calls = np.array(durations).reshape(-1, per_step).sum(1)
        out["encoders"] = calls[warmup:].tolist()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--examples", type=int, default=32, help="distinct clips (= cache entries per encoder)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of (a) and (b), alternating; figures are medians over all their steps")
    parser.add_argument("--keep", help="keep data, runs and cache in this folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from alm_kit.config.loader import recipe_from_dict
    from alm_kit.model import build_model
    from alm_kit.workflows.cache import cache_recipe

    root = Path(args.keep or tempfile.mkdtemp(prefix="alm-kit-throughput-"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = write_data(root, args.examples)
    base = recipe_dict(manifest, root / "run", root / "cache", args.threads, args.batch)
    base["training"]["max_steps"] = args.steps

    def recipe(mode: str):
        data = json.loads(json.dumps(base))
        data["training"]["cache_features"] = mode
        return recipe_from_dict(data)

    model = build_model(recipe("off").model)
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    print(f"threads {args.threads}, batch {args.batch}, {args.examples} clips of {SECONDS:g} s, "
          f"{args.steps} steps ({args.warmup} warm-up) per run, {args.repeats} runs of each (medians)")
    print(f"parameters: encoders {count(model.encoders):.2f}M frozen ("
          + ", ".join(f"{k} {count(v):.2f}M" for k, v in model.encoders.items())
          + f"), projector {count(model.projector):.2f}M, decoder {count(model.decoder):.2f}M")
    del model

    with PeakRSS() as build_mem:
        started = time.perf_counter()
        reports = cache_recipe(recipe("disk"), progress=False)
        build_s = time.perf_counter() - started
    runs: dict[str, list[dict]] = {"a": [], "b": []}
    for r in range(args.repeats):
        runs["a"].append(run(recipe("off"), root / f"run-a{r}", args.warmup, time_encoders=True))
        runs["b"].append(run(recipe("disk"), root / f"run-b{r}", args.warmup, time_encoders=False))
        print(f"  repeat {r + 1}: median step (a) {np.median(runs['a'][-1]['steps']) * 1000:.0f} ms, "
              f"(b) {np.median(runs['b'][-1]['steps']) * 1000:.0f} ms")
    # medians over every timed step of every repeat: other processes on a shared CPU slow some steps
    step_a = float(np.median([t for x in runs["a"] for t in x["steps"]]))
    step_b = float(np.median([t for x in runs["b"] for t in x["steps"]]))
    shares = [e / t for x in runs["a"] for e, t in zip(x["encoders"], x["steps"])]
    a = {"samples_per_s": args.batch / step_a, "step_s": step_a, "cuda_peak": runs["a"][0]["cuda_peak"]}
    b = {"samples_per_s": args.batch / step_b, "step_s": step_b, "cuda_peak": runs["b"][0]["cuda_peak"]}
    a["encoder_s_per_step"] = float(np.median(shares)) * step_a

    f = float(np.median(shares))
    ideal = 1 / (1 - f)
    actual = b["samples_per_s"] / a["samples_per_s"]
    mib = lambda n: f"{n / 2**20:.0f} MiB"  # noqa: E731
    print(f"\n(a) encoders every step: {a['samples_per_s']:.2f} samples/s ({a['step_s'] * 1000:.0f} ms/step, "
          f"encoders {a['encoder_s_per_step'] * 1000:.0f} ms of it), peak RSS {mib(max(x['peak_rss'] for x in runs['a']))}")
    print(f"(b) feature cache:       {b['samples_per_s']:.2f} samples/s ({b['step_s'] * 1000:.0f} ms/step), "
          f"peak RSS {mib(max(x['peak_rss'] for x in runs['b']))}")
    print(f"cache build ({args.examples} clips, 3 encoders): {build_s:.1f} s, peak RSS {mib(build_mem.peak)}; "
          + "; ".join(f"{k}: {r}" for k, r in reports.items()))
    if a["cuda_peak"] is not None:
        print(f"CUDA peak allocated: (a) {mib(a['cuda_peak'])}, (b) {mib(b['cuda_peak'])}")
    print(f"\nf = {f:.3f} of (a)'s step time in the encoders")
    print(f"ideal speed-up 1/(1-f) = {ideal:.2f}x")
    print(f"actual (b)/(a)         = {actual:.2f}x   (target >= 2x: {'met' if actual >= 2 else 'NOT met'})")
    print(f"actual / ideal         = {actual / ideal:.2f}    (target >= 0.9: "
          f"{'met' if actual / ideal >= 0.9 else 'NOT met'})")
    if args.keep:
        print(f"files under {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
