"""From a paper's figure down to erc's leaderboard row, one measured step at a time (`reports/gap.md`).

A row is one (model, dataset), with its published figure where one was found (`published: null` where none was:
the row then starts at its first erc step and has no remainder). Its steps are groups of erc runs (the seeds of one
configuration, a train command's run list), each differing from the one before in one thing: the official
configuration under the paper protocol (best test epoch), the same run's last epoch, the same configuration selected
on validation, erc's widths, erc's tuned configuration (the leaderboard row). A step's figure is its seed mean; the
difference to the step before has a 95% bootstrap interval that draws the test dialogues (the same draw for both
steps) and each step's seeds. A step without test predictions (a paper run's last epoch: only the selected epoch's
are kept) gets an interval over the seeds alone. What no erc run can measure (the paper's own features, a model
hub, video) is the row's remainder: the published figure minus the first step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from erc.errors import ErcDataError
from erc.evaluation import leaderboard, stats

REPLICATES = 2000


@dataclass
class Step:
    name: str  # what this step is, e.g. "paper configuration, paper protocol (best test epoch)"
    runs: list[dict]  # {"seed", "run_id", metrics...} as a train command's run list holds them
    metric: str = "test_wf1"  # test_wf1 (the selected epoch's) or last_test_wf1 (a paper run's last epoch)
    note: str = ""

    @property
    def values(self) -> dict[int, float]:
        return {int(r["seed"]): float(r[self.metric]) for r in self.runs}

    @property
    def validation(self) -> float:
        """Mean validation weighted F1 of the selected epochs (NaN for the paper protocol, which has none)."""
        found = [float(r["selected_val_wf1"]) for r in self.runs if "selected_val_wf1" in r]
        return float(np.mean(found)) if found and self.metric == "test_wf1" else np.nan


@dataclass
class Row:
    model: str
    dataset: str
    published: float  # NaN where no published figure was found
    source: str  # where the published figure comes from (or where it was looked for)
    steps: list[Step] = field(default_factory=list)
    remainder: str = ""  # what the first step cannot include, with the papers' own ablations


def load_rows(spec_path) -> list[Row]:
    """The rows of a gap spec (YAML): per row model, dataset, published, source, remainder and steps, each step a
    name, a run list file (pipelines/train.py's --out) and the metric it reads."""
    import yaml

    path = Path(spec_path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ErcDataError(path, f"unreadable gap spec ({str(e).splitlines()[0]})") from None
    rows = []
    for i, entry in enumerate((spec or {}).get("rows") or []):
        try:
            steps = []
            for s in entry["steps"]:
                runs_file = path.parent / s["runs"]
                runs = json.loads(runs_file.read_text())["runs"]
                step = Step(s["name"], runs, s.get("metric", "test_wf1"), s.get("note", ""))
                missing = [r["run_id"] for r in runs if step.metric not in r]
                if missing:
                    raise ErcDataError(runs_file, f"runs {missing} have no {step.metric}")
                steps.append(step)
            published = np.nan if entry["published"] is None else float(entry["published"])
            rows.append(Row(entry["model"], entry["dataset"], published, entry["source"], steps,
                            entry.get("remainder", "")))
        except (KeyError, TypeError, ValueError, OSError) as e:
            raise ErcDataError(path, f"rows[{i}]: {type(e).__name__}: {e}") from None
    return rows


def difference_interval(a: np.ndarray, b: np.ndarray, *, replicates: int = REPLICATES, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Interval of mean wF1(b) - mean wF1(a); a, b: (seeds, dialogues, C, C) over the same dialogues. Each replicate
    draws the dialogues once for both and each side's seeds on its own (they are different runs)."""
    rng = np.random.default_rng(seed)
    dialogues = a.shape[1]
    counts = rng.multinomial(dialogues, np.full(dialogues, 1.0 / dialogues), size=replicates).astype(np.float64)
    means = []
    for conf in (a, b):
        per_seed = stats.weighted_f1(np.einsum("rd,sdij->rsij", counts, conf))  # (replicates, seeds)
        drawn = rng.integers(0, conf.shape[0], size=(replicates, conf.shape[0]))
        means.append(np.take_along_axis(per_seed, drawn, axis=1).mean(1))
    tail = (1 - level) / 2
    low, high = np.quantile(means[1] - means[0], [tail, 1 - tail])
    return float(low), float(high)


def seed_interval(a: list[float], b: list[float], *, paired: bool = False, replicates: int = REPLICATES, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Interval of mean(b) - mean(a) drawing the seeds only (no predictions to draw dialogues from); `paired`: a and b
    are two figures of the same runs (seed k with seed k), drawn together."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if paired:
        diff = rng.choice(b - a, size=(replicates, len(a))).mean(1)
    else:
        diff = rng.choice(b, size=(replicates, len(b))).mean(1) - rng.choice(a, size=(replicates, len(a))).mean(1)
    tail = (1 - level) / 2
    low, high = np.quantile(diff, [tail, 1 - tail])
    return float(low), float(high)


def confusions_of(steps: list[Step], predictions: dict[str, pd.DataFrame]) -> dict[str, np.ndarray]:
    """(dialogues, C, C) per run with predictions, over one dialogue and label index (the leaderboard's)."""
    runs = pd.DataFrame([{"dataset": "row", "run_id": r["run_id"]} for s in steps for r in s.runs
                         if r["run_id"] in predictions], columns=["dataset", "run_id"]).drop_duplicates()
    return leaderboard.dataset_confusions(runs, predictions) if len(runs) else {}


def row_table(row: Row, predictions: dict[str, pd.DataFrame], *, replicates: int = REPLICATES) -> pd.DataFrame:
    """One line per step: seeds, mean, std, and the difference to the line before with its interval."""
    confusions = confusions_of([s for s in row.steps if s.metric == "test_wf1"], predictions)
    found = not np.isnan(row.published)
    out = [{"step": f"published ({row.source})" if found else f"no published figure ({row.source})", "seeds": "",
            "val": np.nan, "wf1": row.published, "std": np.nan,
            "change": np.nan, "low": np.nan, "high": np.nan, "interval": ""}]
    previous = None
    for step in row.steps:
        values = step.values
        line = {"step": step.name + (f" ({step.note})" if step.note else ""), "seeds": len(values), "val": step.validation,
                "wf1": float(np.mean(list(values.values()))),
                "std": float(np.std(list(values.values()), ddof=1)) if len(values) > 1 else np.nan}
        if previous is None:
            line.update(change=line["wf1"] - row.published, low=np.nan, high=np.nan,
                        interval="remainder" if found else "")
        else:
            line["change"] = line["wf1"] - out[-1]["wf1"]
            both = [previous, step]
            same_runs = [r["run_id"] for r in previous.runs] == [r["run_id"] for r in step.runs]
            if min(len(previous.runs), len(step.runs)) < 2 and not same_runs:
                alone = "this step" if len(step.runs) < 2 else "the step above"
                line.update(low=np.nan, high=np.nan, interval=f"none ({alone} has one seed)")
            elif not same_runs and all(s.metric == "test_wf1" and all(r["run_id"] in confusions for r in s.runs) for s in both):
                low, high = difference_interval(*(np.stack([confusions[r["run_id"]] for r in s.runs]) for s in both),
                                                replicates=replicates)
                line.update(low=low, high=high, interval="dialogues and seeds")
            else:
                low, high = seed_interval(list(previous.values.values()), list(values.values()), paired=same_runs,
                                          replicates=replicates)
                line.update(low=low, high=high, interval="same runs, seeds" if same_runs else "seeds only")
        out.append(line)
        previous = step
    return pd.DataFrame(out)


def to_markdown(rows: list[Row], tables: list[pd.DataFrame]) -> str:
    lines = ["# From the published figure to erc's leaderboard row", "",
             "Test weighted F1 (%), and the selected epochs' validation weighted F1 where a step selects on validation "
             "(the paper protocol has none). Each step is a group of erc runs (its seeds) that differs from the step above in "
             "one thing; *change* is its seed mean minus the line above, with a 95% bootstrap interval (dialogues and "
             "seeds drawn, or the seeds alone where a step has no test predictions). The first change is the "
             "remainder no erc run measures: the paper's features, widths or protocol details named below. "
             "Written by `python pipelines/gap.py`.", ""]
    for row, table in zip(rows, tables):
        lines += [f"## {row.model} on {row.dataset}", "",
                  "| step | seeds | validation wF1 | test wF1 | std | change | 95% interval |", "|---|---|---|---|---|---|---|"]
        for _, t in table.iterrows():
            interval = (f"[{t['low']:+.2f}, {t['high']:+.2f}] ({t['interval']})" if not np.isnan(t["low"])
                        else t["interval"])
            std = "" if np.isnan(t["std"]) else f"{t['std']:.2f}"
            change = "" if np.isnan(t["change"]) else f"{t['change']:+.2f}"
            val = "" if np.isnan(t["val"]) else f"{t['val']:.2f}"
            wf1 = "" if np.isnan(t["wf1"]) else f"{t['wf1']:.2f}"
            lines.append(f"| {t['step']} | {t['seeds']} | {val} | {wf1} | {std} | {change} | {interval} |")
        if row.remainder:
            label = "Remainder" if not np.isnan(row.published) else "Beyond these runs"
            lines += ["", f"{label}: {row.remainder}"]
        lines.append("")
    inflation = selection_inflation(rows)
    if len(inflation):
        lines += ["## What picking the epoch on test adds", "",
                  "Per row with a paper-protocol step: the best test epoch's weighted F1 minus the last epoch's, "
                  "the same runs (no selection at all); 95% interval over the seeds, paired.", "",
                  "| model | dataset | step | seeds | best test epoch | last epoch | inflation | 95% interval |",
                  "|---|---|---|---|---|---|---|---|"]
        for _, t in inflation.iterrows():
            lines.append(f"| {t['model']} | {t['dataset']} | {t['step']} | {t['seeds']} | {t['best']:.2f} | "
                         f"{t['last']:.2f} | {t['inflation']:+.2f} | [{t['low']:+.2f}, {t['high']:+.2f}] |")
        lines.append("")
    return "\n".join(lines)


def selection_inflation(rows: list[Row], *, replicates: int = REPLICATES) -> pd.DataFrame:
    """Per row, best test epoch minus last epoch for every step read as test_wf1 whose runs another step reads as
    last_test_wf1: the inflation from selecting the epoch on test alone."""
    out = []
    for row in rows:
        for best in (s for s in row.steps if s.metric == "test_wf1"):
            ids = [r["run_id"] for r in best.runs]
            last = next((s for s in row.steps if s.metric == "last_test_wf1" and [r["run_id"] for r in s.runs] == ids),
                        None)
            if last is None:
                continue
            b, l = list(best.values.values()), list(last.values.values())
            low, high = seed_interval(l, b, paired=True, replicates=replicates)
            out.append({"model": row.model, "dataset": row.dataset, "step": best.name, "seeds": len(b),
                        "best": float(np.mean(b)), "last": float(np.mean(l)), "inflation": float(np.mean(b) - np.mean(l)),
                        "low": low, "high": high})
    return pd.DataFrame(out, columns=["model", "dataset", "step", "seeds", "best", "last", "inflation", "low", "high"])
