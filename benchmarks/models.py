"""Per model, on CPU: training throughput, peak memory, inference time per dialogue, parameter counts.

    python benchmarks/models.py                       # every registered model, on MELD and IEMOCAP
    python benchmarks/models.py --models sdt --datasets iemocap

Each (model, dataset) is measured in a fresh process so peak memory is its own. Configs are those of
params.yaml (`models.<name>`); SUMMER uses runs/teacher/<dataset> when the teacher stage has run.
Needs the prepared datasets and features (`dvc repro featurize`). Figures go to
benchmarks/results/models.json (a DVC metrics file).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(model_name: str, dataset: str, epochs: int = 1, warmup_batches: int = 3) -> dict:
    import torch

    from erc.models import MODELS, build_model
    from erc.params import load_params
    from erc.training.config import configs_from_params
    from erc.training.loop import seed_everything
    from erc.training.task import load_task

    params = load_params(ROOT / "params.yaml")
    teacher = ROOT / "runs" / "teacher" / dataset
    overrides = {"teacher_checkpoint": str(teacher)} if "teacher_checkpoint" in MODELS[model_name].Config.__dataclass_fields__ \
        and teacher.is_dir() else None
    (cfg,) = configs_from_params(params, dataset, model_name, seeds=[0], model_overrides=overrides)
    cfg.prepared, cfg.feature_dirs = str(ROOT / cfg.prepared), [str(ROOT / d) for d in cfg.feature_dirs]
    seed_everything(0)
    task = load_task(cfg, splits=("train", "valid"))
    rss_data = peak_rss_mb()
    model = build_model(model_name, task.spec, cfg.model_config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    extra_counts = {}
    counter = getattr(sys.modules[type(model).__module__], "parameter_counts", None)
    if counter is not None:  # MMoLRE: the same model with full-rank experts, for comparison
        extra_counts = {"params_dense_equivalent": counter(model)["dense_equivalent"]}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)

    def train_batches(seed):
        return task.splits["train"].batches(cfg.batch_size, shuffle=True, seed=seed)

    model.train()
    for i, batch in enumerate(train_batches(0)):  # warm-up
        if i == warmup_batches:
            break
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    seen, start = 0, time.perf_counter()
    for e in range(epochs):
        for batch in train_batches(e + 1):
            optimizer.zero_grad()
            model(batch).loss.backward()
            optimizer.step()
            seen += batch.num_utterances
    train_s = time.perf_counter() - start

    model.eval()
    valid = task.splits["valid"]
    with torch.inference_mode():
        for i in range(min(3, len(valid))):  # warm-up
            model(valid.collate([i]))
        start = time.perf_counter()
        for i in range(len(valid)):
            model(valid.collate([i]))
        infer_s = time.perf_counter() - start
    return {
        "model": model_name, "dataset": dataset, "params_total": total, "params_trainable": trainable,
        "train_utt_per_s": seen / train_s, "train_epoch_s": train_s / epochs,
        "infer_ms_per_dialogue": 1000 * infer_s / len(valid),
        "peak_rss_mb": peak_rss_mb(), "peak_rss_over_data_mb": peak_rss_mb() - rss_data,
        "teacher": bool(overrides), **extra_counts,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*")
    parser.add_argument("--datasets", nargs="*", default=["meld", "iemocap"])
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "DATASET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return

    from erc.io import write_json
    from erc.models import MODELS

    results = []
    for dataset in args.datasets:
        for name in args.models or sorted(MODELS):
            out = subprocess.run([sys.executable, __file__, "--one", name, dataset], capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{name} on {dataset}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{dataset:8s} {name:10s} params {r['params_total'] / 1e6:7.2f}M (trainable {r['params_trainable'] / 1e6:.2f}M)"
                  f"  train {r['train_utt_per_s']:7.0f} utt/s ({r['train_epoch_s']:.1f} s/epoch)"
                  f"  infer {r['infer_ms_per_dialogue']:6.1f} ms/dialogue  peak RSS {r['peak_rss_mb']:.0f} MB"
                  f" (+{r['peak_rss_over_data_mb']:.0f} MB over the loaded data)"
                  + (f"  dense equivalent {r['params_dense_equivalent'] / 1e6:.2f}M" if "params_dense_equivalent" in r else ""))
    write_json(ROOT / "benchmarks/results/models.json",
               {f"{r['dataset']}.{r['model']}": {k: v for k, v in r.items() if k not in ("model", "dataset")} for r in results})


if __name__ == "__main__":
    main()
