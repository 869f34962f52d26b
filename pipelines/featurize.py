"""Stage `featurize@<dataset>`: text features for every utterance, one feature set per encoder in params.

    python pipelines/featurize.py meld --prepared data/prepared/meld --out data/features/meld
"""

import argparse
import json

import torch

from erc.data.canonical import FeatureSet, load, save_features
from erc.features import encode_texts, load_encoder
from erc.io import atomic_path
from erc.config import leakage_max_gap
from erc.leakage import probe_features
from erc.params import load_params, stage_main


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    all_params = load_params(args.params)
    params = all_params["featurize"]
    torch.manual_seed(0)

    prepared = load(args.prepared, feature_names=[])
    table = prepared.table
    with atomic_path(args.out) as tmp:
        for name, spec in params["encoders"].items():
            tokenizer, model = load_encoder(spec["model"])
            values, timing = encode_texts(table["text"].tolist(), tokenizer, model,
                                          batch_size=params["batch_size"], max_length=spec.get("max_length", 128),
                                          pooling=spec.get("pooling", "mean"))
            info = {**{k: spec[k] for k in spec}, "label_derived": False}
            fs = FeatureSet(name, "text", values, [f"{args.prepared}/utterances.parquet"], None, info)
            probe_features(args.dataset, table, {name: fs}, prepared.meta, max_gap=leakage_max_gap(all_params, source=args.params))
            save_features(tmp, fs)
            print(f"{args.dataset} {name}: {len(table)} utterances, {timing['utterances_per_s']:.0f} utterances/s")
            (tmp / f"{name}.timing.json").write_text(json.dumps(timing) + "\n")


if __name__ == "__main__":
    main()
