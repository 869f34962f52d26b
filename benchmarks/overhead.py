"""Where a run's wall time goes: start-up, data, training, validation, checkpoints, test, MLflow; and a Tune trial's.

    python benchmarks/overhead.py                      # MOSI baseline: 1 seed x 3 epochs, 3 seeds, a 4-trial search
    python benchmarks/overhead.py --epochs 1 --no-tune

Part 1 runs the train stage from the shell, as a user does (`python pipelines/train.py --dataset mosi --model
baseline --set 'train.seeds=[0]' ...`), into a temporary MLflow store and Ray storage, and splits its wall time
with the `time_*_s` metrics each run records (erc.training.clock.Clock). Training and evaluation proper are the train,
validation and test passes; everything else is fixed cost. The store is created before the clock starts (a new
store's schema migration happens once per store, not per run; it is printed separately).
Part 2 does the same with 3 seeds in one stage, which share one process. Both run with params' default
`train.num_workers` (0: Ray Train's local mode, in the command's process) and, for comparison, with one Ray
Train worker (`train.num_workers=1`: a local Ray, a controller and a worker group started per command).
Part 3 runs a search of `--trials` single-worker trials one at a time and gives each trial's overhead: the search's
wall time less its trials' training and validation, divided by the trials (so the search's own start and summary
are counted in, an upper bound).
Needs the prepared MOSI dataset (`dvc repro prepare@mosi`). Figures go to benchmarks/results/overhead.json.
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
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402

WORK = ("train", "valid", "test")  # training and evaluation proper; every other phase is overhead


def train_command(tmp: Path, uri: str, dataset: str, model: str, seeds: list[int], epochs: int,
                  workers: int | None = None) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = tmp / f"runs-{len(seeds)}-{workers}.json"
    command = [sys.executable, "pipelines/train.py", "--dataset", dataset, "--model", model, "--out", str(out),
               "--set", f"train.seeds={json.dumps(seeds)}", "--set", f"train.epochs={epochs}",
               "--set", f"train.patience={epochs}", "--set", f"train.storage_path={tmp / 'ray'}"]
    if workers is not None:
        command += ["--set", f"train.num_workers={workers}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"train command failed:\n{done.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(uri)
    runs = [client.get_run(r["run_id"]).data.metrics for r in json.loads(out.read_text())["runs"]]
    phases: dict[str, float] = {}
    for metrics in runs:
        for key, value in metrics.items():
            if key.startswith("time_") and key.endswith("_s"):
                phase = key[len("time_"):-len("_s")]
                if phase.startswith("driver_") and phase in phases:
                    continue  # the driver's phases are recorded on every run of the stage: count them once
                phases[phase] = phases.get(phase, 0.0) + value
    phases["other (Ray shutdown, results, process exit)"] = wall - sum(phases.values())
    work = sum(phases.get(p, 0.0) for p in WORK)
    return {"command": " ".join(command[1:]), "wall_s": wall, "seeds": len(seeds), "epochs": epochs,
            "mode": "worker group" if workers else "local mode (params default)" if workers is None else "local mode",
            "phases_s": phases, "work_s": work, "fixed_s": wall - work,
            "fixed_per_run_s": (wall - work) / len(seeds), "output_lines": len((done.stdout + done.stderr).splitlines())}


def tune_trials(tmp: Path, uri: str, dataset: str, model: str, trials: int, epochs: int) -> dict:
    import mlflow

    from erc.params import load_params
    from erc.training.cluster import init_ray
    from erc.training.config import configs_from_params
    from erc.training.driver import resolve_locations
    from erc.training.tune import search, space_for

    os.environ["MLFLOW_TRACKING_URI"] = uri
    params = load_params(ROOT / "params.yaml", [f"train.epochs={epochs}", f"train.patience={epochs}",
                                                  f"data_dir={ROOT / 'data'}"])
    (base,) = configs_from_params(params, dataset, model, seeds=[0])
    resolve_locations(base)
    init_ray()
    start, started_at = time.perf_counter(), time.time()
    # grace_period = epochs: ASHA stops nothing, so every trial trains every epoch.
    best = search(base, space_for(params, model), trials=trials, storage_path=str(tmp / "tune"), name="overhead",
                  max_concurrent=1, grace_period=epochs, seed=0)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(uri)
    nested = client.search_runs([client.get_run(best["parent_run_id"]).info.experiment_id],
                                f"tags.mlflow.parentRunId = '{best['parent_run_id']}'")
    work = sum(r.data.metrics.get("time_train_s", 0.0) + r.data.metrics.get("time_valid_s", 0.0) for r in nested)
    # Per trial, from its MLflow run's start and end: the gap since the previous trial ended (Tune's scheduling,
    # the first trial's actor start) plus its run's wall time less its training and validation.
    nested = sorted(nested, key=lambda r: r.info.start_time)
    previous_end, per_trial = started_at * 1000, []
    for r in nested:
        run_work = r.data.metrics.get("time_train_s", 0.0) + r.data.metrics.get("time_valid_s", 0.0)
        per_trial.append((r.info.end_time - previous_end) / 1000 - run_work)
        previous_end = r.info.end_time
    return {"trials": trials, "epochs": epochs, "search_wall_s": wall, "work_s": work,
            "overhead_per_trial_s": (wall - work) / trials, "trial_overheads_s": per_trial,
            "search_end_s": wall - (previous_end / 1000 - started_at)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mosi")
    parser.add_argument("--model", default="baseline")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--no-tune", action="store_true")
    parser.add_argument("--no-worker-group", action="store_true", help="skip the commands with train.num_workers=1")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/overhead.json"))
    args = parser.parse_args()

    import mlflow

    from erc import tracking

    results = {"cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        start = time.perf_counter()
        tracking.experiment_id("erc", uri)  # the store's schema, made once per store
        mlflow.MlflowClient(uri).search_experiments()
        results["new_store_s"] = time.perf_counter() - start
        results["one_seed"] = train_command(tmp, uri, args.dataset, args.model, [0], args.epochs)
        results["one_seed_one_epoch"] = train_command(tmp, uri, args.dataset, args.model, [0], 1)
        results["three_seeds"] = train_command(tmp, uri, args.dataset, args.model, [0, 1, 2], args.epochs)
        if not args.no_worker_group:
            results["one_seed_one_epoch_worker_group"] = train_command(tmp, uri, args.dataset, args.model, [0], 1, 1)
            results["three_seeds_worker_group"] = train_command(tmp, uri, args.dataset, args.model, [0, 1, 2],
                                                                args.epochs, 1)
        if not args.no_tune:
            results["tune"] = tune_trials(tmp, uri, args.dataset, args.model, args.trials, args.epochs)

    print(f"{args.dataset}/{args.model} on {results['cpus']} CPUs; a new MLflow store (once): {results['new_store_s']:.1f} s")
    for key in ("one_seed", "three_seeds", "one_seed_one_epoch", "three_seeds_worker_group",
                "one_seed_one_epoch_worker_group"):
        if key not in results:
            continue
        r = results[key]
        print(f"\n{r['seeds']} seed(s) x {r['epochs']} epoch(s), {r['mode']}, from the shell: {r['wall_s']:.1f} s "
              f"(fixed {r['fixed_s']:.1f} s, {r['fixed_per_run_s']:.1f} s per run; work {r['work_s']:.1f} s; "
              f"{r['output_lines']} output lines)")
        for phase, seconds in sorted(r["phases_s"].items(), key=lambda kv: -kv[1]):
            print(f"  {phase:<45} {seconds:6.2f} s{'  (work)' if phase in WORK else ''}")
    if "tune" in results:
        t = results["tune"]
        print(f"\nsearch of {t['trials']} single-worker trials x {t['epochs']} epochs, one at a time: "
              f"{t['search_wall_s']:.1f} s, of which training + validation {t['work_s']:.1f} s; "
              f"overhead per trial {t['overhead_per_trial_s']:.1f} s")
        first, *rest = t["trial_overheads_s"]
        print(f"  per trial (gap since the previous one + its run less training and validation): first {first:.1f} s "
              f"(the trial actor's start: imports, data), then {', '.join(f'{x:.1f}' for x in rest)} s"
              f"; the search's end after its last trial {t['search_end_s']:.1f} s")
    write_json(args.out, results)


if __name__ == "__main__":
    main()
