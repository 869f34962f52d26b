"""One recording and a segment table -> the utterances `erc predict` reads; text for segments without it by ASR.

    erc predict --recording meeting.wav --segments meeting.csv --model erc-meld-sdt-tuned@best
    erc predict --recording meeting.wav --segments meeting.csv --asr openai/whisper-small --model ...

The segment table (.csv, .tsv, .json records or .jsonl, one segment a row) has `start` and `end` (seconds into
the recording), `speaker`, and optionally `text` and `dialogue_id` (several conversations in one recording).
Every value is checked against the recording before any model loads, and the first problem is one line naming
the table, the row (1 = the first segment) and what is wrong: a missing column, a start or end that is not a
number, negative, not after the start or past the recording's end, no speaker, or two segments of one speaker
that overlap (different speakers may talk over each other). The segments are the model's turns in the order of
their start times, whatever the table's order.

`read_segments` returns one row per segment in the form of a conversation file whose utterances name their
media: dialogue_id, speaker, text ('' where none), text_source ('given', or '' where none), audio (the
recording's path), start, end. `transcribe` fills the empty texts with a Whisper model through transformers (a
hub id or a local folder), greedy decoding, clips of at most 30 s (a longer segment is transcribed in 30 s
pieces whose texts are joined), and marks those rows text_source 'asr', so the output shows which texts are
transcripts.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from erc.errors import ErcDataError
from erc.features.audio import SAMPLE_RATE, load_audio

SEGMENT_FORMATS = {".csv": ",", ".tsv": "\t", ".json": "json", ".jsonl": "jsonl"}
REQUIRED = ("start", "end", "speaker")
ASR_BATCH = 8  # clips per Whisper generate call: every clip is padded to 30 s of log-mel frames anyway
ASR_SECONDS = 30.0  # what a Whisper encoder reads at once
ASR_MAX_NEW_TOKENS = 224  # 30 s of fast speech is ~120 tokens; Whisper's own bound is max_target_positions (448)
ASR_PROMPT_TOKENS = 4  # start of transcript, language, task, no-timestamps: the decoder's prompt before the text


# ---------------------------------------------------------------- the segment table


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ErcDataError(path, "no such file")
    kind = SEGMENT_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ErcDataError(path, f"unknown format {path.suffix!r}: give a .csv, .tsv, .json or .jsonl segment table")
    try:
        if kind == "json":
            records = json.loads(path.read_text(encoding="utf-8") or "[]")
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ErcDataError(path, "not a list of segment records ({\"start\": ..., \"end\": ..., \"speaker\": ...})")
            table = pd.DataFrame.from_records(records)
        elif kind == "jsonl":
            table = pd.read_json(path, lines=True, dtype=False) if path.read_text(encoding="utf-8").strip() else pd.DataFrame()
        else:
            table = pd.read_csv(path, sep=kind, dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise ErcDataError(path, f"unreadable ({str(e).splitlines()[0]})") from None
    if not len(table):
        raise ErcDataError(path, "no segments")
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        raise ErcDataError(path, f"missing column(s) {missing}; has {list(table.columns)}")
    if "audio" in table:  # the recording is every segment's audio; a column of other files would be ignored
        raise ErcDataError(path, "an 'audio' column: a segment's audio is the recording's [start, end]; give "
                                 "per-utterance files as a conversation file instead")
    return table.reset_index(drop=True)


def _blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _seconds(value, path: Path, row: int, column: str) -> float:
    if _blank(value):
        raise ErcDataError(path, f"row {row + 1}: no {column}")
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ErcDataError(path, f"row {row + 1}: {column} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ErcDataError(path, f"row {row + 1}: {column} {value!r} is not a number of seconds")
    if seconds < 0:
        raise ErcDataError(path, f"row {row + 1}: {column} {seconds:g} s is negative")
    return seconds


def recording_seconds(recording) -> float:
    """The recording's length in seconds, as erc's audio reader decodes it (16 kHz mono)."""
    return len(load_audio(recording)) / SAMPLE_RATE


def read_segments(recording, segments) -> pd.DataFrame:
    """The segments of `recording` listed in the table `segments` as utterance rows (dialogue_id, speaker, text,
    text_source, audio, start, end, and any other column of the table), in order of start time within each
    dialogue; ErcDataError (one line: the file, the row, what is wrong) for the first bad value."""
    recording, path = Path(recording), Path(segments)
    table = _read_table(path)
    length = recording_seconds(recording)  # a missing, undecodable or silent recording: its own one line
    starts, ends = np.zeros(len(table)), np.zeros(len(table))
    for i, row in enumerate(table.itertuples(index=False)):
        start, end = _seconds(row.start, path, i, "start"), _seconds(row.end, path, i, "end")
        if end <= start:
            raise ErcDataError(path, f"row {i + 1}: end {end:g} s is not after start {start:g} s")
        if end > length + 1 / SAMPLE_RATE:  # a sample's grace: the length at the file's own rate, resampled
            raise ErcDataError(path, f"row {i + 1}: end {end:g} s is past the end of {recording.name} ({length:.3f} s)")
        if _blank(row.speaker):
            raise ErcDataError(path, f"row {i + 1}: no speaker")
        starts[i], ends[i] = start, end
    out = table.copy()
    out["speaker"] = out["speaker"].astype(str).str.strip()
    out["dialogue_id"] = (out["dialogue_id"].astype(str) if "dialogue_id" in out else recording.stem)
    out["text"] = ["" if _blank(t) else str(t) for t in out["text"]] if "text" in out else ""
    out["text_source"] = np.where(out["text"].str.strip() != "", "given", "")
    out["audio"], out["start"], out["end"] = str(recording.resolve()), starts, ends
    out["row"] = np.arange(len(out))
    dialogues = {d: k for k, d in enumerate(pd.unique(out["dialogue_id"]))}
    out = out.assign(_dialogue=out["dialogue_id"].map(dialogues)).sort_values(["_dialogue", "start", "end", "row"],
                                                                               kind="stable")
    _check_overlaps(out, path)
    front = ["dialogue_id", "speaker", "text", "text_source", "audio", "start", "end"]
    return out[front + [c for c in table.columns if c not in front]].reset_index(drop=True)


def _check_overlaps(out: pd.DataFrame, path: Path) -> None:
    """One speaker's segments may touch but not overlap: one voice cannot say two utterances at once."""
    for _, own in out.groupby(["_dialogue", "speaker"], sort=False):
        if len(own) < 2:
            continue
        ends = own["end"].to_numpy()
        later = np.flatnonzero(own["start"].to_numpy()[1:] < np.maximum.accumulate(ends)[:-1])
        if later.size:
            j = later[0] + 1
            i = int(np.argmax(ends[:j] > own["start"].iloc[j]))  # an earlier segment still running at j's start
            a, b = own.iloc[i], own.iloc[j]
            first, second = sorted((a, b), key=lambda r: r["row"])
            raise ErcDataError(path, f"rows {first['row'] + 1} and {second['row'] + 1}: speaker {a['speaker']!r}'s "
                                     f"segments overlap ({a['start']:g}-{a['end']:g} s and {b['start']:g}-{b['end']:g} s)")


# ---------------------------------------------------------------- ASR


def check_asr(asr: str) -> str:
    """`asr` (a hub id or a local folder) as the path to load, after reading only its config: a missing folder,
    or a model that is not Whisper, is one line before any weights load."""
    from erc.features.text import resolve_encoder

    path = resolve_encoder(str(asr))
    local = Path(path).expanduser()
    if local.exists() or _looks_like_path(path):
        if not local.is_dir():
            raise ErcDataError(asr, "no such ASR model folder (--asr takes a Whisper model: a hub id or a local folder)")
        if not (local / "config.json").is_file():
            raise ErcDataError(asr, "no config.json: not a saved transformers model (--asr takes a Whisper model)")
        path = str(local)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ErcDataError(asr, f"cannot load an ASR model ({str(e).strip().splitlines()[0]})") from None
    if config.model_type != "whisper":
        raise ErcDataError(asr, f"a {config.model_type!r} model: --asr takes a Whisper model")
    return path


def _looks_like_path(name: str) -> bool:
    """A name a hub id cannot be (`org/name` at most): absolute, ./, ~, a trailing slash or two slashes."""
    return name.startswith(("/", ".", "~")) or name.endswith("/") or name.count("/") > 1 or "\\" in name


class Transcriber:
    """A Whisper model and its processor, loaded once, on the GPU when there is one."""

    def __init__(self, asr: str, *, device: str = "auto"):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor
        from transformers.utils import logging as hf_logging

        from erc.features.text import device_of, dtype_of

        path = check_asr(asr)
        hf_logging.disable_progress_bar()  # its weight-loading bar is noise on a prediction's stderr
        self.name, self.device = str(asr), device_of(device)
        try:
            self.processor = WhisperProcessor.from_pretrained(path)
            self.model = WhisperForConditionalGeneration.from_pretrained(
                path, dtype=dtype_of("auto", self.device)).to(self.device).eval()
        except (OSError, ValueError) as e:
            raise ErcDataError(asr, f"cannot load the ASR model ({str(e).strip().splitlines()[0]})") from None
        # greedy (the same clips give the same texts), at most ASR_MAX_NEW_TOKENS, whatever the checkpoint's
        # generation_config.json says (some ask for beams or sampling)
        self.generation = copy.deepcopy(self.model.generation_config)
        self.generation.update(do_sample=False, num_beams=1, max_length=None, max_new_tokens=min(
            ASR_MAX_NEW_TOKENS, self.model.config.max_target_positions - ASR_PROMPT_TOKENS))

    def __call__(self, clips: list[np.ndarray]) -> list[str]:
        """16 kHz mono clips of at most 30 s -> their transcripts."""
        import torch
        from transformers.utils import logging as hf_logging

        inputs = self.processor(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # Whisper's generate warns about arguments it passes itself, every call
        try:
            with torch.inference_mode():
                ids = self.model.generate(inputs.input_features.to(self.device, self.model.dtype),
                                          attention_mask=inputs.attention_mask.to(self.device),
                                          generation_config=self.generation)
        finally:
            hf_logging.set_verbosity(verbosity)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


def transcribe(rows: pd.DataFrame, asr, *, source=None, batch_size: int = ASR_BATCH) -> pd.DataFrame:
    """`rows` with every empty text that has audio transcribed by `asr` (a hub id or a local folder of a Whisper
    model, or a loaded Transcriber: any callable from a list of clips to their texts) and marked text_source
    'asr'; given texts are kept, marked 'given'. A row's audio is its `audio` cell, else its `video` cell (the
    sound track), cut by `start`/`end` where given: read_segments' rows, or a conversation file's from `source`
    (relative paths are under its folder; it names the file in messages). A row with neither text nor media stays
    empty. Nothing is loaded when no row needs a transcript."""
    rows = rows.copy()
    text = rows["text"].fillna("").astype(str) if "text" in rows else pd.Series("", index=rows.index)
    rows["text"] = text.to_numpy()
    marked = rows["text_source"].fillna("").astype(str) if "text_source" in rows else ""  # 'asr' stays 'asr'
    rows["text_source"] = np.where(text.str.strip() == "", "", np.where(marked == "", "given", marked))
    todo = [i for i in np.flatnonzero(rows["text_source"].to_numpy() == "") if _media(rows, i, source) is not None]
    if not todo:
        return rows
    model = Transcriber(asr) if isinstance(asr, (str, Path)) else asr
    pieces: list[tuple[int, np.ndarray]] = []  # (row, clip of at most 30 s)
    step = int(ASR_SECONDS * SAMPLE_RATE)
    for file, where in pd.Series(todo).groupby([str(_media(rows, i, source)) for i in todo], sort=False):
        wave = load_audio(file)  # once per file, not once per segment
        for i in where:
            first, last = (_bound(rows, i, c, source) for c in ("start", "end"))
            clip = wave[round((first or 0.0) * SAMPLE_RATE):len(wave) if last is None else round(last * SAMPLE_RATE)]
            pieces += [(i, clip[k:k + step]) for k in range(0, len(clip), step)]
    texts: dict[int, list[str]] = {}
    for k in range(0, len(pieces), batch_size):
        batch = pieces[k:k + batch_size]
        for (i, _), heard in zip(batch, model([clip for _, clip in batch])):
            texts.setdefault(i, []).append(heard)
    for i, parts in texts.items():
        rows.iloc[i, rows.columns.get_loc("text")] = " ".join(p for p in parts if p)
    rows.iloc[todo, rows.columns.get_loc("text_source")] = "asr"
    return rows


def _media(rows: pd.DataFrame, i: int, source) -> Path | None:
    """Row `i`'s media file: its `audio` cell, else its `video` cell; relative to `source`'s folder."""
    cell = next((v for c in ("audio", "video") if c in rows and not _blank(v := rows[c].iloc[i])), None)
    if cell is None:
        return None
    file = Path(str(cell)).expanduser()
    return file if file.is_absolute() or source is None else Path(source).parent / file


def _bound(rows: pd.DataFrame, i: int, column: str, source) -> float | None:
    value = rows[column].iloc[i] if column in rows else None
    return None if _blank(value) else _seconds(value, Path(source or rows["audio"].iloc[i]), i, column)


def recording_conversation(recording, segments, *, asr=None) -> pd.DataFrame:
    """`read_segments`' rows, the segments without text transcribed by `asr` when given (a bad `asr` is one line
    before the recording is read)."""
    if isinstance(asr, (str, Path)):
        check_asr(str(asr))
    rows = read_segments(recording, segments)
    return transcribe(rows, asr) if asr is not None else rows
