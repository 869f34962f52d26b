"""The GPU check (benchmarks/gpu.py, benchmarks/gpu_check.sh) kept runnable on CPU: its dry run end to end, its
FLOP count, and its table of device peaks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu  # noqa: E402

from erc.models import MODELS  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """gpu_check.sh's dry-run path, into a temporary $OUT, as a device call would run it."""
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "OUT": str(out), "GPU_CHECK_DRY_RUN": "1", "GPU_CHECK_PYTHON": sys.executable, "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, json.loads((out / "gpu.json").read_text()), done.stdout


def test_check_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks/gpu_check.sh")], check=True)


def test_dry_run_measures_every_model_in_every_way(dry_run):
    out, report, stdout = dry_run
    assert report["device"] == "cpu" and report["dry_run"] and report["peak_bf16_tflops"] == "n/a (cpu)"
    assert report["data"] == {"iemocap": "generated", "meld": "generated"}
    rows = report["results"]
    assert {r["model"] for r in rows} == set(MODELS)
    assert {r["way"] for r in rows} == set(gpu.WAYS)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["params"] > 0 and r["flops_per_utterance"] > 0 and r["utterances_per_s"] > 0 and r["steps"] >= 3
        assert r["mfu"] == r["peak_gpu_mb"] == "n/a (cpu)"
    # one count per model and dataset, whichever way stepped it
    for name in MODELS:
        counts = {r["flops_per_utterance"] for r in rows if r["model"] == name and r["dataset"] == "meld"}
        assert len(counts) == 1
    assert {p.name for p in out.iterdir()} >= {"gpu.json", "gpu.md", "log.txt", "pip-freeze.txt"}
    assert "| model | dataset | way |" in (out / "gpu.md").read_text() and "device: cpu" in stdout


def test_flop_count_is_deterministic_and_counts_the_backward_pass(tmp_path):
    params = gpu.load_params(ROOT / "params.yaml")
    task, source = gpu.load_dataset("meld", params, "generated", tmp_path, dry_run=True)
    assert source == "generated" and task.spec.num_sentiment_classes == 3 and task.spec.num_classes == 7
    train = task.splits["train"]
    counts = []
    for _ in range(2):
        gpu.seed_everything(0)
        model = gpu.build_model("mister_e", task.spec, {"width": 16, "attn_dim": 12, "gru_layers": 1, "cross_blocks": 1})
        counts.append(gpu.count_flops(model, train, 4, gpu.torch.device("cpu"), batches=2))
    assert counts[0] == counts[1] > 0
    # the GRUs are counted too (cuDNN/oneDNN off): a wider recurrent stack costs more per utterance
    wider = gpu.build_model("mister_e", task.spec, {"width": 16, "attn_dim": 12, "gru_layers": 3, "cross_blocks": 1})
    assert gpu.count_flops(wider, train, 4, gpu.torch.device("cpu"), batches=2) > counts[0]


def test_generated_shapes_follow_the_dataset():
    lengths = {}
    for dataset in ("iemocap", "meld"):
        shape = gpu.SHAPES[dataset]
        assert len(shape["deciles"]) == 11 and shape["deciles"] == sorted(shape["deciles"])
        lengths[dataset] = shape["deciles"][5]
    assert lengths["iemocap"] > 3 * lengths["meld"]  # IEMOCAP's dialogues are long, MELD's short


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA A10G", 70.0),
    ("NVIDIA GeForce RTX 4090", 165.0),
    ("NVIDIA L40", "unknown"), ("Tesla V100-SXM2-16GB", "unknown"), ("NVIDIA GH200 480GB", "unknown"), ("cpu", "unknown"),
])
def test_device_peak_is_looked_up_never_guessed(name, peak):
    assert gpu.peak_bf16_tflops(name) == peak
