"""Stage `train@<dataset>-<model>`: one Ray Train run per seed, each an MLflow run; writes the run list.

    python pipelines/train.py --dataset meld --model baseline --config tuned/meld/baseline.yaml --out runs/tuned/meld/baseline.json
    python pipelines/train.py --dataset meld --model summer --teacher runs/teacher/meld --out runs/default/meld/summer.json
"""

import time

STARTED = time.time()  # the imports below count as the run's start-up (time_driver_process_start_s)

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

from erc.errors import ErcDataError  # noqa: E402
from erc.io import check_writable, write_json  # noqa: E402
from erc.params import load_params, stage_main  # noqa: E402
from erc.training.config import check_teacher, configs_from_params  # noqa: E402
from erc.training.driver import run_all  # noqa: E402


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher", help="checkpoint directory of a frozen teacher (the teacher stage's output)")
    parser.add_argument("--config", help="a tuned config (pipelines/tune.py's output): its values override params")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.num_workers=4 --set data_dir=/mnt/erc/data")
    args = parser.parse_args()

    check_writable(args.out)
    check_teacher(args.model, args.teacher)
    overrides = {"teacher_checkpoint": str(Path(args.teacher).resolve())} if args.teacher else None
    params = load_params(args.params, args.set)
    variant = "default"
    if args.config:
        from erc.training.tune import apply_best

        params, variant = apply_best(params, args.config, args.dataset, args.model), "tuned"
    runs = configs_from_params(params, args.dataset, args.model, source=args.config or args.params,
                               model_overrides=overrides)
    if args.config and runs[0].paper_entry:
        raise ErcDataError(args.config, "--config with the paper protocol or train.paper_entry: params' paper entry "
                                        "would override the tuned values; run one or the other")
    results = run_all(runs, tags={"variant": variant}, process_started=STARTED)
    write_json(args.out, {"dataset": args.dataset, "model": args.model, "variant": variant, "runs": results})


if __name__ == "__main__":
    main()
