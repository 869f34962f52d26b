"""Ray Train scaling: training utterances/s per model with 1 and 2 workers, and the ratio.

    python benchmarks/scaling.py                          # every model on IEMOCAP, 1 and 2 workers
    python benchmarks/scaling.py --models sdt --workers 1 2 4 --dataset meld
    python benchmarks/scaling.py --set train.use_gpu=true   # on a GPU node (DeepSpeed, bf16 by default)

Each point is a real Ray Train run of the train stage's loop (`erc.training.driver.fit`) with the global batch of
params.yaml, so 1 and N workers do the same optimizer steps. The figure is the median over epochs 2.. of the
epoch's training utterances/s (all workers together, epoch wall time, validation excluded). The machine's CPUs
are split evenly over the workers. Per-epoch figures go to a scratch MLflow store; results are printed and
written to benchmarks/results/scaling.json (a DVC metrics file). Needs the prepared data and features.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402
from erc.models import MODELS  # noqa: E402
from erc.params import load_params  # noqa: E402


def utterances_per_s(cfg, client) -> dict:
    """Fit `cfg` (no test evaluation) and return the median epoch throughput and what it ran on."""
    from erc import tracking
    from erc.training.driver import fit

    cfg.run_id = client.create_run(tracking.experiment_id(cfg.experiment, cfg.tracking_uri)).info.run_id
    result = fit([cfg], evaluate_test=False)
    if result.error:
        raise result.error
    per_epoch = [m.value for m in sorted(client.get_metric_history(cfg.run_id, "train_utterances_per_s"),
                                         key=lambda m: m.step)]
    return {"utterances_per_s": round(statistics.median(per_epoch[1:] or per_epoch), 1), "epochs": len(per_epoch)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=sorted(MODELS))
    parser.add_argument("--dataset", default="iemocap")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/scaling.json"))
    args = parser.parse_args()

    import mlflow

    from erc.training.cluster import init_ray
    from erc.training.config import configs_from_params

    params = load_params(ROOT / "params.yaml", args.set)
    params["data_dir"] = str((ROOT / params.get("data_dir", "data")).resolve())
    init_ray()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = mlflow.MlflowClient(uri)
        for model in args.models:
            teacher = ROOT / "runs" / "teacher" / args.dataset
            overrides = ({"teacher_checkpoint": str(teacher)}
                         if "teacher_checkpoint" in MODELS[model].Config.__dataclass_fields__ and teacher.is_dir() else None)
            row = {}
            for workers in args.workers:
                (cfg,) = configs_from_params(params, args.dataset, model, seeds=[0], model_overrides=overrides)
                cfg.epochs, cfg.patience, cfg.num_workers = args.epochs, args.epochs, workers
                cfg.cpus_per_worker = max(1, (os.cpu_count() or 1) // workers)
                cfg.storage_path, cfg.tracking_uri, cfg.experiment = f"{tmp}/ray", uri, "scaling"
                row[f"workers_{workers}"] = utterances_per_s(cfg, client)
                print(f"{model:10s} {workers} worker(s) x {cfg.cpus_per_worker} CPU: "
                      f"{row[f'workers_{workers}']['utterances_per_s']:9.1f} utterances/s", flush=True)
            base = row[f"workers_{args.workers[0]}"]["utterances_per_s"]
            for workers in args.workers[1:]:
                row[f"ratio_{workers}_to_{args.workers[0]}"] = round(row[f"workers_{workers}"]["utterances_per_s"] / base, 3)
            results[model] = row
    write_json(args.out, {"dataset": args.dataset, "cpus": os.cpu_count(), "set": args.set, "models": results})
    print(f"\n{'model':10s} " + " ".join(f"{w} worker(s)".rjust(13) for w in args.workers) + "   ratio")
    for model, row in results.items():
        ratios = " ".join(f"{v:.2f}" for k, v in row.items() if k.startswith("ratio"))
        print(f"{model:10s} " + " ".join(f"{row[f'workers_{w}']['utterances_per_s']:13.1f}" for w in args.workers)
              + f"   {ratios}")


if __name__ == "__main__":
    main()
