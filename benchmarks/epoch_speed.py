"""Seconds per training epoch on MELD of the slow models, as the pipeline trains them: this tree against another.

    python benchmarks/epoch_speed.py --before /work/scratch/base             # before/after, 3 epochs each
    python benchmarks/epoch_speed.py --models mmolre --epochs 2                # this tree only
    python benchmarks/epoch_speed.py --profile mmolre --batches 200            # torch.profiler table (self CPU)

Each (model, source tree) is one seed of `pipelines/train.py --dataset meld --model <m> --config tuned/meld/<m>.yaml`
(the tuned config applied as the pipeline's train stage applies it, that tree's params.yaml, `train.epochs` =
--epochs, no early stopping), in a fresh process with PYTHONPATH set to the tree, a scratch MLflow store and Ray
storage under /tmp, the current directory's data, `--threads` CPU threads. The seconds per epoch are the run's own
`train_seconds` metric (erc.training.loop: the training pass only, no validation), read back from that MLflow store;
the first epoch (warm-up: allocator, first-touch of the feature matrix) is reported apart, and s/epoch is the mean of
the others. "after" is this tree; "before" is `--before DIR` (e.g. a git worktree of the landed commit). The two run
one after another per model, not at the same time: run it alone (`flock /tmp/erc-test.lock ...` on a shared machine).
Figures go to benchmarks/results/epoch_speed.json (a DVC metrics file).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATASET = "meld"
DEFAULT_MODELS = ["mmolre", "mister_e", "mmolre_context"]


def train_once(code: Path, model: str, epochs: int, threads: int) -> dict:
    """One seed of the train stage of `code`'s tree; its per-epoch `train_seconds` from the run's MLflow store."""
    with tempfile.TemporaryDirectory(prefix="erc-epoch-speed-") as tmp:
        env = {**os.environ, "PYTHONPATH": str(code), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
               "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        command = [sys.executable, str(code / "pipelines/train.py"), "--dataset", DATASET, "--model", model,
                   "--config", str(ROOT / f"tuned/{DATASET}/{model}.yaml"), "--params", str(code / "params.yaml"),
                   "--out", f"{tmp}/runs.json", "--set", "train.seeds=[0]", "--set", f"train.epochs={epochs}",
                   "--set", f"train.patience={epochs}", "--set", "train.num_workers=0",
                   "--set", f"train.cpus_per_worker={threads}", "--set", f"train.storage_path={tmp}/ray"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{model} in {code}: train failed ({done.returncode})\n{done.stderr[-3000:]}")
        import mlflow

        run_id = json.loads(Path(f"{tmp}/runs.json").read_text())["runs"][0]["run_id"]
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        history = sorted(client.get_metric_history(run_id, "train_seconds"), key=lambda m: m.step)
        val = sorted(client.get_metric_history(run_id, "val_wf1"), key=lambda m: m.step)
    seconds = [m.value for m in history]
    if len(seconds) != epochs:
        raise SystemExit(f"{model} in {code}: {len(seconds)} epochs recorded, {epochs} expected")
    rest = seconds[1:] or seconds
    return {"s_per_epoch": sum(rest) / len(rest), "first_epoch_s": seconds[0], "epochs_s": seconds,
            "val_wf1": [m.value for m in val], "process_wall_s": wall}


def profile(model: str, batches: int, threads: int, rows: int) -> None:
    """torch.profiler over `batches` training steps of `model` on MELD (after a warm-up of 10), this tree's code."""
    sys.path.insert(0, str(ROOT))
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from erc.models import build_model
    from erc.params import load_params
    from erc.training.config import configs_from_params
    from erc.training.task import load_task
    from erc.training.tune import apply_best

    torch.set_num_threads(threads)
    params = apply_best(load_params(ROOT / "params.yaml"), ROOT / f"tuned/{DATASET}/{model}.yaml", DATASET, model)
    (cfg,) = configs_from_params(params, DATASET, model, seeds=[0])
    cfg.prepared, cfg.feature_dirs = str(ROOT / cfg.prepared), [str(ROOT / d) for d in cfg.feature_dirs]
    task = load_task(cfg, splits=("train",))
    data = task.splits["train"]
    torch.manual_seed(0)
    net = build_model(model, task.spec, cfg.model_config).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    order, epoch = [], 0
    while len(order) < batches + 10:  # as many epochs' batches as the steps need
        order += data.batch_indices(cfg.batch_size, shuffle=True, seed=epoch)
        epoch += 1

    def step(indices):
        net(data.collate(indices)).loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for indices in order[:10]:
        step(indices)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for indices in order[10:10 + batches]:
            step(indices)
        seconds = time.perf_counter() - start
    print(f"{model}: {batches} training steps under the profiler, {seconds:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is reported apart")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--code", type=Path, default=ROOT, help="the source tree measured as 'after' (default: this one)")
    parser.add_argument("--before", type=Path, help="a source tree measured as 'before' (e.g. the landed commit)")
    parser.add_argument("--profile", metavar="MODEL", help="profile MODEL's training steps instead of timing")
    parser.add_argument("--batches", type=int, default=200, help="training steps under the profiler")
    parser.add_argument("--rows", type=int, default=30, help="profiler table rows")
    args = parser.parse_args()
    if args.epochs < 1:
        raise SystemExit(f"--epochs: at least 1, got {args.epochs}")
    trees = {"after": args.code.resolve(), **({"before": args.before.resolve()} if args.before else {})}
    for name, tree in trees.items():
        if not (tree / "pipelines/train.py").is_file():
            raise SystemExit(f"--{'code' if name == 'after' else 'before'} {tree}: no pipelines/train.py there")
    if args.profile:
        profile(args.profile, args.batches, args.threads, args.rows)
        return

    sys.path.insert(0, str(ROOT))
    from erc.io import write_json

    results = {}
    for model in args.models:
        results[model] = {}
        for name in ("before", "after"):
            if name in trees:
                r = train_once(trees[name], model, args.epochs, args.threads)
                results[model][name] = r
                print(f"{model:15s} {name:6s} {r['s_per_epoch']:6.2f} s/epoch (first epoch {r['first_epoch_s']:.2f} s; "
                      f"val wF1 {', '.join(f'{v:.1f}' for v in r['val_wf1'])})", flush=True)
        if "before" in trees:
            results[model]["ratio"] = results[model]["after"]["s_per_epoch"] / results[model]["before"]["s_per_epoch"]

    print(f"\nMELD, s/epoch (mean of epochs 2..{args.epochs}; {args.threads} threads)")
    print(f"{'model':15s} {'before':>8s} {'after':>8s} {'ratio':>7s}")
    for model, r in results.items():
        before = f"{r['before']['s_per_epoch']:8.2f}" if "before" in r else f"{'-':>8s}"
        ratio = f"{r['ratio']:7.3f}" if "ratio" in r else f"{'-':>7s}"
        print(f"{model:15s} {before} {r['after']['s_per_epoch']:8.2f} {ratio}")
    write_json(ROOT / "benchmarks/results/epoch_speed.json", {
        "dataset": DATASET, "epochs": args.epochs, "threads": args.threads,
        "trees": {k: str(v) for k, v in trees.items()}, "models": results})


if __name__ == "__main__":
    main()
