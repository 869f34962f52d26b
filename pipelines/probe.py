"""Stage `probe@<dataset>`: a linear probe with speaker-independent folds on every audio feature set of a dataset.

    python pipelines/probe.py urdu --prepared data/prepared/urdu --features data/features/urdu --out reports/probe/urdu.json

Prints one line per feature set (mean accuracy over the folds; chance is 1 / number of classes) and writes
them as DVC metrics. All utterances take part (the prepared split is not used: the folds are the split).
"""

import argparse

from erc.data.canonical import feature_set_names, load
from erc.evaluation.probe import speaker_independent_probe
from erc.io import check_writable, write_json
from erc.params import load_params, stage_main


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--features", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    check_writable(args.out)
    options = load_params(args.params).get("probe") or {}

    names = feature_set_names(args.features)
    prepared = load(args.prepared, extra_feature_dirs=[args.features], feature_names=names)
    table = prepared.table
    labels = table["emotion_id"].to_numpy()
    results = {}
    for name, fs in prepared.features.items():
        if fs.modality != "audio":
            continue
        keep = fs.present if fs.present is not None else slice(None)
        results[name] = speaker_independent_probe(fs.values[keep], labels[keep], table["speaker"].to_numpy()[keep],
                                                  folds=options.get("folds", 5), C=options.get("C", 1.0))
        r = results[name]
        print(f"{args.dataset} {name} ({r['dim']}-d): accuracy {100 * r['accuracy_mean']:.1f} ± "
              f"{100 * r['accuracy_std']:.1f}, balanced {100 * r['balanced_accuracy_mean']:.1f} "
              f"(chance {100 * r['chance']:.0f}; {r['folds']} speaker-independent folds)")
    write_json(args.out, {"dataset": args.dataset, "utterances": int(len(table)),
                          "speakers": int(table["speaker"].nunique()), "sets": results})


if __name__ == "__main__":
    main()
