"""GPU speed of alm-kit's two engines, side by side in one run (issue 13).

    python benchmarks/gpu.py            # on a CUDA machine: full-size Mellow shape, about 5 minutes
    python benchmarks/gpu.py --quick    # anywhere: tiny models, a smoke test (no figures worth reading)

Generation -- the Mellow architecture at full size with random weights (HTS-AT 32 kHz + SmolLM2-135M
shape), two audios per example, greedy, end tokens suppressed so every row makes ``--new-tokens``
tokens; every figure covers waveforms to tokens:

* transformers ``generate`` on the same prefix embeddings (KV cache, its own loop);
* the engine's eager path (``cuda_graphs: false``): preallocated cache, finished rows leave;
* the engine with fixed-shape steps replayed as CUDA graphs (``cuda_graphs: auto``);

at batch 8 and 64, with fp32 weights under bf16 autocast and with bf16 weights
(``generation.dtype: bf16``). Printed: tok/s, ms per decode step, peak CUDA memory, and the share
of rows whose tokens agree (graphs vs eager in the same dtype must be all rows).

Training -- ``alm-kit train`` through the real engine on synthetic data: ``recipes/demo.yaml``
(1.5M parameters, batch 16; its encoder trains, so there is no feature cache) and the Mellow shape
(batch 16, decoder trained in full, HTS-AT frozen) with the encoder run every step and with the
feature cache (held in GPU memory). Printed: samples/s after a warm-up (timed between two device
synchronisations), MFU from the engine's FLOP count, peak CUDA memory, and the first losses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.generate_speed import SMOLLM2_135M, method_hf, requests  # noqa: E402

TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
              "max_position_embeddings": 2048}
TINY_HTSAT = ["model.encoders.0.params.embed_dim=8", "model.encoders.0.params.depths=[1, 1]",
              "model.encoders.0.params.num_heads=[1, 2]", "model.encoders.0.params.swin_window=4",
              "model.encoders.0.params.spec_size=64", "model.encoders.0.params.mel_bins=16",
              "model.encoders.0.params.clip_seconds=2.0", "model.encoders.0.params.sample_rate=16000",
              "model.encoders.0.params.window_size=512", "model.encoders.0.params.hop_size=160",
              "model.encoders.0.params.fmax=8000", "model.encoders.0.params.num_classes=16"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


# --------------------------------------------------------------------------- generation
def mellow_recipe(quick: bool, extra: list[str] = ()):
    from alm_kit.config.loader import load_recipe

    overrides = ["model.decoder.params.pretrained=null", "model.decoder.params.tokenizer=builtin:tiny",
                 "model.layout.params.lowercase=false", *(TINY_HTSAT if quick else []), *extra]
    recipe = load_recipe(ROOT / "recipes" / "mellow.yaml", overrides)
    recipe.model.decoder.params["config"] = dict(TINY_LLAMA if quick else SMOLLM2_135M)
    return recipe


def generation(args, device: torch.device) -> None:
    from alm_kit.inference.engine import InferenceEngine
    from alm_kit.model import build_model
    from alm_kit.runtime import cast_weights

    recipe = mellow_recipe(args.quick)
    print(f"\n## generation: Mellow shape{' (tiny: --quick)' if args.quick else ''}, random weights, "
          f"{args.new_tokens} new tokens, greedy, 2 audios per example, device {device}\n")
    print("| weights | batch | method | tok/s | ms/step | peak GiB | rows = eager | rows = HF | x HF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(recipe.model).eval().to(device)
        cast_weights(model, dtype)
        engine = InferenceEngine(model, recipe.generation)
        label = "fp32 + bf16 autocast" if dtype == torch.float32 and device.type == "cuda" else str(dtype)[6:]
        for batch in args.batches:
            reqs = requests(batch)
            if args.quick:  # the tiny HTS-AT takes 16 kHz
                reqs = [type(r)(audio=[(w[:32000], 16000) for w, _ in r.audio], prompt=r.prompt, id=r.id)
                        for r in reqs]
            results = {}
            for method in ("hf", "eager", "graphs"):
                try:
                    params = engine.params(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                           batch_size=batch, cuda_graphs=False if method == "eager" else
                                           ("auto" if device.type == "cuda" else True))
                    warm = 2 if method != "hf" else 1
                    with torch.no_grad():
                        for _ in range(warm):  # graph capture, allocator, kernels: not timed
                            if method == "hf":
                                method_hf(model, reqs, 4)
                            else:
                                engine.run(reqs, params)
                        sync(device)
                        reset_peak(device)
                        start = time.perf_counter()
                        if method == "hf":
                            tokens = [t[: args.new_tokens] for t in method_hf(model, reqs, args.new_tokens)]
                        else:
                            tokens = [g.tokens for g in engine.run(reqs, params)]
                        sync(device)
                    seconds = time.perf_counter() - start
                    step = (engine.last_timings["decode"] / max(engine.last_timings["steps"], 1) * 1e3
                            if method != "hf" else seconds / args.new_tokens * 1e3)
                    results[method] = (tokens, batch * args.new_tokens / seconds, step, peak_gib(device))
                except Exception as exc:  # one failing row must not lose the others
                    print(f"| {label} | {batch} | {method} | failed: {type(exc).__name__}: {str(exc)[:200]} |")
                    traceback.print_exc(limit=3, file=sys.stderr)
            for method, (tokens, rate, step, peak) in results.items():
                same_eager = (sum(a == b for a, b in zip(tokens, results["eager"][0])) if "eager" in results
                              else None)
                same_hf = sum(a == b for a, b in zip(tokens, results["hf"][0])) if "hf" in results else None
                ratio = rate / results["hf"][1] if "hf" in results else None
                print(f"| {label} | {batch} | {method} | {rate:,.0f} | {step:.2f} | {fmt(peak, '.2f')} | "
                      f"{fmt(same_eager, 'd')}/{batch} | {fmt(same_hf, 'd')}/{batch} | {fmt(ratio, '.2f')} |",
                      flush=True)
        del model, engine
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------- training
def train_rate(recipe, warmup: int, device: torch.device) -> dict:
    """Train ``recipe`` through the engine; samples/s between the end of step ``warmup`` and the last step,
    each end taken after a device synchronisation."""
    from alm_kit.training.engine import Trainer, peak_tflops

    trainer = Trainer(recipe, progress=False, overwrite=True)
    marks: dict[int, float] = {}
    step_fn = trainer._train_step
    count = [0]

    def timed(*a):
        out = step_fn(*a)
        count[0] += 1
        if count[0] in (warmup, recipe.training.max_steps):
            sync(device)
            marks[count[0]] = time.perf_counter()
        return out

    trainer._train_step = timed
    reset_peak(device)
    result = trainer.fit()
    steps = recipe.training.max_steps - warmup
    rate = steps * recipe.training.batch_size / (marks[recipe.training.max_steps] - marks[warmup])
    peak = peak_tflops(device, None)
    flops_per_s = trainer.step_flops * steps / (marks[recipe.training.max_steps] - marks[warmup])
    return {"samples_per_s": rate, "mfu": flops_per_s / (peak * 1e12) if peak else None,
            "tflop_per_step": trainer.step_flops / 1e12, "peak": peak_gib(device), "losses": result.losses[:3],
            "params": sum(p.numel() for p in trainer.trainable)}


def training(args, device: torch.device) -> None:
    from alm_kit.config.loader import load_recipe
    from alm_kit.data.synth import synthesize

    work = Path(tempfile.mkdtemp(prefix="alm-kit-gpu-bench-"))
    data = work / "data"
    synthesize(data, n_train=args.train_examples, n_test=8, seed=0, speech=False, progress=False)
    common = [f"data.train={data}/train.jsonl", "data.eval=null", "data.synth=null", "data.format=auto",
              f"training.max_steps={args.train_steps}", f"training.device={device}", "training.log_every=10",
              "training.batch_size=16", "training.warmup_steps=5", f"training.cache_dir={work / 'cache'}",
              "training.save_every=null"]
    runs = [("demo (recipes/demo.yaml)", "no cache (encoder trains)",
             load_recipe(ROOT / "recipes" / "demo.yaml", [*common, f"training.output_dir={work / 'demo'}"]))]
    variants = [("encoder every step", "off", False), ("feature cache", "memory", False)]
    if not args.quick:
        variants.append(("feature cache, training.compile", "memory", True))
    for label, cache, compiled in variants:
        runs.append((f"Mellow shape{' (tiny)' if args.quick else ''}", label,
                     mellow_recipe(args.quick, [*common, f"training.output_dir={work / (cache + str(compiled))}",
                                                f"training.cache_features={cache}", f"training.compile={compiled}",
                                                "training.max_response_tokens=64"])))
    print(f"\n## training: alm-kit train, batch 16, {args.train_steps} steps (timed after {args.warmup}), "
          f"device {device}\n")
    print("| recipe | audio | trainable params | samples/s | TFLOP/step | MFU | peak GiB | first losses |")
    print("|---|---|---|---|---|---|---|---|")
    for name, label, recipe in runs:
        if recipe.training.compile and time.perf_counter() - args.started > args.compile_after_s:
            print(f"| {name} | {label} | skipped: over {args.compile_after_s} s already |")
            continue
        try:
            r = train_rate(recipe, args.warmup, device)
            print(f"| {name} | {label} | {r['params'] / 1e6:.1f}M | {r['samples_per_s']:,.1f} | "
                  f"{r['tflop_per_step']:.3f} | {fmt(r['mfu'], '.1%')} | {fmt(r['peak'], '.2f')} | "
                  f"{', '.join(f'{x:.4f}' for x in r['losses'])} |", flush=True)
        except Exception as exc:
            print(f"| {name} | {label} | failed: {type(exc).__name__}: {str(exc)[:200]} |")
            traceback.print_exc(limit=4, file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models on any device: a smoke test")
    parser.add_argument("--only", choices=["generation", "training"])
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.batches = [2] if args.quick else [8, 64]
    args.new_tokens = 6 if args.quick else 128
    args.train_steps, args.warmup = (3, 1) if args.quick else (60, 20)
    args.train_examples = 16 if args.quick else 1200
    args.compile_after_s = 240  # the compiled run (a minute or more of compilation) only with time left
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    else:
        torch.set_num_threads(min(4, os.cpu_count() or 1))
    import transformers

    print(f"transformers {transformers.__version__}")
    started = args.started = time.perf_counter()
    if args.only in (None, "generation"):
        generation(args, device)
    if args.only in (None, "training"):
        training(args, device)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print(json.dumps({"done": True}))


if __name__ == "__main__":
    main()
