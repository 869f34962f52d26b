"""A 20-trial search of SUMMER's loss weights (κ1-κ3, temperature, lr, dropout) on MOSI, timed; then the tuned
config against the default one over 3 seeds, on validation and on test.

    python benchmarks/tune_summer.py                      # search + retrain (about 20 minutes on 2 cores)
    python benchmarks/tune_summer.py --trials 8 --dataset meld

Needs the prepared data and SUMMER's teacher (`dvc repro teacher@mosi`). The search is `pipelines/tune.py`
(its MLflow parent run holds every trial); the comparison trains both configs with `pipelines/train.py` over
train.seeds, so each run is selected on validation and evaluated once on test. The best config goes to
tuned/<dataset>/summer.yaml (as the `tune_*` stage would write it). Figures are printed and written to
benchmarks/results/tune_summer_<dataset>.json (a DVC metrics file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402


def train(dataset: str, out: Path, config: Path | None) -> list[dict]:
    command = [sys.executable, "pipelines/train.py", "--dataset", dataset, "--model", "summer",
               "--teacher", f"runs/teacher/{dataset}", "--out", str(out)]
    if config:
        command += ["--config", str(config)]
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["runs"]


def mean_std(runs: list[dict], key: str) -> dict:
    values = [r[key] for r in runs]
    return {"mean": round(statistics.mean(values), 2), "std": round(statistics.stdev(values), 2) if len(values) > 1 else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mosi")
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()

    tuned = ROOT / "tuned" / args.dataset / "summer.yaml"
    name = f"bench-{args.dataset}-summer-{time.strftime('%Y%m%d-%H%M%S')}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "pipelines/tune.py", "--dataset", args.dataset, "--model", "summer",
                    "--teacher", f"runs/teacher/{args.dataset}", "--trials", str(args.trials), "--name", name,
                    "--out", str(tuned)], cwd=ROOT, check=True)
    search_minutes = (time.perf_counter() - start) / 60
    print(f"\nsearch: {args.trials} trials in {search_minutes:.1f} minutes", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        default = train(args.dataset, Path(tmp) / "default.json", None)
        best = train(args.dataset, Path(tmp) / "tuned.json", tuned)
    metrics = ["selected_val_wf1", "test_wf1", "test_acc"] + (["test_acc2"] if "test_acc2" in best[0] else [])
    result = {"dataset": args.dataset, "trials": args.trials, "search_minutes": round(search_minutes, 2),
              "seeds": [r["seed"] for r in best],
              "default": {m: mean_std(default, m) for m in metrics}, "tuned": {m: mean_std(best, m) for m in metrics}}
    write_json(ROOT / f"benchmarks/results/tune_summer_{args.dataset}.json", result)
    print(f"\n{'':8s}" + "".join(f"{m:>22s}" for m in metrics))
    for variant in ("default", "tuned"):
        row = result[variant]
        print(f"{variant:8s}" + "".join(f"{row[m]['mean']:>14.2f} ± {row[m]['std'] or 0:5.2f}" for m in metrics))


if __name__ == "__main__":
    main()
