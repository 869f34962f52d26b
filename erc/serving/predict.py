"""`erc predict`: a trained model on a new conversation: each utterance's emotion, class probabilities and gates.

    erc predict conversation.csv --model erc-iemocap-mister_e@best          # a registered model and alias
    erc predict conversation.jsonl --model erc-meld-sdt/3 --json            # ... and version, as JSON
    erc predict conversation.csv --model 0f3c...e1                          # an MLflow run id

The conversation is a CSV or JSONL file, one utterance per row in turn order: `speaker` and `text`, and
optionally precomputed features per modality, `<modality>_features` (a list of numbers; in a CSV cell a JSON
list or numbers separated by spaces) or `<modality>_path` (a .npy file holding the vector), e.g.
`audio_features`. An optional `dialogue_id` column holds several conversations. Text is featurized with the
encoder recorded with the model's feature set (`erc.features.text`); a modality the file does not give, or a row
with an empty cell, is missing for the model: its modality mask is False, the model's own missing-modality
path; a column the model does not read (`video_features` for a text+audio model) is named in a warning, as
one file may serve models of different inputs. `--out` writes by its suffix: .csv a CSV, .json JSON records,
any other the terminal's table. Every logged erc model carries its feature-set names, their dims and
encoders, and its label names (`erc.tracking.MODEL_INFO`), and its feature standardisation in the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from erc.data.dialogues import IGNORE, Dialogue, DialogueData, speaker_index
from erc.errors import ErcDataError
from erc.models.checkpoint import LoadedModel, load_model
from erc.evaluation.inference import Outputs, infer

# ---------------------------------------------------------------- reading the conversation


def read_conversation(path) -> pd.DataFrame:
    """The utterances of a CSV or JSONL file, with a `speaker` column and a `dialogue_id` (one if absent)."""
    path = Path(path)
    if not path.is_file():
        raise ErcDataError(path, "no such file")
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ErcDataError(path, f"unknown format {path.suffix!r}: give a .csv or .jsonl file")
    if not path.read_text(errors="replace").strip():
        raise ErcDataError(path, "empty conversation: no utterances")
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise ErcDataError(path, f"unreadable ({str(e).splitlines()[0]})") from None
    if not len(table):
        raise ErcDataError(path, "empty conversation: no utterances")
    if "speaker" not in table:
        raise ErcDataError(path, f"no 'speaker' column (columns: {list(table.columns)})")
    if "dialogue_id" not in table:
        table["dialogue_id"] = "conversation"
    return table.reset_index(drop=True)


def _vector(value, path, row: int, column: str) -> np.ndarray | None:
    """One utterance's feature vector from a cell (None where the cell is empty)."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    try:
        if column.endswith("_path"):
            file = Path(value) if Path(value).is_absolute() else Path(path).parent / value
            if file.suffix.lower() != ".npy":
                raise ErcDataError(path, f"row {row + 1}: {column} {value!r} is not a .npy feature vector (raw media "
                                         f"are not featurized here: give the model's precomputed features)")
            return np.asarray(np.load(file, allow_pickle=False), dtype=np.float32).reshape(-1)
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [float(x) for x in value.split()]
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
    except (OSError, ValueError, TypeError) as e:
        raise ErcDataError(path, f"row {row + 1}: {column} is not a feature vector ({str(e).splitlines()[0]})") from None
    return vector


def modality_features(table: pd.DataFrame, path, loaded: LoadedModel, *, encoder=None):
    """{modality: (N, D) raw features}, {modality: (N,) present} for the modalities the model takes."""
    features, present = {}, {}
    for modality, name in loaded.info["inputs"].items():
        fs = loaded.info["feature_sets"][name]
        dim = int(fs["dim"])
        columns = [c for c in (f"{modality}_features", f"{modality}_path") if c in table]
        if columns:
            values, has = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
            for i in range(len(table)):
                vector = next((v for c in columns if (v := _vector(table[c].iloc[i], path, i, c)) is not None), None)
                if vector is None:
                    continue
                if vector.shape[0] != dim:
                    raise ErcDataError(path, f"row {i + 1}: {modality} features have {vector.shape[0]} values; the "
                                             f"model's {modality} feature set {name!r} has {dim}")
                if not np.isfinite(vector).all():
                    raise ErcDataError(path, f"row {i + 1}: {modality} features contain NaN/inf")
                values[i], has[i] = vector, True
        elif modality == "text" and fs.get("model"):
            if "text" not in table:
                raise ErcDataError(path, f"no 'text' column (the model reads text through {fs['model']})")
            texts = table["text"].fillna("").astype(str).tolist()
            values, has = encode_text(texts, fs, encoder), np.array([bool(t.strip()) for t in texts])
            if values.shape[1] != dim:
                raise ErcDataError(path, f"text encoder {fs['model']} gives {values.shape[1]}-d vectors; "
                                         f"the model's feature set {name!r} has {dim}")
        else:  # not given and not computable here: missing for every utterance (the mask path)
            values, has = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
        features[modality], present[modality] = values, has
    if not any(h.any() for h in present.values()):
        wanted = ", ".join(f"{m}_features" for m in loaded.info["inputs"])
        raise ErcDataError(path, f"no input the model can use: give one of {wanted}"
                                 + (" or text" if "text" in loaded.info["inputs"] else ""))
    return features, present


def unused_columns(table: pd.DataFrame, loaded: LoadedModel) -> list[str]:
    """The input columns that the model does not read: a modality it does not take (`video_features` for a
    text+audio model, or a misspelt one), or text for a model without text."""
    inputs = loaded.info["inputs"]
    return [c for c in table.columns
            if (c == "text" and "text" not in inputs)
            or (c.endswith(("_features", "_path")) and c.rsplit("_", 1)[0] not in inputs)]


def encode_text(texts: list[str], feature_set: dict, encoder=None) -> np.ndarray:
    """Texts -> vectors with the feature set's recorded encoder (`erc.features.text`); `encoder` = (tokenizer, model)."""
    from erc.features.text import encode_texts, load_encoder

    tokenizer, model = encoder or load_encoder(feature_set["model"])
    values, _ = encode_texts(texts, tokenizer, model, max_length=feature_set.get("max_length", 128),
                             pooling=feature_set.get("pooling", "mean"), progress=False)
    return values


def conversation_data(table: pd.DataFrame, features: dict, present: dict, stats: dict, inputs: dict,
                      speaker_names: list[str] | None = None, source="conversation") -> DialogueData:
    """The conversation(s) as dialogues, features standardised with the training split's statistics, speakers
    indexed as the model was trained (by first turn, or among `speaker_names`)."""
    standard = {}
    for m, values in features.items():
        mean, std = stats[inputs[m]]
        standard[m] = np.where(present[m][:, None], (values - mean) / std, 0.0).astype(np.float32)
    dialogues = []
    for _, rows in table.groupby("dialogue_id", sort=False).groups.items():
        rows = np.asarray(rows, dtype=np.int64)
        speakers = speaker_index(table["speaker"].to_numpy()[rows], speaker_names, source)
        n = len(rows)
        dialogues.append(Dialogue(rows, speakers, np.full(n, IGNORE), np.full(n, IGNORE),
                                  np.full(n, np.nan, dtype=np.float32)))
    return DialogueData(dialogues, standard, present)


# ---------------------------------------------------------------- predicting


def to_frame(table: pd.DataFrame, outputs: Outputs, labels: list[str]) -> pd.DataFrame:
    """One row per utterance: dialogue, speaker, text, predicted label, p_<label>, gate.<gate>.<expert>[, score]."""
    out = pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy()[outputs.rows],
                        "speaker": table["speaker"].to_numpy()[outputs.rows],
                        "text": (table["text"] if "text" in table else pd.Series([""] * len(table))).to_numpy()[outputs.rows],
                        "emotion": np.asarray(labels, dtype=object)[outputs.pred]})
    for c, label in enumerate(labels):
        out[f"p_{label}"] = outputs.probs[:, c]
    for name, g in outputs.gates.items():
        for e, expert in enumerate(g.names):
            out[f"gate.{name}.{expert}"] = np.where(g.valid, g.weights[:, e], np.nan)
    if outputs.score is not None:
        out["score"] = outputs.score
    return out


def predict(conversation, model: str | LoadedModel, *, tracking_uri: str | None = None, encoder=None) -> pd.DataFrame:
    """Each utterance of `conversation` (a CSV/JSONL path) with the emotion `model` predicts (a run id, a registered
    name with /version or @alias, models:/..., or a `load_model` result), its class probabilities and gates."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, tracking_uri)
    table = read_conversation(conversation)
    features, present = modality_features(table, conversation, loaded, encoder=encoder)
    data = conversation_data(table, features, present, loaded.stats, loaded.info["inputs"],
                             loaded.info.get("speaker_names"), source=str(conversation))
    return to_frame(table, infer(loaded.model, data), loaded.info["labels"])


def to_json(frame: pd.DataFrame, labels: list[str]) -> list[dict]:
    """The predictions as JSON records: utterance fields, probabilities {label: p}, gates {gate: {expert: w}}."""
    records = []
    for row in frame.to_dict("records"):
        record = {k: row[k] for k in ("dialogue_id", "speaker", "text", "emotion")}
        record["probabilities"] = {label: round(float(row[f"p_{label}"]), 6) for label in labels}
        gates = {}
        for key, value in row.items():
            if key.startswith("gate.") and not pd.isna(value):
                name, expert = key[len("gate."):].rsplit(".", 1)
                gates.setdefault(name, {})[expert] = round(float(value), 6)
        if gates:
            record["gates"] = gates
        if "score" in row:
            record["score"] = round(float(row["score"]), 6)
        records.append(record)
    return records


FORMATS = {".csv": "csv", ".json": "json"}  # `--out` by suffix; any other is the terminal's table (or --json)


def render(frame: pd.DataFrame, labels: list[str], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(to_json(frame, labels), indent=2) + "\n"
    if fmt == "csv":
        return frame.to_csv(index=False, float_format="%.6f")
    return frame.to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n"


def main(argv=None) -> None:
    import argparse
    import sys

    from erc.io import check_writable, write_text

    parser = argparse.ArgumentParser(prog="erc predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("conversation", help="a CSV or JSONL file: speaker, text[, <modality>_features | _path]")
    parser.add_argument("--model", required=True,
                        help="an MLflow run id, a registered model name[/version | @alias], or models:/...")
    parser.add_argument("--json", action="store_true", help="JSON records instead of a table")
    parser.add_argument("--out", help="write here instead of the terminal: a .csv file is CSV, a .json file JSON")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = parser.parse_args(argv)
    fmt = FORMATS.get(Path(args.out).suffix.lower(), "table") if args.out else "table"
    try:
        if args.out:
            if args.json and fmt == "csv":
                raise ErcDataError(args.out, "--json with a .csv file: give a .json file, or leave --json out for CSV")
            check_writable(args.out)
        table = read_conversation(args.conversation)  # a bad file is reported before the model is fetched
        loaded = load_model(args.model, args.tracking_uri)
        frame = predict(args.conversation, loaded)
    except ErcDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    unused = unused_columns(table, loaded)
    if unused:  # a warning, not an error: one conversation file may serve models of different inputs
        print(f"warning: {args.conversation}: the model takes {', '.join(loaded.info['inputs'])} only; "
              f"ignored: {', '.join(unused)}", file=sys.stderr)
    text = render(frame, loaded.info["labels"], "json" if args.json else fmt)
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)
