"""Stage `prepare@<dataset>`: the dataset's public files -> its canonical directory.

    python pipelines/prepare.py mosi --out data/prepared/mosi
"""

import argparse

from erc.data import ADAPTERS
from erc.data.canonical import counts, save
from erc.leakage import probe_features
from erc.params import load_params, stage_main
from erc.sources import DatasetFiles


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    params = load_params(args.params)
    entry = params["datasets"][args.dataset]
    prepared, dialogues = ADAPTERS[entry["adapter"]](DatasetFiles(entry["files"]), entry.get("options") or {})
    probe_features(args.dataset, prepared.table, prepared.features, prepared.meta, max_gap=params["leakage"]["max_gap"])
    save(prepared, args.out, expected_dialogues=dialogues)
    for split, c in counts(prepared.table).items():
        print(f"{args.dataset} {split}: {c}")


if __name__ == "__main__":
    main()
