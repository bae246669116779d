"""Encoder pass sizes on this machine: the evidence for ``generation.encoder_batch: auto``.

    python benchmarks/pass_sizes.py [--batch 8] [--repeats 3] [--threads 2]

On the random-initialised full-size Mellow of ``generate_speed.py`` (HTS-AT + SmolLM2-135M
architecture), a batch of ``--batch`` two-audio examples: the 2 x batch distinct clips through
HTS-AT in passes of all / 8 / 4 / 2 / 1 clips. (The same split of the decoder's prefill into passes
of 4 / 2 / 1 rows measured 0.95-0.98x of one pass, so the prefill stays one pass.) The sizes take turns within each repeat (so a slow moment of a shared machine
hits all of them); the median is printed with its ratio to the one-pass time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from generate_speed import build_mellow, requests  # noqa: E402


def _timed(run, *args) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def _table(title: str, unit: str, times: dict) -> None:
    base = statistics.median(times["all"])
    print(f"\n{title}\n{unit + ' per pass':<16} {'median s':>9} {'vs one pass':>12}")
    for size, values in times.items():
        median = statistics.median(values)
        print(f"{size!s:<16} {median:>9.2f} {base / median:>11.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from alm_kit.data.batch import collate_waveforms
    from alm_kit.inference.engine import InferenceEngine

    model, recipe, _ = build_mellow()
    engine = InferenceEngine(model, recipe.generation)
    reqs = requests(args.batch)
    params = engine.params(encoder_batch="all")
    with torch.no_grad():
        _, _, distinct, _ = engine._prepare(reqs, params)
        waveforms, lengths = collate_waveforms([c.fitted for c in distinct], list(model.audio_specs))
        clips = len(distinct)
        print(f"{clips} distinct clips of {waveforms[next(iter(waveforms))].shape[-1]} samples; "
              f"{torch.get_num_threads()} threads")
        model.encode(waveforms, lengths, 2)  # warm-up, not timed
        encoder = {size: [] for size in ("all", 8, 4, 2, 1)}
        for _ in range(args.repeats):
            for size in encoder:
                encoder[size].append(_timed(model.encode, waveforms, lengths, None if size == "all" else size))
    _table(f"HTS-AT on {clips} clips", "clips", encoder)


if __name__ == "__main__":
    main()
