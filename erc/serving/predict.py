"""`erc predict`: a trained model on a new conversation: each utterance's emotion, class probabilities and gates.

    erc predict conversation.csv --model erc-iemocap-mister_e-tuned@best          # a registered model and alias
    erc predict conversation.jsonl --model erc-meld-sdt-tuned/3 --json            # ... and version, as JSON
    erc predict conversation.csv --model 0f3c...e1 --out predictions.jsonl  # an MLflow run id, to a file
    erc predict --recording call.wav --segments turns.csv --model erc-meld-sdt-tuned@best   # one recording, cut in turns

The conversation is a CSV or JSONL file, one utterance per row in turn order: `speaker` and `text`, and
optionally precomputed features per modality, `<modality>_features` (a list of numbers; in a CSV cell a JSON
list or numbers separated by spaces) or `<modality>_path` (a .npy file holding the vector), e.g.
`audio_features`, or media: an `audio` or `video` column (a path relative to the file's folder, or absolute) with
optional `start` and `end` seconds, from which the model's feature sets are recomputed by the featurize stage's own
code and settings (`erc.serving.media`; a set that erc cannot recompute is an error naming it, unless `--missing
audio` asks for the model's missing-audio path). An optional `dialogue_id` column holds several conversations.
Instead of a file, `--recording` with `--segments` gives one recording cut into turns. `--asr MODEL` (a Whisper
model) transcribes the utterances that have audio and no text (`erc.serving.recording`); the output marks each
text's `text_source`, given or asr. Text is featurized with the
encoder recorded with the model's feature set (`erc.features.text`), cut to its max_length tokens (a note on
stderr says how many texts were); a modality the file does not give (a note on stderr says so), a row with an
empty cell, or a `--missing` modality is missing for the model: its modality mask is False, the model's own
missing-modality path; a column the model does not read (`video_features` for a text+audio model) is named in a
warning, as one file may serve models of different inputs. Every logged erc model carries its feature-set names,
their dims and encoders, and its label names
(`erc.tracking.MODEL_INFO`), and its feature standardisation in the checkpoint.

The terminal gets a table for people: one line per utterance, the text cut to the terminal's width (COLUMNS, or
120 when not a terminal), the emotion and its probabilities. Full texts, every probability and the gates go to
`--out` (by suffix: .csv, .json records, .jsonl one record a line) or, with `--json`, to stdout. The input is
predicted and written dialogue by dialogue, in batches of about BATCH_UTTERANCES utterances, so memory is
bounded by the model and one batch whatever the input's size or its longest text; a file is written beside
its target and moved into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd

from erc.data.dialogues import IGNORE, Dialogue, DialogueData, speaker_index
from erc.errors import ErcDataError
from erc.evaluation.inference import Outputs, infer
from erc.models.checkpoint import LoadedModel, load_model
from erc.serving.media import MEDIA_COLUMNS, MediaInputs, media_columns, media_inputs

BATCH_UTTERANCES = 1024  # whole dialogues are gathered up to this many utterances per encode-and-predict step
PROGRESS_UTTERANCES = 5000  # an input this large gets a progress line on stderr
PROGRESS_EVERY_SECONDS = 10.0  # not on a terminal: the least time between two progress lines

# ---------------------------------------------------------------- reading the conversation


def read_conversation(path) -> pd.DataFrame:
    """The utterances of a CSV or JSONL file, with a `speaker` column and a `dialogue_id` (one if absent)."""
    path = Path(path)
    if not path.is_file():
        raise ErcDataError(path, "no such file")
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ErcDataError(path, f"unknown format {path.suffix!r}: give a .csv or .jsonl file")
    if _blank(path):
        raise ErcDataError(path, "empty conversation: no utterances")
    try:
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            table = pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise ErcDataError(path, f"unreadable ({str(e).splitlines()[0]})") from None
    return conversation_table(table, path)


def conversation_table(table: pd.DataFrame, path) -> pd.DataFrame:
    """A conversation's utterances as read (from `path`, or a request), with a `speaker` column and a `dialogue_id`."""
    if not len(table):
        raise ErcDataError(path, "empty conversation: no utterances")
    if "speaker" not in table:
        raise ErcDataError(path, f"no 'speaker' column (columns: {list(table.columns)})")
    if "dialogue_id" not in table:
        table["dialogue_id"] = "conversation"
    return table.reset_index(drop=True)


def _blank(path: Path) -> bool:
    """Nothing but whitespace in the file, read in blocks (not the whole file at once)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 16):
            if block.strip():
                return False
    return True


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


def modality_features(table: pd.DataFrame, path, loaded: LoadedModel, *, encoder=None, encode: bool = True,
                      truncated: list | None = None, media: MediaInputs | None = None, missing=()):
    """{modality: (N, D) raw features}, {modality: (N,) present} for the modalities the model takes. `table` may be
    a part of the file (its index the file's rows, for messages); `encode=False` checks the cells and gives the
    presence only (text not encoded, media not read, values zero); `truncated` gets the count of texts cut for the
    encoder. A row's precomputed vector comes first, then its media (`media_inputs`); a `missing` modality is
    missing for every row."""
    features, present = {}, {}
    for modality, name in loaded.info["inputs"].items():
        fs = loaded.info["feature_sets"][name]
        dim = int(fs["dim"])
        columns = [c for c in (f"{modality}_features", f"{modality}_path") if c in table]
        if modality in missing:  # asked for (--missing): the model's own missing-modality path
            values, has = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
        elif columns:
            values, has = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
            for i, row in enumerate(table.index):
                vector = next((v for c in columns if (v := _vector(table[c].iloc[i], path, row, c)) is not None), None)
                if vector is None:
                    continue
                if vector.shape[0] != dim:
                    raise ErcDataError(path, f"row {row + 1}: {modality} features have {vector.shape[0]} values; the "
                                             f"model's {modality} feature set {name!r} has {dim}")
                if not np.isfinite(vector).all():
                    raise ErcDataError(path, f"row {row + 1}: {modality} features contain NaN/inf")
                values[i], has[i] = vector, True
        elif modality == "text" and fs.get("model"):
            if "text" not in table:
                raise ErcDataError(path, f"no 'text' column (the model reads text through {fs['model']})")
            texts = table["text"].fillna("").astype(str).tolist()
            has = np.array([bool(t.strip()) for t in texts])
            if not encode:
                values = np.zeros((len(table), dim), dtype=np.float32)
            else:
                values = encode_text(texts, fs, encoder, truncated=truncated)
                if values.shape[1] != dim:
                    raise ErcDataError(path, f"text encoder {fs['model']} gives {values.shape[1]}-d vectors; "
                                             f"the model's feature set {name!r} has {dim}")
        else:  # not given and not computable here: missing for every utterance (the mask path)
            values, has = np.zeros((len(table), dim), dtype=np.float32), np.zeros(len(table), dtype=bool)
        if media is not None and modality in media.recipes and modality not in missing and not has.all():
            rest = np.flatnonzero(~has)
            if encode:
                values[rest], has[rest] = media.features(table.iloc[rest], path, modality, dim, loaded.stats.get(name))
            else:
                has[rest] = [item is not None for item in media.items(table.iloc[rest], path, modality)]
        features[modality], present[modality] = values, has
    return features, present


def no_usable_input(path, loaded: LoadedModel, missing=()) -> ErcDataError:
    left = [m for m in loaded.info["inputs"] if m not in missing]
    if not left:
        return ErcDataError(path, f"no input the model can use: every modality it takes ({', '.join(missing)}) "
                                  f"is --missing")
    wanted = ", ".join(f"{m}_features" for m in left)
    media = sorted({c for m in left for c in MEDIA_COLUMNS.get(m, ())})
    return ErcDataError(path, f"no input the model can use: give one of {wanted}"
                              + (f", media ({', '.join(media)})" if media else "")
                              + (" or text" if "text" in left else ""))


def check_missing(missing, loaded: LoadedModel) -> tuple[str, ...]:
    """`--missing` modalities, each one the model takes."""
    inputs = loaded.info["inputs"]
    for m in missing:
        if m not in inputs:
            raise ErcDataError("--missing", f"{m!r}: the model takes {', '.join(inputs)} only")
    return tuple(dict.fromkeys(missing))


def not_given(table: pd.DataFrame, loaded: LoadedModel, missing=()) -> list[str]:
    """The modalities the model takes that `table` gives no column for (not text it encodes itself), and that
    are not asked to be `missing`: their missing-modality path for every row, which the caller says."""
    out = []
    for m, name in loaded.info["inputs"].items():
        encoded = m == "text" and loaded.info["feature_sets"][name].get("model") and "text" in table
        if m not in missing and not encoded and not media_columns(table, m) \
                and not any(c in table for c in (f"{m}_features", f"{m}_path")):
            out.append(m)
    return out


def unused_columns(table: pd.DataFrame, loaded: LoadedModel) -> list[str]:
    """The input columns that the model does not read: a modality it does not take (`video_features` for a
    text+audio model, or a misspelt one), or text for a model without text."""
    inputs = loaded.info["inputs"]
    return [c for c in table.columns
            if (c == "text" and "text" not in inputs)
            or (c.endswith(("_features", "_path")) and c.rsplit("_", 1)[0] not in inputs)
            or (c in ("audio", "video") and not any(c in media_columns(table, m) for m in inputs))]


def text_encoder(table: pd.DataFrame, loaded: LoadedModel):
    """(tokenizer, model) of the text feature set the model encodes itself, loaded once; None if it has none."""
    from erc.features.text import load_encoder

    name = loaded.info["inputs"].get("text")
    fs = loaded.info["feature_sets"].get(name, {}) if name else {}
    if not fs.get("model") or "text_features" in table or "text_path" in table:
        return None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its weight-loading bar is noise on a prediction's stderr
    return load_encoder(fs["model"])


def encode_text(texts: list[str], feature_set: dict, encoder=None, *, truncated: list | None = None) -> np.ndarray:
    """Texts -> vectors with the feature set's recorded encoder (`erc.features.text`); `encoder` = (tokenizer, model).
    `truncated` (a one-item list) adds the number of texts longer than the encoder's max_length tokens."""
    from erc.features.text import encode_texts, load_encoder

    tokenizer, model = encoder or load_encoder(feature_set["model"])
    max_length = feature_set.get("max_length", 128)
    if truncated is not None:
        truncated[0] += count_truncated(texts, tokenizer, max_length)
    values, _ = encode_texts(texts, tokenizer, model, max_length=max_length,
                             pooling=feature_set.get("pooling", "mean"), progress=False)
    return values


def count_truncated(texts: list[str], tokenizer, max_length: int) -> int:
    """How many texts have more than `max_length` tokens (special tokens included, as the encoder counts them).

    Tokenized with the limit one higher, so that a long text's token list is never held whole."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length + 1, add_special_tokens=True)["input_ids"]
    return sum(len(x) > max_length for x in ids)


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


def parts(table: pd.DataFrame, size: int | None = None) -> list[np.ndarray]:
    """The file's rows in parts of whole dialogues, each of about `size` utterances (one longer dialogue alone), in
    the file's order within a part."""
    size = size or BATCH_UTTERANCES
    out, current, count = [], [], 0
    for rows in table.groupby("dialogue_id", sort=False).indices.values():
        if current and count + len(rows) > size:
            out.append(np.sort(np.concatenate(current)))
            current, count = [], 0
        current.append(rows)
        count += len(rows)
    if current:
        out.append(np.sort(np.concatenate(current)))
    return out


# ---------------------------------------------------------------- predicting


def to_frame(table: pd.DataFrame, outputs: Outputs, labels: list[str]) -> pd.DataFrame:
    """One row per utterance: dialogue, speaker, text, predicted label, p_<label>, gate.<gate>.<expert>[, score]."""
    out = pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy()[outputs.rows],
                        "speaker": table["speaker"].to_numpy()[outputs.rows],
                        "text": (table["text"] if "text" in table else pd.Series([""] * len(table))).to_numpy()[outputs.rows],
                        "emotion": np.asarray(labels, dtype=object)[outputs.pred]})
    if "text_source" in table:  # given, or asr: which texts are transcripts
        out.insert(3, "text_source", table["text_source"].to_numpy()[outputs.rows])
    for c, label in enumerate(labels):
        out[f"p_{label}"] = outputs.probs[:, c]
    for name, g in outputs.gates.items():
        for e, expert in enumerate(g.names):
            out[f"gate.{name}.{expert}"] = np.where(g.valid, g.weights[:, e], np.nan)
    if outputs.score is not None:
        out["score"] = outputs.score
    return out


def check_conversation(table: pd.DataFrame, path, loaded: LoadedModel, size: int | None = None, *,
                       media: MediaInputs | None = None, missing=()) -> None:
    """Every cell and speaker the model reads checked before any prediction (a bad row 90,000 is found before
    row 1 is printed; a media file that is not there, too); the vectors are parsed again when predicted, not
    kept: memory stays one part's."""
    usable = False
    for rows in parts(table, size):
        part = table.iloc[rows]
        _, present = modality_features(part, path, loaded, encode=False, media=media, missing=missing)
        usable = usable or any(h.any() for h in present.values())
        names = loaded.info.get("speaker_names")
        if names is not None:
            for who in part.groupby("dialogue_id", sort=False)["speaker"]:
                speaker_index(who[1].to_numpy(), names, str(path))
    if not usable:
        raise no_usable_input(path, loaded, missing)


def predict_parts(table: pd.DataFrame, path, loaded: LoadedModel, *, encoder=None, size: int | None = None,
                  truncated: list | None = None, progress=None, media: MediaInputs | None = None, missing=()):
    """Yield the predictions part by part (whole dialogues, about `size` utterances each), in the file's order of
    dialogues; `progress(done, total)` after each part. `table` is `read_conversation`'s, checked."""
    done = 0
    for rows in parts(table, size):
        part = table.iloc[rows]
        features, present = modality_features(part, path, loaded, encoder=encoder, truncated=truncated, media=media,
                                              missing=missing)
        part = part.reset_index(drop=True)
        data = conversation_data(part, features, present, loaded.stats, loaded.info["inputs"],
                                 loaded.info.get("speaker_names"), source=str(path))
        yield to_frame(part, infer(loaded.model, data), loaded.info["labels"])
        done += len(rows)
        if progress is not None:
            progress(done, len(table))


def predict(conversation, model: str | LoadedModel, *, tracking_uri: str | None = None, encoder=None,
            missing=(), media: MediaInputs | None = None) -> pd.DataFrame:
    """Each utterance of `conversation` (a CSV/JSONL path) with the emotion `model` predicts (a run id, a registered
    name with /version or @alias, models:/..., or a `load_model` result), its class probabilities and gates.
    `missing` modalities take the model's missing-modality path; `media` are `media_inputs`, loaded (built from
    the file when not given)."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model, tracking_uri)
    return predict_table(read_conversation(conversation), conversation, loaded, encoder=encoder, missing=missing,
                         media=media)


def predict_table(table: pd.DataFrame, path, loaded: LoadedModel, *, encoder=None, missing=(),
                  media: MediaInputs | None = None) -> pd.DataFrame:
    """`predict` of a `conversation_table` (`path` names it in messages; media paths are relative to its folder)
    with a loaded model."""
    missing = check_missing(missing, loaded)
    media = media or media_inputs(table, path, loaded.info, missing)
    check_conversation(table, path, loaded, media=media, missing=missing)
    encoder = encoder or (text_encoder(table, loaded) if "text" not in missing else None)
    media = media.load() if media is not None else None
    frames = list(predict_parts(table, path, loaded, encoder=encoder, media=media, missing=missing))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------- writing


def to_json(frame: pd.DataFrame, labels: list[str]) -> list[dict]:
    """The predictions as JSON records: utterance fields, probabilities {label: p}, gates {gate: {expert: w}}."""
    records = []
    for row in frame.to_dict("records"):
        record = {k: row[k] for k in ("dialogue_id", "speaker", "text", "text_source", "emotion") if k in row}
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


FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl"}  # `--out` by suffix


def _cells(ch: str) -> int:
    """Terminal cells of one character: 2 for East Asian wide ones, 0 for combining marks."""
    if unicodedata.combining(ch):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def fit(value, width: int) -> str:
    """`value` on one line in at most `width` terminal cells: whitespace and control characters as spaces, cut
    with an ellipsis. Looks at the first few `width`s of characters only, whatever the text's length."""
    text = str(value)
    head = "".join(" " if ch.isspace() or unicodedata.category(ch)[0] == "C" else ch for ch in text[:4 * width + 4])
    out, used = [], 0
    for ch in head:
        if used + _cells(ch) > width:
            break
        out.append(ch)
        used += _cells(ch)
    else:
        if len(text) <= len(head):
            return head
    while out and used + 1 > width:  # room for the ellipsis
        used -= _cells(out.pop())
    return "".join(out) + "…" if width > 0 else ""


def _pad(text: str, width: int) -> str:
    return text + " " * (width - sum(map(_cells, text)))


def terminal_width(stream=None) -> int:
    """The terminal's columns; when `stream` is not a terminal, COLUMNS, else 120."""
    stream = stream or sys.stdout
    if not (hasattr(stream, "isatty") and stream.isatty()):
        try:
            return max(int(os.environ.get("COLUMNS", "")), 20)
        except ValueError:
            return 120
    return max(shutil.get_terminal_size((120, 24)).columns, 20)


class Table:
    """The terminal's table, written part by part: one line per utterance within `width` cells. Columns: the
    dialogue (when the file has several), the speaker, the text cut to the room left, the
    emotion, and every class's probability when they leave the text 30 cells, else the emotion's alone."""

    def __init__(self, table: pd.DataFrame, labels: list[str], width: int, *, dialogues: bool):
        self.labels, self.width = labels, width
        def cap(column: str, most: int) -> int:
            return min(max(len(column), *(len(str(v)) for v in table[column].unique()[:10_000])), most)

        self.columns = ([("dialogue_id", cap("dialogue_id", 16))] if dialogues else []) + [("speaker", cap("speaker", 12))]
        self.emotion = max(len("emotion"), *map(len, labels))
        fixed = sum(w + 2 for _, w in self.columns) + self.emotion
        every = sum(max(5, len(label)) + 2 for label in labels)
        self.all_p = width - fixed - every - 2 >= 30
        self.p = [(f"p_{label}", label, max(5, len(label))) for label in labels] if self.all_p else [("p", "p", 5)]
        self.text = max(width - fixed - sum(w + 2 for *_, w in self.p) - 2, 1)

    def line(self, cells: list[tuple[str, int]]) -> str:
        return fit("  ".join(_pad(fit(v, w), w) for v, w in cells).rstrip(), self.width)

    def header(self) -> str:
        cells = [(name, w) for name, w in self.columns] + [("text", self.text), ("emotion", self.emotion)]
        cells += [(head, w) for _, head, w in self.p]
        return self.line(cells) + "\n"

    def rows(self, frame: pd.DataFrame, labels: list[str]) -> str:
        out = []
        probs = frame[[f"p_{label}" for label in labels]].to_numpy()
        for i, row in enumerate(frame[[name for name, _ in self.columns] + ["text", "emotion"]].itertuples(index=False)):
            cells = [(v, w) for v, (_, w) in zip(row, self.columns)]
            cells += [(row[-2], self.text), (row[-1], self.emotion)]
            ps = probs[i] if self.all_p else [probs[i].max()]
            cells += [(f"{p:.3f}".rjust(w), w) for p, (*_, w) in zip(ps, self.p)]
            out.append(self.line(cells))
        return "\n".join(out) + "\n"


class Progress:
    """`predict: conv.csv: 40,960/100,000 utterances, ~35 s left` on stderr: live on a terminal, else a line every
    PROGRESS_EVERY_SECONDS and one at the end."""

    def __init__(self, name: str, stream=None, every: float | None = None):
        self.name, self.stream = name, stream or sys.stderr
        self.every = PROGRESS_EVERY_SECONDS if every is None else every
        self.live = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done < total and not self.live and now - self.last < self.every:
            return
        self.last = now
        left = (now - self.start) / done * (total - done)
        line = f"predict: {self.name}: {done:,}/{total:,} utterances" + (f", ~{left:.0f} s left" if done < total else
                                                                        f" in {now - self.start:.0f} s")
        if self.live:
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if done == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def write_stream(frames, out, fmt: str, labels: list[str], table_writer: Table | None = None) -> None:
    """The frames to the stream `out` as they come: a table, CSV, a JSON array or JSON lines."""
    first = True
    if fmt == "table":
        out.write(table_writer.header())
    elif fmt == "json":
        out.write("[")
    for frame in frames:
        if fmt == "table":
            out.write(table_writer.rows(frame, labels))
        elif fmt == "csv":
            frame.to_csv(out, header=first, index=False, float_format="%.6f")
        elif fmt == "jsonl":
            out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in to_json(frame, labels)))
        else:  # one JSON array, as json.dumps(records, indent=2) would write it
            for r in to_json(frame, labels):
                out.write(("\n  " if first else ",\n  ") + json.dumps(r, indent=2).replace("\n", "\n  "))
                first = False
        first = False
        out.flush()
    if fmt == "json":
        out.write("\n]\n")


def main(argv=None) -> None:
    import argparse

    from erc.io import atomic_path, check_writable
    from erc.serving.recording import check_asr, transcribe

    parser = argparse.ArgumentParser(prog="erc predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("conversation", nargs="?", help="a CSV or JSONL file: speaker, text[, <modality>_features | "
                                                        "_path][, audio | video[, start, end]]")
    parser.add_argument("--recording", help="instead of a conversation file: one recording (any format erc reads "
                                            "audio from), cut by --segments")
    parser.add_argument("--segments", help="with --recording: a table of its segments (.csv, .tsv, .json, .jsonl): "
                                           "start, end (seconds), speaker[, text][, dialogue_id]")
    parser.add_argument("--asr", metavar="MODEL", help="a Whisper model (hub id or local folder) that transcribes the "
                                                       "utterances without text from their audio; marked text_source "
                                                       "asr in the output")
    parser.add_argument("--missing", action="append", default=[], metavar="MODALITY",
                        help="take the model's missing-MODALITY path (e.g. audio whose feature set erc cannot "
                             "recompute from media); repeatable")
    parser.add_argument("--model", required=True,
                        help="an MLflow run id, a registered model name[/version | @alias], or models:/...")
    parser.add_argument("--json", action="store_true",
                        help="JSON records (full texts, every probability, the gates) instead of the table")
    parser.add_argument("--out", help="write the full predictions here: a .csv file CSV, .json JSON records, "
                                      ".jsonl one JSON record a line")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help=f"a progress line on stderr (default: for inputs of {PROGRESS_UTTERANCES:,} utterances or more)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = parser.parse_args(argv)
    fmt = "json" if args.json else "table"
    try:
        if args.out:
            check_writable(args.out)
            suffix = Path(args.out).suffix.lower()
            if suffix not in FORMATS:
                raise ErcDataError(args.out, f"{f'unknown format {suffix!r}' if suffix else 'no suffix'}: "
                                             f"give a .csv, .json or .jsonl file")
            if args.json and suffix == ".csv":
                raise ErcDataError(args.out, "--json with a .csv file: give a .json file, or leave --json out for CSV")
            fmt = FORMATS[suffix]
        asr = check_asr(args.asr) if args.asr else None  # its config only: a bad --asr before anything loads
        table, path = read_input(parser, args)  # a bad file is reported before the model is fetched
        if asr and not any(c in table for c in ("audio", "video")):
            raise ErcDataError(path, "--asr: no audio to transcribe (give an audio or video column, or --recording)")
        loaded = load_model(args.model, args.tracking_uri)
        missing = check_missing(args.missing, loaded)
        if asr:  # after the model: a bad --model is found before minutes of transcription
            table = transcribe(table, asr, source=path)
        media = media_inputs(table, path, loaded.info, missing)  # a set erc cannot recompute: before anything runs
        check_conversation(table, path, loaded, media=media, missing=missing)
        encoder = text_encoder(table, loaded) if "text" not in missing else None
        media = media.load() if media is not None else None
    except ErcDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    unused = unused_columns(table, loaded)
    if unused:  # a warning, not an error: one conversation file may serve models of different inputs
        print(f"warning: {path}: the model takes {', '.join(loaded.info['inputs'])} only; "
              f"ignored: {', '.join(unused)}", file=sys.stderr)
    untold = int((table["text_source"] == "").sum()) if "text_source" in table and "text" in loaded.info["inputs"] else 0
    if untold and "text" not in missing:  # segments without text: never silently
        print(f"note: {path}: {untold:,} utterance(s) without text: the model's missing-text path for them"
              + ("" if asr else " (--asr MODEL transcribes them)"), file=sys.stderr)
    for m in not_given(table, loaded, missing):  # never silently: say the model goes without it
        print(f"note: {path}: no {m} given: the model's missing-{m} path for every utterance (--missing {m} asks "
              f"for it)", file=sys.stderr)
    labels = loaded.info["labels"]
    show = len(table) >= PROGRESS_UTTERANCES if args.progress is None else args.progress
    truncated = [0]
    frames = predict_parts(table, path, loaded, encoder=encoder, truncated=truncated, media=media, missing=missing,
                           progress=Progress(Path(path).name) if show else None)
    try:
        if args.out:
            with atomic_path(args.out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as out:
                write_stream(frames, out, fmt, labels)
        else:
            dialogues = table["dialogue_id"].nunique() > 1
            writer = Table(table, labels, terminal_width(), dialogues=dialogues) if fmt == "table" else None
            write_stream(frames, sys.stdout, fmt, labels, writer)
    except ErcDataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:  # `erc predict ... | head`: the reader has what it wanted
        sys.stderr.close()
        os._exit(0)
    if truncated[0]:
        limit = loaded.info["feature_sets"][loaded.info["inputs"]["text"]]
        texts = "text longer than" if truncated[0] == 1 else "texts longer than"
        print(f"note: {path}: {truncated[0]:,} {texts} the encoder's {limit.get('max_length', 128)} "
              f"tokens {'was' if truncated[0] == 1 else 'were'} truncated for text:{loaded.info['inputs']['text']}",
              file=sys.stderr)
    for note in media.notes if media is not None else ():
        print(f"note: {path}: {note}", file=sys.stderr)


def read_input(parser, args) -> tuple[pd.DataFrame, str]:
    """The conversation's rows and the file that names it in messages: a conversation file, or a recording cut
    by a segment table (`recording_table`)."""
    if args.recording or args.segments:
        if args.conversation:
            parser.error("give a conversation file or --recording with --segments, not both")
        if not (args.recording and args.segments):
            parser.error("--recording and --segments go together")
        return recording_table(args.recording, args.segments), args.segments
    if not args.conversation:
        parser.error("give a conversation file (or --recording with --segments)")
    return read_conversation(args.conversation), args.conversation


def recording_table(recording, segments, **options) -> pd.DataFrame:
    """One recording and its segment table (start, end, speaker[, text]) as a conversation's rows: speaker, text,
    audio (the recording), start and end, one per segment, by `erc.serving.recording` (which transcribes a
    segment without text); `options` go to it."""
    try:
        from erc.serving.recording import recording_conversation
    except ImportError as e:
        raise ErcDataError(recording, f"a recording with segments needs erc.serving.recording ({e})") from None
    return conversation_table(recording_conversation(recording, segments, **options), segments)
