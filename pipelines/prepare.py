"""Stage `prepare@<dataset>`: the dataset's files -> its canonical directory.

    python pipelines/prepare.py mosi --out data/prepared/mosi

`erc check-data <dataset>` shows what this would write, and every problem, without writing anything.
"""

import argparse

from erc.data import build_dataset
from erc.data.canonical import counts, save
from erc.evaluation.leakage import leakage_max_gap, probe_features
from erc.io import check_writable
from erc.params import load_params, stage_main


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    check_writable(args.out, folder=True)

    params = load_params(args.params)
    prepared, dialogues = build_dataset(params, args.dataset, source=args.params)
    probe_features(args.dataset, prepared.table, prepared.features, prepared.meta, max_gap=leakage_max_gap(params, source=args.params))
    save(prepared, args.out, expected_dialogues=dialogues)
    for split, c in counts(prepared.table).items():
        print(f"{args.dataset} {split}: {c}")


if __name__ == "__main__":
    main()
