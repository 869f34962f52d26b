"""The report people open: one self-contained HTML page over the leaderboard's runs, and the same in MLflow.

For every run of the leaderboard, its logged model (`erc.serving.predict.load_model`) is evaluated again on the test
split: with every modality (confusion matrices), with each modality removed (`erc.evaluation.robustness`), and with its
gates and routers read out (`erc.evaluation.gates`). The page holds, per dataset, the leaderboard as a forest plot
(intervals, significance against the baseline, the published numbers of docs/models.md beside erc's, marked with their
protocol) and a short table (the full one folded away), per-class F1 as a heat map, the robustness drops as bars, the
gap table (reports/gap.md), the gate and router plots, confusion matrices and learning curves; every picture is
embedded, so the page is one file, and fits a 1280 px window (wide tables scroll in their own box).
The same files go to an MLflow run, the parent of the leaderboard's runs, so that `mlflow ui` shows them together.
"""

from __future__ import annotations

import base64
import html
import io
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from erc import tracking
from erc.errors import ErcDataError
from erc.evaluation import gates as gate_stats
from erc.evaluation import leaderboard as lb
from erc.evaluation import robustness
from erc.evaluation.inference import infer
from erc.metrics import confusion

PUBLISHED_PROTOCOL = "test-selected, seeds unknown"
DATASET_NAMES = {"iemocap-6": "iemocap", "iemocap": "iemocap", "meld": "meld", "mosi": "mosi", "cmu-mosi": "mosi"}
REPORTED = re.compile(r"Reported weighted F1[^:]*:\s*((?:[A-Za-z0-9-]+ \d+(?:\.\d+)?(?:,\s*|\.|\s|$))+)")


def published_numbers(models_md) -> pd.DataFrame:
    """The published figures quoted in docs/models.md: model, dataset, paper, metric, value, protocol.

    Read from each model section's "Reported weighted F1 (...): IEMOCAP-6 74.08, MELD 66.60." sentence."""
    path = Path(models_md)
    try:
        text = path.read_text()
    except OSError as e:
        raise ErcDataError(path, f"unreadable ({e.strerror})") from None
    rows = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        name = re.match(r"`([^`]+)`", section)
        flat = " ".join(section.split())
        found = REPORTED.search(flat)
        if not name or not found:
            continue
        paper = re.search(r"arXiv (\d{4}\.\d{4,5})", flat)
        for dataset, value in re.findall(r"([A-Za-z][A-Za-z0-9-]*) (\d+(?:\.\d+)?)", found.group(1)):
            if dataset.lower() in DATASET_NAMES:
                rows.append({"model": name.group(1), "dataset": DATASET_NAMES[dataset.lower()],
                             "paper": f"arXiv {paper.group(1)}" if paper else "", "metric": "wf1",
                             "value": float(value), "protocol": PUBLISHED_PROTOCOL})
    return pd.DataFrame(rows, columns=["model", "dataset", "paper", "metric", "value", "protocol"])


def read_gap(path) -> str | None:
    """reports/gap.md's text (pipelines/gap.py writes it), or None where there is none yet."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ErcDataError(path, f"unreadable ({getattr(e, 'strerror', None) or e})") from None


# ---------------------------------------------------------------- evaluating the runs again


@dataclass
class Evaluated:
    """What the report computed from the leaderboard's runs."""

    robustness: pd.DataFrame  # one row per run and removed modality
    gates: pd.DataFrame  # one row per run, gate and expert
    confusions: dict = field(default_factory=dict)  # (dataset, model) -> (labels, pooled confusion matrix)
    labels: dict = field(default_factory=dict)  # dataset -> label names


def held_out(info: dict, data_dir, cache: dict):
    """The test split of the model's dataset with the model's feature sets, from `data_dir` (loaded once)."""
    from erc.training.config import TrainConfig
    from erc.training.task import load_task

    speakers = "name" if info.get("speaker_names") else "appearance"  # as the model was trained
    key = (info["dataset"], tuple(sorted(info["inputs"].items())), speakers)
    if key not in cache:
        data = Path(data_dir)
        cfg = TrainConfig(dataset=info["dataset"], prepared=str(data / "prepared" / info["dataset"]),
                          feature_dirs=[str(data / "features" / info["dataset"])], inputs=dict(info["inputs"]),
                          speakers=speakers)
        cache[key] = load_task(cfg, splits=("test",)).splits["test"]
    return cache[key]


def evaluate(runs: pd.DataFrame, data_dir, tracking_uri: str, progress=print) -> Evaluated:
    """Every run's logged model on the test split: robustness rows, gate statistics, pooled confusion matrices."""
    from erc.models.checkpoint import load_model

    robust, gate_rows, confusions, labels, cache = [], [], {}, {}, {}
    for row in runs.itertuples():
        loaded = load_model(row.run_id, tracking_uri)
        data = held_out(loaded.info, data_dir, cache)
        names = loaded.info["labels"]
        labels[row.dataset] = names
        full = infer(loaded.model, data)
        keys = {"dataset": row.dataset, "model": row.model, "features": row.features, "seed": row.seed,
                "run_id": row.run_id}
        for r in robustness.modality_drops(loaded.model, data, names, full=full):
            robust.append({**keys, **r})
        stats = gate_stats.statistics(full, names)
        if len(stats):
            gate_rows.append(stats.assign(**keys))
        labelled = full.labels >= 0
        cm = confusion(full.labels[labelled], full.pred[labelled], len(names))
        key = (row.dataset, row.model)
        confusions[key] = (names, confusions[key][1] + cm if key in confusions else cm)
        progress(f"report: {row.dataset}/{row.model}/seed{row.seed} evaluated")
    return Evaluated(pd.DataFrame(robust), pd.concat(gate_rows, ignore_index=True) if gate_rows else pd.DataFrame(),
                     confusions, labels)


def learning_curves(client, runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch validation weighted F1 of every run (dataset, model, seed, epoch, metric, value)."""
    rows = []
    for row in runs.itertuples():
        for m in client.get_metric_history(row.run_id, "val_wf1"):
            rows.append({"dataset": row.dataset, "model": row.model, "seed": row.seed, "epoch": m.step,
                         "metric": "val_wf1", "value": m.value})
    return pd.DataFrame(rows, columns=["dataset", "model", "seed", "epoch", "metric", "value"])


# ---------------------------------------------------------------- tables and pictures


# Column names as people read them, for every table and figure of the page (one mapping, here).
HUMAN_NAMES = {"dataset": "dataset", "variant": "variant", "model": "model", "features": "features", "n_seeds": "seeds",
               "wf1": "weighted F1", "acc": "accuracy", "macro_f1": "macro F1", "acc2": "binary accuracy",
               "wf1_binary": "binary weighted F1", "acc7": "7-class accuracy", "mae": "mean absolute error",
               "corr": "correlation", "params_total": "parameters", "params_trainable": "trainable parameters",
               "train_s_per_epoch": "s/epoch", "infer_ms_per_dialogue": "ms/dialogue", "peak_rss_mb": "peak MB",
               "class_weights": "class weights", "label_derived": "inputs learnt with labels",
               "leakage_warning": "leakage probe warning", "wf1_ci": "95% interval", "p_vs_baseline": "p vs baseline",
               "p_vs_best": "p vs best"}
PUBLISHED_COLUMN = f"published weighted F1 ({PUBLISHED_PROTOCOL})"
DIGITS = {"mae": 3, "corr": 3, "peak_rss_mb": 0}  # as the leaderboard's markdown rounds them


def human(column: str) -> str:
    return HUMAN_NAMES.get(column, column.replace("_", " "))


def _published_for(board: pd.DataFrame, published: pd.DataFrame) -> list[float]:
    """The published weighted F1 of each board row's model and dataset (NaN where docs/models.md quotes none)."""
    ref = {(r.model, r.dataset): r.value for r in published.itertuples()}
    return [ref.get((m.split("-")[0], d), np.nan) for m, d in zip(board["model"], board["dataset"])]


def _significant(value) -> bool:
    """A significance flag as the leaderboard CSV reads back: True, False, or empty (no test: the baseline itself)."""
    return value is not None and not pd.isna(value) and bool(value)


def _interval(row) -> str:
    low, high = row.get("wf1_ci_low"), row.get("wf1_ci_high")
    return "" if low is None or pd.isna(low) else f"[{lb.format_number(low)}, {lb.format_number(high)}]"


def leaderboard_display(board: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Every column of the leaderboard as shown, under its human name and rounded as the leaderboard's markdown:
    `<m>_mean` ± `<m>_std` in one cell, the interval in one, p with its * of significance, parameters in millions,
    and the published weighted F1 beside erc's."""
    rows = [row.to_dict() for _, row in board.iterrows()]
    out, done = {}, {"wf1_ci_high", "significant_vs_baseline", "significant_vs_best"}
    for col in board.columns:
        if col in done:
            continue
        base = col.removesuffix("_mean")
        if col.endswith("_mean"):
            out[human(base)] = [lb.format_mean_std(r, base, DIGITS.get(base, 2)) for r in rows]
            done.add(f"{base}_std")
            if base == "wf1":
                out[PUBLISHED_COLUMN] = [lb.format_number(v) for v in _published_for(board, published)]
        elif col == "wf1_ci_low":
            out[human("wf1_ci")] = [_interval(r) for r in rows]
        elif col.startswith("p_vs_"):
            flag = col.replace("p_vs_", "significant_vs_")
            out[human(col)] = [lb.format_p(r[col], _significant(r.get(flag))) for r in rows]
        elif col.startswith("params_"):
            out[human(col)] = [lb.format_millions(r[col]) for r in rows]
        else:
            out[human(col)] = [lb.format_number(v, DIGITS.get(col, 2)) if isinstance(v, float)
                               else ("" if pd.isna(v) else v) for v in board[col]]
    return pd.DataFrame(out, index=board.index)


def _row_names(part: pd.DataFrame) -> list[str]:
    """A dataset's rows by model, with the variant and features where the dataset has more than one."""
    names = part["model"].astype(str)
    for col in ("variant", "features"):
        if col in part and part[col].nunique() > 1:
            names = names + " (" + part[col].astype(str) + ")"
    return names.tolist()


def short_leaderboard(board: pd.DataFrame, published: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """One dataset's leaderboard in the columns a reader compares: model, weighted F1 ± std, its interval, p against
    the baseline, parameters, s/epoch, and the published figure."""
    part = board[board["dataset"] == dataset]
    rows = [row.to_dict() for _, row in part.iterrows()]
    table = {"model": _row_names(part), human("wf1"): [lb.format_mean_std(r, "wf1") for r in rows],
             human("wf1_ci"): [_interval(r) for r in rows],
             human("p_vs_baseline"): [lb.format_p(r.get("p_vs_baseline"),
                                                  _significant(r.get("significant_vs_baseline"))) for r in rows],
             human("params_total"): [lb.format_millions(r.get("params_total", np.nan)) for r in rows],
             human("train_s_per_epoch"): [lb.format_number(r.get("train_s_per_epoch")) for r in rows],
             "published (test-selected)": [lb.format_number(v) for v in _published_for(part, published)]}
    return pd.DataFrame(table)


def per_class_f1(runs: pd.DataFrame, labels: dict) -> dict[str, pd.DataFrame]:
    """Per dataset: test F1 per class (rows: model), mean over seeds."""
    tables = {}
    for dataset, part in runs.groupby("dataset"):
        cols = [f"f1_{label}" for label in labels.get(dataset, []) if f"f1_{label}" in part]
        if cols:
            table = part.groupby("model")[cols].mean()
            tables[dataset] = table.rename(columns=lambda c: c[len("f1_"):])
    return tables


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def leaderboard_png(board: pd.DataFrame, published: pd.DataFrame, dataset: str) -> bytes:
    """One dataset's leaderboard as a forest plot: each model's test weighted F1 with its 95% bootstrap interval,
    filled where it differs from the baseline (Holm-corrected p < ALPHA) and hollow where not, the baseline's row
    shaded with a line at its mean, and the published figure (test-selected) as a grey diamond on its row."""
    from matplotlib.figure import (
        Figure,  # not pyplot: no backend or global figure state
    )
    from matplotlib.lines import Line2D

    part = board[board["dataset"] == dataset].reset_index(drop=True)
    part = part.assign(name=_row_names(part), published=_published_for(part, published)).iloc[::-1]  # first on top
    height = 0.42 * len(part) + 2.1
    fig = Figure(figsize=(8, height))
    ax = fig.subplots()
    has_ci = "wf1_ci_low" in part and part["wf1_ci_low"].notna().any()
    for y, row in enumerate(part.to_dict("records")):
        baseline = row["model"] == "baseline"
        if baseline:
            ax.axhspan(y - 0.5, y + 0.5, color="#fff3c4", zorder=0)
            ax.axvline(row["wf1_mean"], color="#b08800", linestyle="--", linewidth=1, zorder=1)
        if has_ci and not pd.isna(row.get("wf1_ci_low")):
            ax.plot([row["wf1_ci_low"], row["wf1_ci_high"]], [y, y], color="C0", linewidth=2, zorder=2)
        significant = _significant(row.get("significant_vs_baseline"))
        ax.plot(row["wf1_mean"], y, marker="s" if baseline else "o", markersize=8, color="C0", zorder=3,
                markerfacecolor="C0" if significant or baseline else "white")
        if not pd.isna(row["published"]):
            ax.plot(row["published"], y, marker="D", markersize=7, color="0.45", linestyle="none", zorder=3)
        p = lb.format_p(row.get("p_vs_baseline"), significant)
        if p:
            ax.annotate(f"p {p}" if p.startswith("<") else f"p = {p}", (1.01, y), xycoords=("axes fraction", "data"),
                        va="center", fontsize=8)
    ax.set_yticks(range(len(part)), part["name"])
    ax.set_ylim(-0.6, len(part) - 0.4)
    ax.set_xlabel("test weighted F1 (%), mean over seeds" + (" with its 95% bootstrap interval" if has_ci else ""))
    ax.set_title(f"{dataset}: which models differ from the baseline (shaded row, dashed line)", fontsize=10)
    ax.grid(axis="x", color="0.9")
    handles = [Line2D([], [], marker="o", color="C0", linestyle="none",
                      label=f"differs from baseline (p < {lb.ALPHA})"),
               Line2D([], [], marker="o", color="C0", markerfacecolor="white", linestyle="none",
                      label="no difference shown"),
               Line2D([], [], marker="D", color="0.45", linestyle="none", label="published, test-selected")]
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=3, frameon=False)
    fig.tight_layout(rect=(0, 0.3 / height, 1, 1))
    return _png(fig)


def per_class_png(table: pd.DataFrame, dataset: str) -> bytes:
    """Per-class test F1 as a heat map (models x classes), the figure written in each cell."""
    from matplotlib.figure import Figure

    values = table.to_numpy(dtype=float)
    fig = Figure(figsize=(0.85 * values.shape[1] + 2.8, 0.42 * values.shape[0] + 1.6))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(values.shape[1]), table.columns, rotation=30, ha="right")
    ax.set_yticks(range(values.shape[0]), table.index)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > 60 else "white")
    fig.colorbar(image, ax=ax, label="test F1 (%)")
    ax.set_title(f"{dataset}: test F1 per class, mean over seeds", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def robustness_png(robust: pd.DataFrame, dataset: str) -> bytes:
    """The drop in test weighted F1 without each modality, a bar per model and removed modality (± std over seeds)."""
    from matplotlib.figure import Figure

    part = robust[robust["dataset"] == dataset]
    models, modalities = sorted(part["model"].unique()), sorted(part["modality"].unique())
    fig = Figure(figsize=(6.5, 0.32 * len(models) + 1.3))
    ax = fig.subplots()
    height = 0.8 / len(modalities)
    for k, modality in enumerate(modalities):
        rows = part[part["modality"] == modality].set_index("model").reindex(models)
        ax.barh(np.arange(len(models)) + (k - (len(modalities) - 1) / 2) * height, rows["wf1_drop_mean"], height,
                xerr=rows["wf1_drop_std"].fillna(0), label=f"without {modality}", color=f"C{k + 1}", capsize=2)
    ax.set_yticks(range(len(models)), models)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel("drop in test weighted F1 (points), mean ± std over seeds")
    ax.set_title(f"{dataset}: what each modality carries", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def curves_png(curves: pd.DataFrame, dataset: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = curves[(curves["dataset"] == dataset) & (curves["metric"] == "val_wf1")]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (model, by_model) in enumerate(part.groupby("model")):
        for j, (_, run) in enumerate(by_model.groupby("seed")):
            ax.plot(run["epoch"], run["value"], color=f"C{i}", alpha=0.8, linewidth=1, label=model if j == 0 else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation weighted F1")
    ax.set_title(f"{dataset}: validation weighted F1 per epoch (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# ---------------------------------------------------------------- the page


STYLE = """*{box-sizing:border-box}body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1150px;
padding:0 1em;color:#222;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px;max-width:100%}th,td{border:1px solid #ccc;
padding:3px 7px}th{background:#f0f0f0}td{text-align:right}td:first-child{text-align:left}
.wide{overflow-x:auto;max-width:100%}.wide table{overflow-wrap:normal}.md td{text-align:left}
details{margin:.3em 0 1.5em}summary{cursor:pointer;color:#0550ae}
img{max-width:100%;height:auto;border:1px solid #eee;margin:4px}.confusion img{max-width:360px}
.note{color:#555;font-size:13px}.gap p{font-size:14px}figure{display:inline-block;max-width:100%;margin:0}"""


def _table(frame: pd.DataFrame, table_id: str, index: bool = False) -> str:
    return frame.to_html(table_id=table_id, index=index, na_rep="", escape=True, border=0,
                         float_format=lambda v: f"{v:.2f}")


def _wide(content: str) -> str:
    """A wide table scrolls in its own box, so the page itself never widens."""
    return f"<div class='wide'>{content}</div>"


def _details(summary: str, content: str) -> str:
    return f"<details><summary>{html.escape(summary)}</summary>{_wide(content)}</details>"


def _image(png: bytes, alt: str, section: str, image_id: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    ident = f' id="{html.escape(image_id)}"' if image_id else ""
    return (f'<figure class="{section}"><img{ident} alt="{html.escape(alt)}" '
            f'src="data:image/png;base64,{data}"></figure>')


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", text)


def markdown_html(text: str) -> str:
    """The markdown that erc's programs write (headings, paragraphs, pipe tables; `code` and *emphasis*) as HTML,
    every table in its own scrolling box. Headings go two levels down: the page's sections are its h2."""
    out, paragraph, table = [], [], []

    def flush():
        if paragraph:
            out.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if table:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                     if not re.fullmatch(r"\|?[\s:|-]+\|?", line.strip())]
            head, body = cells[0], cells[1:]
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append(_wide(f"<table class='md'><thead><tr>{''.join(f'<th>{_inline(c)}</th>' for c in head)}"
                             f"</tr></thead><tbody>{rows}</tbody></table>"))
            table.clear()

    for line in text.splitlines():
        heading = re.match(r"(#{1,4})\s+(.*)", line)
        if line.lstrip().startswith("|"):
            if paragraph:
                flush()
            table.append(line)
        elif heading or not line.strip():
            flush()
            if heading:
                level = min(len(heading.group(1)) + 2, 6)
                out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        else:
            if table:
                flush()
            paragraph.append(line.strip())
    flush()
    return "\n".join(out)


def page(*, board: pd.DataFrame, published: pd.DataFrame, classes: dict, robust: pd.DataFrame,
         images: dict[str, list[tuple[str, bytes]]], charts: dict[tuple[str, str], bytes], generated: str,
         gap: str | None = None) -> str:
    """The report as one HTML string; `images`: section -> [(caption, PNG bytes)]; `charts`: (kind, dataset) -> PNG
    bytes of the per-dataset pictures (kinds: leaderboard, per_class, robustness); `gap`: reports/gap.md's text."""
    datasets = sorted(board["dataset"].unique())
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
             "<meta name='viewport' content='width=device-width, initial-scale=1'><title>erc report</title>"
             f"<style>{STYLE}</style></head><body>", "<h1>erc report</h1>",
             f"<p class='note'>{html.escape(generated)}</p>",
             "<h2 id='leaderboard-section'>Leaderboard</h2>",
             "<p class='note'>Test-split figures (percent) of the checkpoint selected on validation weighted F1, "
             "mean ± sample std over seeds; 95% interval: bootstrap over seeds and test dialogues; p: approximate "
             f"randomisation against the dataset's baseline, Holm-corrected, * below {lb.ALPHA}. The published figures "
             "quote the papers (docs/models.md), whose epochs were selected on the test split with unknown seeds "
             f"({PUBLISHED_PROTOCOL}): not comparable one to one.</p>"]
    for dataset in datasets:
        parts.append(f"<h3>{html.escape(dataset)}</h3>")
        if ("leaderboard", dataset) in charts:
            parts.append(_image(charts[("leaderboard", dataset)], f"{dataset} leaderboard: test weighted F1 with 95% "
                                "intervals", "leaderboard", f"leaderboard-figure-{dataset}"))
        parts.append(_wide(_table(short_leaderboard(board, published, dataset), f"leaderboard-{dataset}")))
    full = _table(leaderboard_display(board, published), "leaderboard")
    parts += [_details("The full leaderboard (every column)", full),
              "<p class='note'>The same as CSV: <a href='leaderboard.csv'>leaderboard.csv</a>.</p>",
              "<h2>Per-class F1</h2>"]
    for dataset, table in classes.items():
        parts.append(f"<h3>{html.escape(dataset)}</h3>")
        if ("per_class", dataset) in charts:
            parts.append(_image(charts[("per_class", dataset)], f"{dataset} per-class F1", "per-class",
                                f"per-class-figure-{dataset}"))
        parts.append(_details(f"{dataset}: per-class F1 as a table",
                              _table(table.reset_index(), f"per-class-{dataset}")))
    parts += ["<h2>Missing-modality robustness</h2>",
              "<p class='note'>Drop in test weighted F1 (points; mean ± std over seeds) when a modality is removed "
              "through the model's modality mask, its own missing-modality path (not zeros posing as data). "
              "Single-modality runs have nothing to remove.</p>"]
    if len(robust):
        parts += [_image(charts[("robustness", d)], f"{d} robustness", "robustness", f"robustness-figure-{d}")
                  for d in sorted(robust["dataset"].unique()) if ("robustness", d) in charts]
        parts.append(_details("The drops as a table", _table(robustness_display(robust), "robustness")))
    else:
        parts.append("<p>No multimodal runs.</p>")
    if gap:
        parts += ["<h2 id='gap-section'>The gap to the published figures</h2>",
                  "<p class='note'>reports/gap.md, written by <code>python pipelines/gap.py</code>.</p>",
                  f"<div class='gap'>{markdown_html(gap)}</div>"]
    titles = {"gates": "How the experts are used (mean gate weight per true class, and load)",
              "confusion": "Confusion matrices (test, pooled over seeds)", "curves": "Learning curves"}
    for section, title in titles.items():
        parts.append(f"<h2>{title}</h2>")
        parts += [_image(png, caption, section) for caption, png in images.get(section, [])] or ["<p>None.</p>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(out, *, board: pd.DataFrame, published: pd.DataFrame, evaluated: Evaluated, robust: pd.DataFrame,
               curves: pd.DataFrame, runs: pd.DataFrame, leaderboard_csv, generated: str,
               gap: str | None = None) -> None:
    """The report folder: index.html (one self-contained page), its figures (the leaderboard's, one per dataset, in
    figures/leaderboard/: a DVC image plot), and the tables behind them as CSV."""
    out = Path(out)
    (out / "figures" / "leaderboard").mkdir(parents=True)
    images = {"gates": [], "confusion": [], "curves": []}
    charts = {}
    for dataset in sorted(board["dataset"].unique()):
        charts[("leaderboard", dataset)] = leaderboard_png(board, published, dataset)
        (out / "figures" / "leaderboard" / f"{dataset}.png").write_bytes(charts[("leaderboard", dataset)])
    classes = per_class_f1(runs, evaluated.labels)
    for dataset, table in classes.items():
        charts[("per_class", dataset)] = per_class_png(table, dataset)
        (out / "figures" / f"per_class_{dataset}.png").write_bytes(charts[("per_class", dataset)])
    for dataset in sorted(robust["dataset"].unique()) if len(robust) else []:
        charts[("robustness", dataset)] = robustness_png(robust, dataset)
        (out / "figures" / f"robustness_{dataset}.png").write_bytes(charts[("robustness", dataset)])
    if len(evaluated.gates):
        keys = ["dataset", "model", "gate", "expert"]
        means = evaluated.gates.groupby(keys, sort=False).mean(numeric_only=True).reset_index()
        means.drop(columns=["seed"]).to_csv(out / "gates.csv", index=False, float_format="%.4f")
        for (dataset, model), part in means.groupby(["dataset", "model"], sort=True):
            path = out / "figures" / f"gates_{dataset}_{model}.png"
            gate_stats.plot(part, evaluated.labels[dataset], f"{dataset} {model}", path)
            images["gates"].append((f"{dataset} {model} gates", path.read_bytes()))
    for (dataset, model), (labels, cm) in sorted(evaluated.confusions.items()):
        path = out / "figures" / f"confusion_{dataset}_{model}.png"
        tracking.confusion_png(cm, labels, f"{dataset} {model}: test, all seeds", path)
        images["confusion"].append((f"{dataset} {model} confusion", path.read_bytes()))
    for dataset in sorted(curves["dataset"].unique()):
        png = curves_png(curves, dataset)
        (out / "figures" / f"curves_{dataset}.png").write_bytes(png)
        images["curves"].append((f"{dataset} learning curves", png))
    if len(robust):
        robust.to_csv(out / "robustness.csv", index=False, float_format="%.4f")
        (out / "robustness.md").write_text(robustness.to_markdown(robust))
    published.to_csv(out / "published.csv", index=False)
    shutil.copy2(leaderboard_csv, out / "leaderboard.csv")
    (out / "index.html").write_text(page(board=board, published=published, classes=classes, robust=robust,
                                         images=images, charts=charts, generated=generated, gap=gap))


def robustness_display(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    shown = table.copy()
    shown["wF1 drop"] = [f"{m:+.2f}" + ("" if pd.isna(s) else f" ± {s:.2f}")
                         for m, s in zip(shown["wf1_drop_mean"], shown["wf1_drop_std"])]
    shown = shown.rename(columns={"modality": "removed", "wf1_all": "wF1 (all)", "wf1_without": "wF1 (without)",
                                  "changed": "predictions changed (%)", "n_seeds": "seeds"})
    return shown[["dataset", "model", "removed", "seeds", "wF1 (all)", "wF1 (without)", "wF1 drop",
                  "predictions changed (%)"]]




# ---------------------------------------------------------------- MLflow


def log_parent_run(client, experiment_id: str, out_dir, runs: pd.DataFrame, robust: pd.DataFrame) -> str:
    """An MLflow run holding the report's files and the robustness drops as metrics, made the parent of every
    leaderboard run (so the runs page nests them under it). Returns its id."""
    from mlflow.entities import Metric, RunTag

    parent = client.create_run(experiment_id, tags={"mlflow.runName": "leaderboard report", "erc.role": "report"})
    run_id = parent.info.run_id
    try:
        client.log_artifacts(run_id, str(out_dir), "report")
        metrics = [Metric(f"wf1_drop.{r.dataset}.{r.model}.without_{r.modality}", float(r.wf1_drop_mean), 0, 0)
                   for r in robust.itertuples()] if len(robust) else []
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start:start + 500])
        for child in runs["run_id"]:
            client.log_batch(child, tags=[RunTag("mlflow.parentRunId", run_id)])
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    return run_id


def mark_best_versions(client, runs: pd.DataFrame, alias: str = "best") -> dict[str, str]:
    """Alias `alias` on each registered model's version whose run has the best validation weighted F1 among the
    leaderboard's runs (selection on validation, never on test). Returns {registered name: version}."""
    best: dict[str, tuple[float, str]] = {}
    for run_id in runs["run_id"]:
        score = client.get_run(run_id).data.metrics.get("selected_val_wf1", float("-inf"))
        for version in client.search_model_versions(f"run_id='{run_id}'"):
            if version.name not in best or score > best[version.name][0]:
                best[version.name] = (score, version.version)
    for name, (_, version) in best.items():
        client.set_registered_model_alias(name, alias, version)
    return {name: version for name, (_, version) in best.items()}
