"""Stage `train@<dataset>-<model>`: one Ray Train run per seed, each an MLflow run; writes the run list.

    python pipelines/train.py --dataset meld --model baseline --out runs/meld/baseline.json
"""

import argparse
import json

from erc.errors import ErcDataError
from erc.io import write_json
from erc.models import MODELS
from erc.params import load_params, stage_main
from erc.train import TrainConfig, init_ray, run


def configs(params: dict, dataset: str, model: str, source="params.yaml") -> list[TrainConfig]:
    if model not in MODELS:
        raise ErcDataError(source, f"unknown model {model!r}; registered: {sorted(MODELS)}")
    if dataset not in params.get("inputs", {}):
        raise ErcDataError(source, f"no inputs.{dataset} entry (which feature set feeds which modality)")
    train = params["train"]
    shared = {k: v for k, v in train.items() if k not in ("seeds", "per_dataset")}
    shared.update((train.get("per_dataset") or {}).get(dataset, {}))
    model_config = params.get("models", {}).get(model) or {}
    try:
        MODELS[model].Config(**model_config)
        return [TrainConfig(dataset=dataset, prepared=f"data/prepared/{dataset}",
                            feature_dirs=[f"data/features/{dataset}"], inputs=params["inputs"][dataset], model=model,
                            model_config=model_config, seed=seed, **shared)
                for seed in train["seeds"]]
    except TypeError as e:  # an unknown key in train or models.<model>
        raise ErcDataError(source, f"bad train/models.{model} params ({e})") from None


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    runs = configs(load_params(args.params), args.dataset, args.model, args.params)
    init_ray()
    results = [run(cfg) for cfg in runs]
    write_json(args.out, {"dataset": args.dataset, "model": args.model, "runs": results})
    for r in results:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items() if k in
                          ("seed", "run_id", "test_wf1", "test_acc", "test_acc2", "selected_epoch")}))


if __name__ == "__main__":
    main()
