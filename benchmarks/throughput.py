"""Throughput and wall time of the default configuration, printed and written as DVC metrics.

    python benchmarks/throughput.py                 # featurize + training throughput (about 2 minutes)
    python benchmarks/throughput.py --repro         # also `dvc repro` from scratch in a fresh clone (~15 min)

Needs the prepared datasets (`dvc repro prepare` or a full `dvc repro`) for the throughput part, and
ERC_DATA_MIRROR for --repro. Figures go to benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.data import canonical  # noqa: E402
from erc.features.text import encode_texts, load_encoder  # noqa: E402
from erc.io import write_json  # noqa: E402
from erc.models import build_model  # noqa: E402
from erc.params import load_params  # noqa: E402
from erc.training.config import TrainConfig  # noqa: E402
from erc.training.loop import seed_everything  # noqa: E402
from erc.training.task import load_task  # noqa: E402


def featurize_throughput(dataset: str, params: dict, limit: int) -> float:
    spec = params["featurize"]["encoders"]["minilm"]
    texts = canonical.load(ROOT / "data/prepared" / dataset, feature_names=[]).table["text"].tolist()[:limit]
    tokenizer, model = load_encoder(spec["model"])
    encode_texts(texts[:128], tokenizer, model, progress=False)  # warm-up
    _, timing = encode_texts(texts, tokenizer, model, batch_size=params["featurize"]["batch_size"],
                             max_length=spec.get("max_length", 128), progress=False)
    return timing["utterances_per_s"]


def training_throughput(dataset: str, params: dict, epochs: int = 2) -> float:
    """Utterances/s of the baseline's training step (forward, backward, update), one process, no Ray."""
    train = params["train"]
    cfg = TrainConfig(dataset=dataset, prepared=str(ROOT / "data/prepared" / dataset),
                      feature_dirs=[str(ROOT / "data/features" / dataset)], inputs=params["inputs"][dataset],
                      model_config=params["models"]["baseline"], batch_size=train["batch_size"], lr=train["lr"])
    seed_everything(0)
    task = load_task(cfg, splits=("train",))
    model = build_model("baseline", task.spec, cfg.model_config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)

    def epoch(seed):
        seen = 0
        for batch in task.splits["train"].batches(cfg.batch_size, shuffle=True, seed=seed):
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()
            seen += batch.num_utterances
        return seen

    epoch(0)  # warm-up
    start = time.perf_counter()
    seen = sum(epoch(e) for e in range(1, epochs + 1))
    return seen / (time.perf_counter() - start)


def repro_wall_time() -> dict:
    """`dvc repro` from scratch in a fresh clone of HEAD, then a second `dvc repro` (should do nothing)."""
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "erc"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {**os.environ, "PYTHONPATH": str(clone), "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
        env.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, stdout=subprocess.DEVNULL)
        first = time.perf_counter() - start
        start = time.perf_counter()
        second_out = subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, capture_output=True, text=True)
        second = time.perf_counter() - start
        leaderboard = (clone / "reports/leaderboard.md").read_text()
        shutil.rmtree(clone / ".dvc/cache", ignore_errors=True)
    return {"dvc_repro_s": first, "dvc_repro_again_s": second,
            "dvc_repro_again_ran_nothing": "Running stage" not in second_out.stdout, "leaderboard": leaderboard}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repro", action="store_true", help="also time `dvc repro` from scratch in a clone")
    parser.add_argument("--limit", type=int, default=3000, help="utterances to encode per dataset")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = load_params(ROOT / "params.yaml")
    threads = torch.get_num_threads()

    results = {"cpu_threads": threads}
    for dataset in ("meld", "iemocap"):
        results[f"featurize_{dataset}_utt_per_s"] = featurize_throughput(dataset, params, args.limit)
        print(f"featurize {dataset}: {results[f'featurize_{dataset}_utt_per_s']:.0f} utterances/s "
              f"(all-MiniLM-L6-v2, {threads} threads)")
    for dataset in ("mosi", "meld", "iemocap"):
        results[f"train_{dataset}_utt_per_s"] = training_throughput(dataset, params)
        print(f"train baseline {dataset}: {results[f'train_{dataset}_utt_per_s']:.0f} utterances/s")
    if args.repro:
        timing = repro_wall_time()
        print(f"dvc repro from scratch: {timing['dvc_repro_s']:.0f} s; second dvc repro: "
              f"{timing['dvc_repro_again_s']:.1f} s (ran nothing: {timing['dvc_repro_again_ran_nothing']})")
        print(timing.pop("leaderboard"))
        results.update(timing)
    write_json(ROOT / "benchmarks/results/throughput.json", results)


if __name__ == "__main__":
    main()
