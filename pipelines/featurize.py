"""Stage `featurize@<dataset>`: features for every utterance, one feature set per encoder in params.

    python pipelines/featurize.py meld --prepared data/prepared/meld --out data/features/meld \
        --timings reports/featurize/meld.json

Text: `featurize.encoders` (any transformers encoder or decoder LLM). Audio, for a dataset whose media
`featurize.media.<dataset>` names: `featurize.acoustic` (openSMILE, librosa) and `featurize.speech`
(wav2vec2, WavLM, HuBERT, the Whisper encoder, ...), or the subset that the media entry's `sets` lists.
Timings go to `--timings`, a metrics file apart from the features: they differ on every run, and inside the
features' folder they would change its hash and rerun every stage downstream.
"""

import argparse
import json

import torch

from erc.data.canonical import feature_set_names, load, load_features
from erc.evaluation.leakage import leakage_max_gap, probe_features
from erc.features.featurize import featurize_dataset
from erc.io import check_writable, locked_atomic_path, remove_stale_temps, write_json
from erc.params import load_params, stage_main
from erc.training.finetune import finetune_dataset


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timings", help="a JSON file for the encoders' and media passes' timing figures")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set featurize.encoders.minilm.batch_size=128")
    args = parser.parse_args()
    check_writable(args.out, folder=True)
    if args.timings:
        check_writable(args.timings)
    params = load_params(args.params, args.set)
    torch.manual_seed(0)

    prepared = load(args.prepared, feature_names=[])
    for stale in remove_stale_temps(args.out):
        print(f"removed {stale}: what a killed run of this stage left", flush=True)
    with locked_atomic_path(args.out) as tmp:
        tmp.mkdir()
        table_source = f"{args.prepared}/utterances.parquet"
        timings = {}
        for line in featurize_dataset(args.dataset, prepared, table_source, params, tmp, source=args.params,
                                      timings=timings):
            print(line, flush=True)
        for line in finetune_dataset(args.dataset, prepared, table_source, params, tmp, source=args.params):
            print(line, flush=True)
        # Every set it made gets the leakage probe; a fine-tuned encoder's (stage 1) learnt from training labels.
        gap = leakage_max_gap(params, source=args.params)
        for name in feature_set_names(tmp):
            fs = load_features(tmp, name)
            fs.info.setdefault("label_derived", bool(fs.info.get("finetune")))
            probe_features(args.dataset, prepared.table, {name: fs}, prepared.meta, max_gap=gap)
            (tmp / f"{name}.json").write_text(json.dumps(fs.describe(), indent=2) + "\n")
    if args.timings:
        write_json(args.timings, timings)


if __name__ == "__main__":
    main()
