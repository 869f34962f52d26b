"""The canonical form every dataset is converted into, and the checks it must pass.

A prepared dataset is a directory:

    utterances.parquet     one row per utterance, in dialogue order (columns: COLUMNS)
    media.parquet          utterance_id and a media file path per modality, only when the corpus names them
    meta.json              label names, target task, sources with their sha256, counts, notes
    features/<name>.npy    float32 (n_utterances, dim), row-aligned with the table (read memory-mapped)
    features/<name>.json   {"modality", "dim", "source", "missing", ...}
    features/<name>.present.npy   bool (n_utterances,), only when some rows have no features

Computed feature sets (the `featurize` stage) use the same `<name>.npy` + `<name>.json` pair in
their own directory. Label ids are -1 (and names "") where a dataset has no such label; the
sentiment score is NaN where a dataset has none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from erc.errors import ErcDataError
from erc.io import atomic_path

SPLITS = ("train", "valid", "test")
MODALITIES = ("text", "audio", "video")

COLUMNS = {
    "dialogue_id": "string",
    "turn": "int32",
    "utterance_id": "string",
    "speaker": "string",
    "text": "string",
    "split": "string",
    "emotion_id": "int16",
    "emotion": "string",
    "sentiment_id": "int16",
    "sentiment": "string",
    "sentiment_score": "float32",
}


@dataclass
class FeatureSet:
    name: str
    modality: str
    values: np.ndarray  # float32 (n, dim)
    source: list[str]  # the files it came from, for error messages and provenance
    present: np.ndarray | None = None  # bool (n,), None when every row has features
    info: dict = field(default_factory=dict)  # anything else worth recording (encoder, pooling, ...)

    @property
    def dim(self) -> int:
        return int(self.values.shape[1])

    def describe(self) -> dict:
        missing = 0 if self.present is None else int((~self.present).sum())
        return {"modality": self.modality, "dim": self.dim, "rows": int(self.values.shape[0]),
                "source": self.source, "missing": missing, **self.info}


@dataclass
class Prepared:
    table: pd.DataFrame
    meta: dict
    features: dict[str, FeatureSet]
    media: pd.DataFrame | None = None  # utterance_id and a file path per modality (media.parquet), when known

    @property
    def emotion_labels(self) -> list[str]:
        return self.meta["emotion_labels"]

    @property
    def sentiment_labels(self) -> list[str]:
        return self.meta["sentiment_labels"]


def make_table(records: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Build a table with exactly the canonical columns and dtypes (missing labels filled)."""
    df = pd.DataFrame(records)
    defaults = {"text": "", "emotion_id": -1, "emotion": "", "sentiment_id": -1, "sentiment": "",
                "sentiment_score": np.nan}
    for col, default in defaults.items():
        if col not in df:
            df[col] = default
    missing = [c for c in COLUMNS if c not in df]
    if missing:
        raise ValueError(f"canonical table lacks columns {missing}")
    return df[list(COLUMNS)].astype(COLUMNS).reset_index(drop=True)


def validation_dialogues(dialogues, fraction: float, seed: int) -> set[str]:
    """The training dialogues that become validation when a corpus ships none: a `fraction` of them, chosen by
    sha256(`<seed>:<dialogue>`), so the choice is deterministic and independent of file order."""
    ranked = sorted(dialogues, key=lambda d: hashlib.sha256(f"{seed}:{d}".encode()).hexdigest())
    return set(ranked[: round(fraction * len(ranked))])


def check_shape(shape: tuple, *, source, dim: int | None = None, rows: int | None = None) -> None:
    """A feature matrix's shape: 2-d, `dim` wide, `rows` long; ErcDataError naming `source` otherwise."""
    if len(shape) != 2:
        raise ErcDataError(source, f"features must be a 2-d matrix, got shape {tuple(shape)}")
    if dim is not None and shape[1] != dim:
        raise ErcDataError(source, f"wrong feature dim: {shape[1]}, expected {dim}")
    if rows is not None and shape[0] != rows:
        raise ErcDataError(source, f"{shape[0]} feature rows for {rows} utterances")


def _nonfinite(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values as float32, where they are NaN/inf)."""
    with np.errstate(over="ignore", invalid="ignore"):  # checked after the cast: 1e39 is inf in float32
        values = np.asarray(values).astype(np.float32, copy=False)
    return values, ~np.isfinite(values)


def check_features(values: np.ndarray, *, source, dim: int | None = None, rows: int | None = None) -> np.ndarray:
    """Reject NaN/inf and wrong shapes, naming `source`; return the matrix as float32."""
    values = np.asarray(values)
    check_shape(values.shape, source=source, dim=dim, rows=rows)
    check_finite(values, source=source)
    with np.errstate(over="ignore"):  # finite after the cast: checked above
        return values.astype(np.float32, copy=False)


def check_finite(values: np.ndarray, *, source, block_bytes: int = 1 << 24) -> None:
    """Reject NaN/inf (after the cast to float32), a block of rows at a time: a memory-mapped matrix is read
    through, not copied, and the mask is one block's."""
    step = max(1, block_bytes // max(1, values.itemsize * int(np.prod(values.shape[1:]))))
    bad_count, first = 0, None
    for start in range(0, len(values), step):
        _, bad = _nonfinite(values[start:start + step])
        if bad.any():
            bad_count += int(bad.sum())
            first = start + int(np.argwhere(bad)[0][0]) if first is None else first
    if bad_count:
        raise ErcDataError(source, f"{bad_count} NaN/inf feature values (first in row {first})")


def open_features(path) -> np.ndarray:
    """A saved feature matrix, memory-mapped read-only (its rows are read when used); ErcDataError naming `path`
    when it cannot be read."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        why = "truncated: shorter than its header says" if "mmap length" in str(e) else str(e).splitlines()[0]
        raise ErcDataError(path, f"unreadable feature matrix ({why})") from None


def check_feature_file(path, *, dim: int, rows: int, block_bytes: int = 1 << 24) -> None:
    """A saved feature matrix checked as `load_features` would find it, without holding it in memory: the shape
    its header gives, then NaN/inf a block of rows at a time (memory-mapped)."""
    path = Path(path)
    values = open_features(path)
    check_shape(values.shape, source=path, dim=dim, rows=rows)
    check_finite(values, source=path, block_bytes=block_bytes)


def validate(prep: Prepared, *, where, expected_dialogues=None) -> None:
    """Raise ErcDataError (naming `where`, or a feature's source) if `prep` breaks the canonical rules."""
    t = prep.table
    if list(t.columns) != list(COLUMNS):
        raise ErcDataError(where, f"columns {list(t.columns)} are not the canonical {list(COLUMNS)}")
    if len(t) == 0:
        raise ErcDataError(where, "no utterances")
    dup = t["utterance_id"][t["utterance_id"].duplicated()]
    if len(dup):
        raise ErcDataError(where, f"{len(dup)} duplicate utterance ids (first: {dup.iloc[0]})")
    bad_split = sorted(set(t["split"]) - set(SPLITS))
    if bad_split:
        raise ErcDataError(where, f"unknown split names {bad_split}")
    splits_per_dialogue = t.groupby("dialogue_id")["split"].nunique()
    leaking = splits_per_dialogue[splits_per_dialogue > 1]
    if len(leaking):
        raise ErcDataError(where, f"dialogue {leaking.index[0]} is in more than one split ({len(leaking)} such)")
    if expected_dialogues is not None:
        empty = sorted(set(expected_dialogues) - set(t["dialogue_id"]))
        if empty:
            raise ErcDataError(where, f"{len(empty)} empty dialogues (first: {empty[0]})")
    for dialogue, turns in t.groupby("dialogue_id", sort=False)["turn"]:
        if not np.array_equal(turns.to_numpy(), np.arange(len(turns))):
            raise ErcDataError(where, f"dialogue {dialogue}: turns are not 0..{len(turns) - 1} in table order")
    for task in ("emotion", "sentiment"):
        names = prep.meta[f"{task}_labels"]
        ids = t[f"{task}_id"].to_numpy()
        if not names:
            if (ids != -1).any():
                raise ErcDataError(where, f"{task} ids present but the dataset declares no {task} labels")
            continue
        outside = (ids < 0) | (ids >= len(names))
        if outside.any():
            i = int(np.argmax(outside))
            raise ErcDataError(where, f"{task} label {t[task].iloc[i]!r} (id {ids[i]}) of {t['utterance_id'].iloc[i]} "
                                      f"is outside the label set {names}")
        if not (t[task].to_numpy() == np.asarray(names, dtype=object)[ids]).all():
            raise ErcDataError(where, f"{task} names disagree with {task} ids")
    for name, fs in prep.features.items():
        if fs.modality not in MODALITIES:
            raise ErcDataError(fs.source[0], f"feature set {name}: unknown modality {fs.modality!r}")
        check_features(fs.values, source=fs.source[0], rows=len(t))
        if fs.present is not None and fs.present.shape != (len(t),):
            raise ErcDataError(fs.source[0], f"feature set {name}: presence mask has shape {fs.present.shape}")


def save_features(directory, fs: FeatureSet) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / f"{fs.name}.npy", fs.values.astype(np.float32))
    if fs.present is not None:
        np.save(directory / f"{fs.name}.present.npy", fs.present.astype(bool))
    write_feature_info(directory, fs)


def write_feature_info(directory, fs: FeatureSet) -> None:
    """The `<name>.json` beside a feature set's `.npy` (written last: a set without it is not there)."""
    (Path(directory) / f"{fs.name}.json").write_text(json.dumps(fs.describe(), indent=2) + "\n")


def load_features(directory, name: str) -> FeatureSet:
    directory = Path(directory)
    info_path = directory / f"{name}.json"
    if not info_path.is_file():
        raise ErcDataError(info_path, f"no feature set {name!r} here")
    info = json.loads(info_path.read_text())
    values = open_features(directory / f"{name}.npy")  # memory-mapped: memory stays bounded whatever the corpus size
    present_path = directory / f"{name}.present.npy"
    present = np.load(present_path, allow_pickle=False) if present_path.exists() else None
    extra = {k: v for k, v in info.items() if k not in ("modality", "dim", "rows", "source", "missing")}
    fs = FeatureSet(name, info["modality"], values, info["source"], present, extra)
    check_shape(values.shape, source=directory / f"{name}.npy", dim=info["dim"], rows=info["rows"])
    check_finite(values, source=directory / f"{name}.npy")
    return fs


def save(prep: Prepared, directory, *, expected_dialogues=None) -> None:
    """Validate, then write the whole dataset directory atomically (all of it or none of it)."""
    validate(prep, where=directory, expected_dialogues=expected_dialogues)
    meta = dict(prep.meta)
    meta["features"] = {name: fs.describe() for name, fs in prep.features.items()}
    meta["counts"] = counts(prep.table)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        prep.table.to_parquet(tmp / "utterances.parquet", index=False)
        if prep.media is not None:
            prep.media.to_parquet(tmp / "media.parquet", index=False)
        for fs in prep.features.values():
            save_features(tmp / "features", fs)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load(directory, *, extra_feature_dirs=(), feature_names=None) -> Prepared:
    """Read a prepared dataset; `feature_names` picks feature sets from it or from `extra_feature_dirs`."""
    directory = Path(directory)
    table_path = directory / "utterances.parquet"
    if not table_path.is_file():
        raise ErcDataError(table_path, "missing: run the prepare stage first")
    table = pd.read_parquet(table_path).astype(COLUMNS)
    meta = json.loads((directory / "meta.json").read_text())
    search = [directory / "features", *map(Path, extra_feature_dirs)]
    if feature_names is None:
        feature_names = [p.stem for d in search if d.is_dir() for p in sorted(d.glob("*.json"))]
    features = {}
    for name in feature_names:
        found = feature_dir(directory, extra_feature_dirs, name)
        features[name] = load_features(found, name)
        if features[name].values.shape[0] != len(table):
            raise ErcDataError(found / f"{name}.npy", f"{features[name].values.shape[0]} rows for {len(table)} utterances")
    return Prepared(table, meta, features)


def check_contents(directory, *, extra_feature_dirs=(), feature_names=()) -> None:
    """What `load(directory, extra_feature_dirs=..., feature_names=...)` will read, checked before anything uses it:
    the table and meta.json readable, and each feature set's matrix (and presence mask) with the shape its header
    gives and no NaN/inf. Training calls it before any run exists: a broken file is one line naming it, not a
    failed run."""
    directory = Path(directory)
    table_path = directory / "utterances.parquet"
    try:
        table = pd.read_parquet(table_path)  # every page, not only the footer: a corrupt page fails here too
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise ErcDataError(table_path, f"unreadable parquet ({str(e).splitlines()[0]}): rerun the prepare "
                                       "stage") from None
    lacking = [c for c in COLUMNS if c not in table.columns]
    if lacking:
        raise ErcDataError(table_path, f"lacks the canonical columns {lacking}: rerun the prepare stage")
    try:
        json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError) as e:
        raise ErcDataError(directory / "meta.json", f"unreadable JSON ({e}): rerun the prepare stage") from None
    for name in feature_names:
        folder = feature_dir(directory, extra_feature_dirs, name)
        try:
            dim = int(json.loads((folder / f"{name}.json").read_text())["dim"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ErcDataError(folder / f"{name}.json", f"unreadable feature set description ({e!r})") from None
        check_feature_file(folder / f"{name}.npy", dim=dim, rows=len(table))
        present = folder / f"{name}.present.npy"
        if present.exists():
            try:
                shape = np.load(present, mmap_mode="r", allow_pickle=False).shape
            except (OSError, ValueError) as e:
                raise ErcDataError(present, f"unreadable presence mask ({str(e).splitlines()[0]})") from None
            if shape != (len(table),):
                raise ErcDataError(present, f"presence mask has shape {shape}, expected ({len(table)},)")


def split_problem(table: pd.DataFrame, target: str) -> str | None:
    """What leaves a valid dataset untrainable, or None: a split without a dialogue, or without an utterance
    labelled for the `target` task (nothing to train on, to select the epoch by, or to score)."""
    dialogues = {s: int(table.loc[table["split"] == s, "dialogue_id"].nunique()) for s in SPLITS}
    empty = [s for s, n in dialogues.items() if n == 0]
    if empty:
        return (f"the {' and '.join(empty)} split{'s hold' if len(empty) > 1 else ' holds'} no dialogue ("
                + ", ".join(f"{s} {n}" for s, n in dialogues.items()) + " dialogues)")
    unlabelled = [s for s in SPLITS if not (table.loc[table["split"] == s, f"{target}_id"] >= 0).any()]
    if unlabelled:
        return f"no utterance of the {' and '.join(unlabelled)} split has a {target} label (the target task)"
    return None


def unseen_labels(table: pd.DataFrame, target: str) -> list[str]:
    """The `target` labels that valid or test hold and no training utterance has: the model never learns them."""
    seen = set(table.loc[table["split"] == "train", target])
    return sorted(set(table.loc[table["split"] != "train", target]) - seen - {""})


def feature_set_names(directory) -> list[str]:
    """The feature sets saved in a folder: one `<name>.json` each (`<name>.timing.json` is a featurize timing)."""
    return sorted(p.stem for p in Path(directory).glob("*.json") if not p.name.endswith(".timing.json"))


def feature_dir(directory, extra_feature_dirs, name: str) -> Path:
    """Where feature set `name` of a prepared dataset lives: its own features, then the computed ones."""
    search = [Path(directory) / "features", *map(Path, extra_feature_dirs)]
    for d in search:
        if (d / f"{name}.json").is_file():
            return d
    raise ErcDataError(directory, f"feature set {name!r} not found in {[str(d) for d in search]}")


def feature_info(directory, extra_feature_dirs, name: str) -> dict:
    """A feature set's description (its JSON: modality, dim, encoder, label_derived, leakage_probe...)."""
    return json.loads((feature_dir(directory, extra_feature_dirs, name) / f"{name}.json").read_text())


def counts(table: pd.DataFrame) -> dict:
    out = {}
    for split in SPLITS:
        part = table[table["split"] == split]
        out[split] = {"dialogues": int(part["dialogue_id"].nunique()), "utterances": int(len(part))}
        for task in ("emotion", "sentiment"):
            labelled = part[part[f"{task}_id"] >= 0]
            if len(labelled):
                out[split][task] = {k: int(v) for k, v in labelled[task].value_counts().sort_index().items()}
    return out
