"""`erc check-data <dataset>`: what the prepare stage would write for a dataset, and every problem, writing nothing.

    erc check-data meld
    erc check-data mycorpus --params params.yaml --dialogues 3

It runs the dataset's adapter and the canonical checks, then prints the files read, the counts per split and
label, the label lists (as meta.json would hold them), a warning for a label that valid or test hold and train
lacks, and the first dialogues; or every problem found, one line each (the generic adapter checks every row; a
built-in adapter stops at its first problem; a split with no dialogue, or no label of the target task, is a
problem). Exit status 1 when there is a problem.
"""

from __future__ import annotations

import argparse
import sys

from erc.data import build_dataset
from erc.data.canonical import SPLITS, counts, unseen_labels, validate
from erc.data.conversations import DataProblems
from erc.errors import ErcDataError
from erc.params import load_params


def describe(prepared, dialogues: list[str], *, name: str, shown: int) -> list[str]:
    table, meta = prepared.table, prepared.meta
    lines = [f"{name}: {len(table)} utterances in {table['dialogue_id'].nunique()} dialogues; "
             f"target {meta['target']}"]
    lines.append("files:")
    lines += [f"  {key}: {entry.get('path') or entry.get('url')}" for key, entry in meta["sources"].items()]
    lines.append("labels (meta.json):")
    for task in ("emotion", "sentiment"):
        if meta[f"{task}_labels"]:
            lines.append(f"  {task}: {meta[f'{task}_labels']}")
    lines.append("counts:")
    for split, c in counts(table).items():
        lines.append(f"  {split}: {c['dialogues']} dialogues, {c['utterances']} utterances")
        for task in ("emotion", "sentiment"):
            if task in c:
                lines.append(f"    {task}: " + ", ".join(f"{label} {n}" for label, n in c[task].items()))
    lines += [f"note: {note}" for note in meta.get("notes", [])]
    unseen = unseen_labels(table, meta["target"])
    if unseen:
        lines.append(f"warning: {meta['target']} label{'s' if len(unseen) > 1 else ''} {', '.join(map(repr, unseen))} "
                     "in valid or test but in no training utterance: the model never learns "
                     f"{'them' if len(unseen) > 1 else 'it'} (add training dialogues with "
                     f"{'them' if len(unseen) > 1 else 'it'})")
    lines.append(f"first dialogues ({min(shown, len(dialogues))} of {len(dialogues)}):")
    first = [d for split in SPLITS for d in table.loc[table["split"] == split, "dialogue_id"].unique()][:shown]
    for dialogue in first:
        part = table[table["dialogue_id"] == dialogue]
        lines.append(f"  {dialogue} ({part['split'].iloc[0]}, {len(part)} utterances)")
        for _, u in part.iterrows():
            labels = "/".join(x for x in (u["emotion"], u["sentiment"]) if x)
            lines.append(f"    {u['turn']:>3} {u['utterance_id']}  {u['speaker'] or '-'}: {u['text'][:70]!r} [{labels}]")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="erc check-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a datasets.<name> entry of params")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--dialogues", type=int, default=2, help="how many dialogues to show (default 2)")
    args = parser.parse_args(argv)

    try:
        params = load_params(args.params)
        prepared, dialogues = build_dataset(params, args.dataset, source=args.params)
        validate(prepared, where=f"{args.dataset} (as prepared)", expected_dialogues=dialogues)
    except DataProblems as e:
        print(f"{args.dataset}: {len(e.problems)} problem(s); nothing was written", file=sys.stderr)
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except ErcDataError as e:
        print(f"{args.dataset}: 1 problem; nothing was written", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 1
    print("\n".join(describe(prepared, dialogues, name=args.dataset, shown=args.dialogues)))
    print("problems: none (`dvc repro prepare@{0}` writes it)".format(args.dataset))
    return 0
