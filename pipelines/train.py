"""Stage `train@<dataset>-<model>`: one Ray Train run per seed, each an MLflow run; writes the run list.

    python pipelines/train.py --dataset meld --model baseline --out runs/meld/baseline.json
    python pipelines/train.py --dataset meld --model summer --teacher runs/meld/teacher --out runs/meld/summer.json
"""

import argparse
import json
from pathlib import Path

from erc.io import write_json
from erc.params import load_params, stage_main
from erc.train import configs_from_params, init_ray, run


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

    overrides = {"teacher_checkpoint": str(Path(args.teacher).resolve())} if args.teacher else None
    params = load_params(args.params, args.set)
    variant = "default"
    if args.config:
        from erc.tune import apply_best

        params, variant = apply_best(params, args.config, args.dataset, args.model), "tuned"
    runs = configs_from_params(params, args.dataset, args.model, source=args.config or args.params,
                               model_overrides=overrides)
    init_ray()
    results = [run(cfg, tags={"variant": variant}) for cfg in runs]
    write_json(args.out, {"dataset": args.dataset, "model": args.model, "variant": variant, "runs": results})
    for r in results:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k in
                          ("seed", "run_id", "test_wf1", "test_acc", "test_acc2", "selected_epoch")}))


if __name__ == "__main__":
    main()
