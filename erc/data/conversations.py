"""The generic conversation adapter: a corpus of dialogues in CSV, TSV, JSONL or Parquet, described in params.

A params entry names the files (one per split, or one with a split column) and, under `options`, which column
holds what; this module turns them into the canonical form with the same validation and text repair as the
built-in adapters. Every option is in `Options` below and in docs/datasets.md, with a worked example.

Rows are checked one by one and every problem is kept (`erc check-data <dataset>` lists them all); the stage
stops on the first with one line `<file>: row <n>, column <name>: <problem>`. A row is the file's line for
CSV, TSV and JSONL (the header is line 1) and the record number from 1 for Parquet.

Order: splits train, valid, test; dialogues by their key (a key column whose values are all integers sorts as
numbers); utterances by the turn column (numbers), or in file order without one. Turn = the rank in that order.
"""

from __future__ import annotations

import ast
import io
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from erc.data.canonical import MODALITIES, SPLITS, Prepared, make_table, validation_dialogues
from erc.data.text_repair import decode, repair, wide_encoding
from erc.errors import ErcDataError
from erc.schema import check
from erc.sources import DatasetFiles

TASKS = ("emotion", "sentiment")
FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet"}
SCORE_SENTIMENTS = ["negative", "positive"]  # from a score alone: positive iff score >= 0 (MOSI's convention)


# ----------------------------------------------------------------------------------------------- options


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Columns(_Strict):
    """Which column of the files holds what (a JSONL key, for JSONL)."""

    dialogue: str | list[str]  # the dialogue key; several columns are joined (season, episode, scene)
    text: str
    turn: str | None = None  # numbers giving the order within a dialogue; None: file order
    utterance: str | None = None  # utterance ids; None: made (see Ids)
    speaker: str | None = None  # a name, or a list of names (`['Monica Geller']`, joined by ", ")
    emotion: str | None = None
    sentiment: str | None = None
    sentiment_score: str | None = None  # a number; without `sentiment`, the label is negative/positive by sign
    media: dict[Literal[MODALITIES], str] = {}  # modality -> column of file paths, relative to the data file


class Ids(_Strict):
    """Templates for the canonical ids (Python format fields: any column, `split`; utterances also
    `dialogue_id` and `turn`). Defaults: the key values joined by "_" (prefixed by `<split>_` when dialogue
    ids restart per split), and `<dialogue_id>_<turn>` or the utterance column."""

    dialogue: str | None = None
    utterance: str | None = None


class ValidFromTrain(_Strict):
    fraction: float = Field(0.15, gt=0, lt=1)
    seed: int = 0


class Options(_Strict):
    columns: Columns
    format: Literal["csv", "tsv", "jsonl", "parquet"] | None = None  # None: from each file's extension
    utterances_field: str | None = None  # JSONL: each line is a dialogue, its utterances a list under this key
    dialogue_scope: Literal["corpus", "split"] = "corpus"  # "split": dialogue keys restart in every split
    ids: Ids = Ids()
    split_column: str | None = None  # one file holding every split; its values are mapped by split_values
    split_values: dict[Literal[SPLITS], str | list[str]] = {}  # split -> raw value(s); default: the split names
    valid_from_train: ValidFromTrain = ValidFromTrain()  # used when there is no validation split
    labels: dict[Literal[TASKS], list[str]] = {}  # the label list per task; absent: the labels seen in train
    label_map: dict[Literal[TASKS], dict[str, str]] = {}  # raw value (or synonym) -> label
    case_sensitive: bool = False  # labels and label_map keys compared as given, not case-folded
    repair_text: bool = True  # cp1252/UTF-8 damage repaired (erc.data.text_repair)
    target: Literal[TASKS] | None = None  # the task trained on; default: emotion if there is an emotion column


def parse_options(options: dict) -> Options:
    """The options, checked; a problem raises ErcDataError naming the option (`options.columns.text: missing`)."""
    opts = check(Options, options or {}, source="options", prefix="")
    if not (opts.columns.emotion or opts.columns.sentiment or opts.columns.sentiment_score):
        raise ErcDataError("options", "columns: no label column (emotion, sentiment or sentiment_score)")
    target = opts.target or ("emotion" if opts.columns.emotion else "sentiment")
    if target == "emotion" and not opts.columns.emotion:
        raise ErcDataError("options", "target: emotion, but columns.emotion is not set")
    return opts.model_copy(update={"target": target})


# ----------------------------------------------------------------------------------------------- problems


@dataclass
class Problem:
    file: str
    row: int | None
    column: str | None
    problem: str

    def __str__(self) -> str:
        where = ", ".join(x for x in (f"row {self.row}" if self.row else "", f"column {self.column}" if self.column
                                      else "") if x)
        return f"{self.file}: {where + ': ' if where else ''}{self.problem}"


class DataProblems(ErcDataError):
    """Every problem found in a corpus; the message is the first one (one line) and how many more there are."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        first = problems[0]
        more = f" ({len(problems) - 1} more: `erc check-data` lists them)" if len(problems) > 1 else ""
        super().__init__(first.file, str(first)[len(first.file) + 2:] + more)

    def __reduce__(self):
        return (type(self), (self.problems,))


MISSING = object()


@dataclass
class Row:
    """One utterance as read: its raw fields and where it came from."""

    file: str
    row: int
    split: str
    fields: dict
    folder: Path = field(default=Path("."))


# ----------------------------------------------------------------------------------------------- reading


def file_format(path: Path, opts: Options) -> str:
    fmt = opts.format or FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ErcDataError(path, f"cannot tell the format from the extension {path.suffix!r}: set options.format "
                                 f"({', '.join(sorted(set(FORMATS.values())))})")
    return fmt


def needed_columns(opts: Options) -> list[str]:
    c = opts.columns
    keys = [c.dialogue] if isinstance(c.dialogue, str) else list(c.dialogue)
    named = [c.text, c.turn, c.utterance, c.speaker, c.emotion, c.sentiment, c.sentiment_score,
             *c.media.values(), opts.split_column]
    return keys + [n for n in named if n]


def option_of(opts: Options, column: str) -> str:
    """The option that names `column`, for messages."""
    for name, value in opts.columns:
        if value == column or (isinstance(value, list) and column in value):
            return f"options.columns.{name}"
        if name == "media" and column in value.values():
            return "options.columns.media"
    return "options.split_column"


def read_table(path: Path, fmt: str, opts: Options) -> list[tuple[int, dict]]:
    """(row number, fields) of every utterance record in the file."""
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
            return check_header(path, df, opts, [(i + 1, r) for i, r in enumerate(df.to_dict("records"))])
        raw = path.read_bytes()
    except (OSError, ValueError) as e:
        raise ErcDataError(path, f"unreadable {fmt} ({str(e).splitlines()[0]})") from None
    encoding = wide_encoding(raw)
    if encoding:  # read as UTF-8 its header would be garbled names, each reported as a missing column
        raise ErcDataError(path, f"not UTF-8 text ({encoding}): save it as UTF-8 (a spreadsheet's \"CSV UTF-8\")")
    text = decode(raw).removeprefix("\ufeff")  # a byte-order mark (spreadsheet exports)
    if fmt == "jsonl":
        return read_jsonl(path, text, opts)
    try:
        df = pd.read_csv(io.StringIO(text), sep="\t" if fmt == "tsv" else ",", dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError) as e:
        raise ErcDataError(path, f"unreadable {fmt.upper()} ({str(e).splitlines()[0]})") from None
    return check_header(path, df, opts, [(i + 2, r) for i, r in enumerate(df.to_dict("records"))])


def check_header(path: Path, df: pd.DataFrame, opts: Options, rows):
    missing = [c for c in dict.fromkeys(needed_columns(opts)) if c not in df.columns]
    if missing:
        raise ErcDataError(path, f"missing column {missing[0]!r} ({option_of(opts, missing[0])}"
                                 f"{f'; {len(missing) - 1} more missing' if len(missing) > 1 else ''}); "
                                 f"the file has {list(df.columns)}")
    return rows


def read_jsonl(path: Path, text: str, opts: Options) -> list[tuple[int, dict]]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise ErcDataError(path, f"row {number}: not JSON ({e})") from None
        if not isinstance(record, dict):
            raise ErcDataError(path, f"row {number}: a JSON object per line expected, got {type(record).__name__}")
        if opts.utterances_field is None:
            rows.append((number, record))
            continue
        utterances = record.get(opts.utterances_field, MISSING)
        if not isinstance(utterances, list) or not all(isinstance(u, dict) for u in utterances):
            rows.append((number, {"__problem__": (opts.utterances_field, "not a list of utterance objects")}))
        elif not utterances:
            rows.append((number, {"__problem__": (opts.utterances_field, "empty dialogue: no utterances")}))
        outer = {k: v for k, v in record.items() if k != opts.utterances_field}
        rows += [(number, {**outer, **u}) for u in utterances if isinstance(utterances, list) and isinstance(u, dict)]
    return rows


def read_rows(files: DatasetFiles, opts: Options, problems: list[Problem]) -> list[Row]:
    names = list(files.entries)
    if opts.split_column:
        if len(names) != 1:
            raise ErcDataError("options", f"split_column: one file expected, files has {names}")
        values = {s: [v] if isinstance(v, str) else v for s, v in opts.split_values.items()}
        split_of = {raw: s for s in SPLITS for raw in values.get(s, [s])}
    else:
        unknown = [n for n in names if n not in SPLITS]
        if unknown:
            raise ErcDataError("files", f"{unknown[0]}: not a split name ({', '.join(SPLITS)}); or give one file and "
                                        "options.split_column")
        for needed in ("train", "test"):
            if needed not in names:
                raise ErcDataError("files", f"{needed}: missing (train and test are needed; valid is carved from "
                                            "train when absent)")
    rows, paths = [], {}
    for name in names:
        path = paths[name] = files.path(name)
        for number, fields in read_table(path, file_format(path, opts), opts):
            if "__problem__" in fields:
                problems.append(Problem(str(path), number, *fields["__problem__"]))
                continue
            if opts.split_column:
                raw = fields.get(opts.split_column, MISSING)
                split = split_of.get(str(raw).strip()) if raw is not MISSING else None
                if split is None:
                    problems.append(Problem(str(path), number, opts.split_column,
                                            f"split value {raw if raw is not MISSING else '(missing)'!r} is none of "
                                            f"{sorted(split_of)} (options.split_values)"))
                    continue
            else:
                split = name
            rows.append(Row(str(path), number, split, fields, path.parent))
    present = {r.split for r in rows}
    for needed in ("train", "test"):
        if needed not in present and not problems:
            path = paths[names[0]] if opts.split_column else paths[needed]
            raise ErcDataError(path, f"no {needed} utterances" + (f" (column {opts.split_column}, options.split_values)"
                                                                   if opts.split_column else ""))
    return rows


# ----------------------------------------------------------------------------------------------- cells


def cell(row: Row, column: str, problems: list[Problem]):
    value = row.fields.get(column, MISSING)
    if value is MISSING:
        problems.append(Problem(row.file, row.row, column, "missing"))
    return value


def is_blank(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def as_text(row: Row, column: str, problems: list[Problem], *, what: str, opts: Options, allow_empty=False):
    value = cell(row, column, problems)
    if value is MISSING:
        return None
    if not isinstance(value, str):
        problems.append(Problem(row.file, row.row, column, f"{what} is not text: {type(value).__name__} {value!r}"))
        return None
    text = (repair(value) if opts.repair_text else value).strip()
    if not text and not allow_empty:
        problems.append(Problem(row.file, row.row, column, f"empty {what}"))
        return None
    return text


def as_speaker(row: Row, column: str, problems: list[Problem], opts: Options):
    value = cell(row, column, problems)
    if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
        try:  # a list written as text: ['Monica Geller'] (a literal only: nothing is evaluated)
            value = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            pass
    if isinstance(value, (list, tuple, np.ndarray)):
        names = list(value)
        if not all(isinstance(n, str) for n in names):
            problems.append(Problem(row.file, row.row, column, f"speaker list holds non-text {names!r}"))
            return None
        value = ", ".join(n.strip() for n in names)
    if value is MISSING:
        return None
    if not isinstance(value, str):
        problems.append(Problem(row.file, row.row, column, f"speaker is not text: {type(value).__name__} {value!r}"))
        return None
    return (repair(value) if opts.repair_text else value).strip()


def as_number(row: Row, column: str, problems: list[Problem], *, what: str):
    value = cell(row, column, problems)
    if value is MISSING:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)
        if isinstance(value, bool) or not math.isfinite(number):
            raise ValueError
    except (TypeError, ValueError):
        problems.append(Problem(row.file, row.row, column, f"{what} {value!r} is not a number"))
        return None
    return number


def as_key_part(row: Row, column: str, problems: list[Problem]):
    value = cell(row, column, problems)
    if value is MISSING:
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    if is_blank(value) or isinstance(value, (list, dict, np.ndarray)) or not str(value).strip():
        problems.append(Problem(row.file, row.row, column, f"dialogue key {value!r} is empty or not a value"))
        return None
    return str(value).strip()


def label_key(value, opts: Options) -> str:
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)  # label ids stored as numbers: 3.0 and "3" are the same label
    text = str(value).strip()
    return text if opts.case_sensitive else text.casefold()


# ----------------------------------------------------------------------------------------------- building


def fill(template: str, fields: dict, *, option: str) -> str:
    try:
        return string.Formatter().vformat(template, (), fields)
    except (KeyError, IndexError, ValueError, AttributeError) as e:
        raise ErcDataError("options", f"ids.{option}: template {template!r} cannot be filled ({type(e).__name__}: "
                                      f"{e}); fields are the file's columns, split"
                                      f"{', dialogue_id, turn' if option == 'utterance' else ''}") from None


def natural_order(keys: list[tuple]) -> list[tuple]:
    """Dialogue keys sorted; a key position whose values are all integers sorts as numbers."""
    numeric = [all(k[i].lstrip("-").isdigit() for k in keys) for i in range(len(keys[0]))] if keys else []
    return sorted(keys, key=lambda k: tuple((0, int(v), "") if numeric[i] else (1, 0, v) for i, v in enumerate(k)))


def labels_of(task: str, raw: list, rows: list[Row], column: str, opts: Options, problems: list[Problem]):
    """(label names, label per utterance) of one task: mapped, checked against the label list (or train's)."""
    mapping = {label_key(k, opts): v for k, v in opts.label_map.get(task, {}).items()}
    given = opts.labels.get(task)
    canonical = {label_key(n, opts): n for n in given} if given else None
    names = []
    for value, row in zip(raw, rows):
        if value is MISSING or value is None:
            names.append(None)
            continue
        if is_blank(value) or isinstance(value, (list, dict, np.ndarray)):
            problems.append(Problem(row.file, row.row, column, f"{task} label {value!r} is not a label"))
            names.append(None)
            continue
        key = label_key(value, opts)
        mapped = label_key(mapping[key], opts) if key in mapping else key
        names.append(mapped)
    if canonical is None:  # the labels of train, in sorted order
        canonical = {n: n for n in sorted({n for n, r in zip(names, rows) if n is not None and r.split == "train"})}
    out = []
    where = f"one of {list(canonical.values())}" + ("" if given else " (the labels seen in train)")
    for name, value, row in zip(names, raw, rows):
        if name is not None and name not in canonical:
            key = label_key(value, opts)
            how = (f"options.label_map.{task} maps it to {mapping[key]!r}, which is not {where}" if key in mapping
                   else f"it is not {where} and has no options.label_map.{task} entry")
            problems.append(Problem(row.file, row.row, column, f"{task} label {value!r}: {how}"))
        out.append(canonical.get(name))
    return list(canonical.values()), out


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    prepared, dialogues, problems = inspect(files, options)
    if problems:
        raise DataProblems(problems)
    return prepared, dialogues


def order_utterances(rows: list[Row], opts: Options, problems: list[Problem]):
    """Rows grouped into dialogues and ordered: (ordered dialogue keys, {key: row indices in turn order}).

    A dialogue is in one split (with `dialogue_scope: split` the split is part of its key); dialogues follow the
    split order, then their key; utterances follow the turn column, else file order."""
    c = opts.columns
    key_columns = [c.dialogue] if isinstance(c.dialogue, str) else list(c.dialogue)
    first_seen: dict[tuple, Row] = {}
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        parts = [as_key_part(row, col, problems) for col in key_columns]
        if None in parts:
            continue
        key = (row.split, *parts) if opts.dialogue_scope == "split" else tuple(parts)
        seen = first_seen.setdefault(key, row)
        if seen.split != row.split:
            problems.append(Problem(row.file, row.row, "+".join(key_columns),
                                    f"dialogue {'/'.join(key)} is in {seen.split} ({seen.file} row {seen.row}) and in "
                                    f"{row.split}: a dialogue belongs to one split (options.dialogue_scope: split if "
                                    "the ids restart per split)"))
            continue
        groups.setdefault(key, []).append(i)
    split_rank = {s: i for i, s in enumerate(SPLITS)}
    keys = sorted(natural_order(list(groups)), key=lambda k: split_rank[rows[groups[k][0]].split])  # stable
    if c.turn:
        turn = [as_number(r, c.turn, problems, what="turn") for r in rows]
        for key in keys:
            members = sorted((i for i in groups[key] if turn[i] is not None), key=lambda i: turn[i])
            for a, b in zip(members, members[1:]):
                if turn[a] == turn[b]:
                    problems.append(Problem(rows[b].file, rows[b].row, c.turn,
                                            f"duplicate turn {rows[b].fields[c.turn]!r} in dialogue {'/'.join(key)} "
                                            f"(also row {rows[a].row})"))
            groups[key] = members
        keys = [k for k in keys if groups[k]]  # a dialogue whose every turn is unreadable (each already a problem)
    return keys, groups


def dialogue_ids_of(keys: list[tuple], groups: dict, rows: list[Row], opts: Options) -> dict[tuple, str]:
    """Each dialogue's canonical id, from `ids.dialogue` filled with its first row, or its key; checked distinct."""
    ids, key_of_id = {}, {}
    for key in keys:
        first = rows[groups[key][0]]
        dialogue_id = (fill(opts.ids.dialogue, {**first.fields, "split": first.split}, option="dialogue")
                       if opts.ids.dialogue else "_".join(key))
        if key_of_id.setdefault(dialogue_id, key) != key:
            raise ErcDataError("options", f"ids.dialogue: dialogues {'/'.join(key_of_id[dialogue_id])} and "
                                          f"{'/'.join(key)} both get the id {dialogue_id!r}")
        ids[key] = dialogue_id
    return ids


def media_paths(rows: list[Row], opts: Options, problems: list[Problem]) -> dict[str, list]:
    """Per modality, each utterance's media file (relative to its data file's folder), checked to exist."""
    media = {}
    for modality, column in opts.columns.media.items():
        paths = []
        for row in rows:
            value = as_text(row, column, problems, what=f"{modality} path", opts=opts)
            path = (row.folder / value) if value else None
            if path is not None and not path.is_file():
                problems.append(Problem(row.file, row.row, column, f"{modality} file {str(path)!r} not found"))
            paths.append(str(path) if path else None)
        media[modality] = paths
    return media


def carve_validation(table: pd.DataFrame, opts: Options) -> tuple[pd.DataFrame, str]:
    """Without validation data: whole training dialogues become validation (`valid_from_train`), as for MOSI."""
    train = sorted(table.loc[table["split"] == "train", "dialogue_id"].unique())
    carved = validation_dialogues(train, opts.valid_from_train.fraction, opts.valid_from_train.seed)
    table.loc[table["dialogue_id"].isin(carved), "split"] = "valid"
    table = table.iloc[np.argsort(table["split"].map({s: i for i, s in enumerate(SPLITS)}).to_numpy(), kind="stable")]
    return table, (f"validation: {len(carved)} of {len(train)} training dialogues chosen by sha256('<seed>:<dialogue>'),"
                   f" fraction={opts.valid_from_train.fraction}, seed={opts.valid_from_train.seed}")


def inspect(files: DatasetFiles, options: dict) -> tuple[Prepared | None, list[str], list[Problem]]:
    """What `build` would produce and every problem found (the table is None when there are problems)."""
    opts = parse_options(options)
    c = opts.columns
    problems: list[Problem] = []
    rows = read_rows(files, opts, problems)
    keys, groups = order_utterances(rows, opts, problems)
    dialogue_ids = dialogue_ids_of(keys, groups, rows, opts)

    # Canonical fields per utterance, in order.
    records, ordered_rows, first_of_id = [], [], {}
    for key in keys:
        for turn, i in enumerate(groups[key]):
            row = rows[i]
            dialogue_id = dialogue_ids[key]
            fields = {**row.fields, "split": row.split, "dialogue_id": dialogue_id, "turn": turn}
            if c.utterance:
                utterance_id = as_text(row, c.utterance, problems, what="utterance id", opts=opts)
            else:
                utterance_id = fill(opts.ids.utterance or "{dialogue_id}_{turn}", fields, option="utterance")
            seen = first_of_id.setdefault(utterance_id, row)
            if seen is not row and utterance_id is not None:
                problems.append(Problem(row.file, row.row, c.utterance or "", f"duplicate utterance id "
                                                                              f"{utterance_id!r} (also row {seen.row})"))
            records.append({
                "dialogue_id": dialogue_id, "turn": turn, "utterance_id": utterance_id, "split": row.split,
                "speaker": as_speaker(row, c.speaker, problems, opts) if c.speaker else "",
                "text": as_text(row, c.text, problems, what="text", opts=opts),
                "sentiment_score": as_number(row, c.sentiment_score, problems, what="sentiment score")
                if c.sentiment_score else np.nan,
            })
            ordered_rows.append(row)

    # Labels: mapped and checked per task; a sentiment from the score's sign when there is no sentiment column.
    label_names = {}
    notes = [f"read by the generic conversation adapter (erc.data.conversations) from {len(rows)} rows"]
    for task in TASKS:
        column = getattr(c, task)
        if not column:
            continue
        raw = [cell(r, column, problems) for r in ordered_rows]
        label_names[task], names = labels_of(task, raw, ordered_rows, column, opts, problems)
        for rec, name in zip(records, names):
            rec[task] = name
        if task not in opts.labels:
            notes.append(f"{task} labels: those seen in train, sorted")
    if not c.sentiment and c.sentiment_score:
        label_names["sentiment"] = SCORE_SENTIMENTS
        for rec in records:
            score = rec["sentiment_score"]
            rec["sentiment"] = None if score is None or np.isnan(score) else SCORE_SENTIMENTS[int(score >= 0)]
        notes.append("sentiment labels: negative/positive by the sign of the score (positive iff >= 0)")
    media = media_paths(ordered_rows, opts, problems)
    if problems:
        return None, [], problems

    table = pd.DataFrame(records)
    if "valid" not in set(table["split"]):
        table, note = carve_validation(table, opts)
        notes.append(note)
    for task, names in label_names.items():
        table[f"{task}_id"] = table[task].map({n: i for i, n in enumerate(names)}).astype(np.int16)
    meta = {
        "dataset": "conversations",  # the params name replaces it (erc.data.build_dataset)
        "target": opts.target,
        "emotion_labels": label_names.get("emotion", []),
        "sentiment_labels": label_names.get("sentiment", []),
        "has_sentiment_score": bool(c.sentiment_score),
        "sources": files.checksums(),
        "notes": notes,
    }
    media_table = pd.DataFrame({"utterance_id": table["utterance_id"].to_numpy(),
                                **{m: np.asarray(p, dtype=object)[table.index.to_numpy()] for m, p in media.items()}})
    prepared = Prepared(make_table(table), meta, {}, media_table if media else None)
    return prepared, sorted(table["dialogue_id"].unique()), []
