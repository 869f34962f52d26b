"""Stage `tune@<dataset>-<model>`: a Ray Tune search (ASHA + Optuna TPE) on validation weighted F1, every trial a
nested MLflow run; writes the best config, which `pipelines/train.py --config` takes.

    python pipelines/tune.py --dataset mosi --model summer --trials 20 --out tuned/mosi/summer.yaml
    python pipelines/tune.py --dataset mosi --model summer --trials 20 --out tuned/mosi/summer.yaml --resume

The space is `tune.space.all` + `tune.space.<model>` of params; every trial trains with the first of
`train.seeds`. `--resume` continues an interrupted search of the same name (finished trials are kept).
"""

import argparse
import shlex
import sys
from pathlib import Path
from typing import Annotated

from pydantic import Field

from erc.errors import ErcDataError
from erc.io import check_writable
from erc.params import load_params, stage_main
from erc.schema import check
from erc.training.cluster import start_ray
from erc.training.config import check_teacher, configs_from_params, tune_settings
from erc.training.driver import Terminated, on_sigterm, resolve_locations
from erc.training.tune import (
    SearchFailed,
    SearchInterrupted,
    default_name,
    discard,
    search,
    space_for,
    write_best,
)


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True, help="the best-config file (YAML)")
    parser.add_argument("--trials", help="trial budget, a positive integer (default: tune.trials)")
    parser.add_argument("--name", help="search name, the folder under tune.storage_path (default: tune-<dataset>-<model>)")
    parser.add_argument("--resume", action="store_true", help="continue the interrupted search of this name")
    parser.add_argument("--replace", action="store_true",
                        help="start afresh, discarding an earlier search of this name (a pipeline's rerun)")
    parser.add_argument("--teacher", help="checkpoint directory of SUMMER's frozen teacher")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a param")
    args = parser.parse_args()

    # Every mistake is one line before Ray or an MLflow run starts (`--trials 0` once meant "tune.trials").
    trials = check(Annotated[int, Field(ge=1)] | None, args.trials, source="command line", prefix="--trials")
    check_writable(args.out)
    check_teacher(args.model, args.teacher)
    params = load_params(args.params, args.set)
    tune = tune_settings(params, source=args.params)
    overrides = {"teacher_checkpoint": str(Path(args.teacher).resolve())} if args.teacher else None
    (base,) = configs_from_params(params, args.dataset, args.model, source=args.params,
                                  seeds=params["train"]["seeds"][:1], model_overrides=overrides)
    space = space_for(params, args.model, source=args.params)
    if base.protocol != "validation":
        raise ErcDataError(args.params, f"train.protocol: {base.protocol!r}: a search selects on validation; the "
                                        "paper protocol scores test every epoch and is for pipelines/train.py only")
    base.epochs = tune.epochs or base.epochs
    resolve_locations(base)
    name = args.name or default_name(args.dataset, args.model)
    if args.replace and not args.resume:
        discard(tune.storage_path, name)
    start_ray(max(base.num_workers, 1), base.use_gpu, needed=True)  # every trial runs on Ray
    on_sigterm(Terminated.raise_)  # SIGTERM ends the search as Ctrl-C does: its runs KILLED, its state kept
    try:
        best = search(base, space, trials=trials or tune.trials, storage_path=tune.storage_path, name=name,
                      cpus_per_trial=tune.cpus_per_trial, max_concurrent=tune.max_concurrent,
                      grace_period=tune.grace_period, reduction_factor=tune.reduction_factor, seed=tune.seed,
                      resume=args.resume)
    except SearchInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(130)
    except SearchFailed as e:  # its runs ended FAILED, and nothing left that would refuse the next search
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    command = shlex.join(["python", "pipelines/tune.py", *[a for a in sys.argv[1:] if a != "--resume"]])
    write_best(args.out, dataset=args.dataset, model=args.model, best=best, command=command)
    print(best["table"].sort_values("score", ascending=False).to_string(index=False))
    print(f"best validation weighted F1 {best['score']:.2f} of {best['trials']} trials "
          f"(MLflow parent run {best['parent_run_id']}): {best['config']} -> {args.out}")


if __name__ == "__main__":
    main()
