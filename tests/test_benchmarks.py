"""benchmarks/gpu.py --quick: the GPU benchmark script runs end to end on tiny models (no timings checked)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_benchmark_quick_runs_every_row_and_the_graph_steps_agree():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--quick"], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| ")]
    assert not [r for r in rows if any("failed" in c for c in r)], out.stdout
    generation = [[c.strip() for c in r] for r in rows if r[2].strip() in ("hf", "eager", "graphs")]
    assert sorted((r[0], r[2]) for r in generation) == sorted(
        (w, m) for w in ("float32", "bfloat16") for m in ("hf", "eager", "graphs"))
    for weights, batch, method, *_, same_eager, _same_hf, _ratio in generation:
        assert same_eager == f"{batch}/{batch}", (weights, method)  # graph steps give the eager tokens
    training = [r for r in rows if "Mellow shape" in r[0] or "demo" in r[0]]
    assert len(training) == 3 and all(float(r[3].replace(",", "")) > 0 for r in training)
