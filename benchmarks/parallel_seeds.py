"""Seeds side by side against one after another (`train.parallel_seeds`), on a real prepared dataset.

    python benchmarks/parallel_seeds.py              # IEMOCAP, the tuned baseline, seeds 0 and 1, 3 epochs each
    python benchmarks/parallel_seeds.py --dry-run    # the plan and the configs, checked; nothing trained

Three ways of training the same two seeds, each a `run_all` (as the train stage runs it) into a scratch MLflow
store under /tmp: (a) one after another at 2 threads, (b) one after another at 1 thread, (c) side by side at 1
thread each. Prints each wall time, and whether (b) and (c) give every seed the same numbers (per-epoch validation
and loss, test metrics, stored test predictions): they must. Each way runs in a fresh process (as a train stage
does), timed whole, start-up included. Run it alone on the machine (it measures wall time).
Figures go to benchmarks/results/parallel_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json
from erc.params import load_params
from erc.training.config import configs_from_params
from erc.training.driver import resolve_locations, run_all
from erc.training.tune import apply_best

WAYS = {  # name: (parallel_seeds, threads per seed)
    "a_one_after_another_2_threads": (1, 2),
    "b_one_after_another_1_thread": (1, 1),
    "c_side_by_side_1_thread": (2, 1),
}


def configs(args, store: Path, way: str):
    parallel, threads = WAYS[way]
    params = load_params(args.params, [f"data_dir={args.data_dir}", *args.set])
    if args.config:
        params = apply_best(params, args.config, args.dataset, args.model)
    runs = configs_from_params(params, args.dataset, args.model, source=args.config or args.params, seeds=args.seeds)
    for cfg in runs:
        cfg.epochs, cfg.parallel_seeds, cfg.cpus_per_worker = args.epochs, parallel, threads
        cfg.num_workers, cfg.use_gpu = 0, False
        cfg.tracking_uri, cfg.experiment = f"sqlite:///{store / 'mlflow.db'}", f"parallel-seeds-{way}"
        cfg.storage_path = str(store / "ray" / way)
    return runs


def numbers(client, result: dict, scratch: Path) -> dict:
    """What a seed's run recorded: its per-epoch curves, its test metrics and its stored test predictions."""
    run_id = result["run_id"]
    curves = {key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
              for key in ("val_wf1", "train_loss_ce")}
    predictions = Path(client.download_artifacts(run_id, "test_predictions.csv", str(scratch / run_id))).read_text()
    return {"curves": curves, "test": {k: v for k, v in result.items() if k.startswith("test_")},
            "selected_epoch": result.get("selected_epoch"), "predictions": predictions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="iemocap")
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--config", default="tuned/iemocap/baseline.yaml", help="a tuned config ('' for none)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/parallel_seeds.json"))
    parser.add_argument("--dry-run", action="store_true", help="check the configs and print the plan only")
    parser.add_argument("--way", choices=WAYS, help=argparse.SUPPRESS)  # the child processes' own options
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--numbers", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import os

    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.way:  # one way, in the process the main one started
        runs = configs(args, Path(args.store), args.way)
        results = run_all(runs, tags={"benchmark": "parallel_seeds"})
        client = mlflow.MlflowClient(runs[0].tracking_uri)
        write_json(args.numbers, [numbers(client, r, Path(args.store) / "downloads") for r in results])
        return
    store = Path(tempfile.mkdtemp(prefix="erc-parallel-seeds-", dir="/tmp"))
    try:
        if args.dry_run:
            for way in WAYS:
                runs = configs(args, store, way)
                for cfg in runs:
                    resolve_locations(cfg)  # the inputs exist and hold what a run reads
                print(f"{way}: seeds {[c.seed for c in runs]}, {args.epochs} epochs, parallel_seeds "
                      f"{runs[0].parallel_seeds}, {runs[0].cpus_per_worker} thread(s) each, "
                      f"{args.dataset}/{args.model} lr {runs[0].lr} model_config {runs[0].model_config}")
            print(f"dry run: nothing trained; results would go to {args.out}")
            return
        walls, recorded = {}, {}
        for way in WAYS:
            # each way in a fresh process, as a train stage runs: nothing imported or loaded (the data cache) by
            # an earlier way; its wall time is the whole process's, start-up included
            found = store / f"{way}.json"
            start = time.perf_counter()
            subprocess.run([sys.executable, __file__, *sys.argv[1:], "--way", way, "--store", str(store),
                            "--numbers", str(found)], check=True)
            walls[way] = time.perf_counter() - start
            recorded[way] = json.loads(found.read_text())
            print(f"{way}: {walls[way]:.1f} s", flush=True)
        same = recorded["b_one_after_another_1_thread"] == recorded["c_side_by_side_1_thread"]
        threads_alike = recorded["a_one_after_another_2_threads"] == recorded["b_one_after_another_1_thread"]
        print(f"(b) and (c) identical per seed: {same}")
        print(f"(a) and (b) identical (2 threads against 1): {threads_alike}")
        print(f"side by side / one after another at 2 threads: "
              f"{walls['c_side_by_side_1_thread'] / walls['a_one_after_another_2_threads']:.2f}")
        write_json(args.out, {
            "dataset": args.dataset, "model": args.model, "config": args.config, "seeds": args.seeds,
            "epochs": args.epochs, "cpus": os.cpu_count(),
            "wall_s": {way: round(s, 2) for way, s in walls.items()},
            "speedup_side_by_side_vs_2_threads": round(walls["a_one_after_another_2_threads"]
                                                       / walls["c_side_by_side_1_thread"], 3),
            "speedup_side_by_side_vs_1_thread": round(walls["b_one_after_another_1_thread"]
                                                      / walls["c_side_by_side_1_thread"], 3),
            "b_c_identical": same, "a_b_identical": threads_alike,
            "test_wf1": {way: [r["test"].get("test_wf1") for r in found] for way, found in recorded.items()},
        })
        print(json.dumps({"wall_s": walls}, indent=1))
    finally:
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    main()
