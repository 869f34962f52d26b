"""Corpora shipped as CMU Multimodal SDK computational sequences (`.csd`, HDF5): CMU-MOSI, CMU-MOSEI, POM.

A computational sequence holds one top-level group `<name>` with `data/<video>/features` (N x D) and
`data/<video>/intervals` (N x 2, seconds), and `metadata`. Params (`datasets.<name>`, `adapter: csd`):

- `files.labels`: the labels sequence (`CMU_MOSI_Opinion_Labels.csd`, `CMU_MOSEI_Labels.csd`). Each of its rows
  is one utterance (segment) of the video, the video is the dialogue; segments are ordered by start time and
  the k-th (from 1) is utterance `<video>_<k>` (MOSI's transcript ids), turn k - 1, speaker the video (monologues).
- `files.folds`: the SDK's standard folds file (`cmu_mosi_std_folds.py`, `cmu_mosei_std_folds.py`, read as
  literal lists `standard_{train,valid,test}_fold`, never executed), or `options.folds: {train, valid, test}`.
  Labelled videos in no fold are left out, and fold videos without labels ignored (both counted in the notes).
- `options.features: {<files key>: <modality>}`: a feature sequence per entry (COVAREP, FACET, OpenFace, GloVe
  vectors...), the feature set named after its key, averaged over each segment's interval (`average` below).
- `options.target`: `sentiment` (default) or `emotion`.
- `options.sentiment`: `column` (default 0) of the labels' features, `classes`: `binary` (negative < 0 <=
  positive: erc's MOSI adapter and the papers before 2019), `binary_nonzero` (negative < 0 < positive; the
  segments scored exactly 0 are left out, as the papers after 2019 leave them out; the others keep their ids) or
  `seven` (the SDK's rounding to -3..3). The score itself is `sentiment_score`.
- `options.emotion` (MOSEI, optional): `columns`, `{name: column}` of the intensities ([0, 3]; MOSEI's are happy 1,
  sad 2, anger 3, surprise 4, disgust 5, fear 6) and `none` (the label of a segment where all are 0, default
  `neutral`). One label per segment: the highest intensity, a tie going to the first listed (MOSEI is
  multi-label: this is erc's single-label reading of it).
- `options.average`: `mean` (default: the SDK's `align` with an averaging collapse function, every frame that
  overlaps the segment by more than 1e-5 s counting once, however little of it overlaps) or `overlap` (each
  frame weighted by its overlap in seconds). A zero-length segment (MOSI has one) takes the frames that contain
  its instant; the SDK's align drops such a segment, erc keeps it as the MOSI release does.
- `options.nonfinite`: `error` (default) or `zero`: NaN/inf feature values (MOSEI's COVAREP has -inf) read as 0.

Every problem is one line naming the file, raised before anything is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import h5py
import numpy as np

from erc.data.canonical import SPLITS, FeatureSet, Prepared, make_table
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

EPSILON = 1e-5  # seconds: the SDK's `epsilon` (10e-6) for overlaps and zero-length intervals
OPTIONS = {"features", "folds", "target", "sentiment", "emotion", "average", "nonfinite"}
SENTIMENT_CLASSES = {"binary": ["negative", "positive"], "binary_nonzero": ["negative", "positive"],
                     "seven": ["-3", "-2", "-1", "0", "1", "2", "3"]}
FOLD_NAMES = {split: f"standard_{split}_fold" for split in SPLITS}


class Sequence:
    """An open computational sequence: its one top-level group and its `data` group, checked."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as e:
            raise ErcDataError(path, f"not an HDF5 computational sequence ({str(e).splitlines()[0]})") from None
        try:
            groups = [k for k in self.file if isinstance(self.file[k], h5py.Group)]
        except (KeyError, OSError) as e:  # a dangling link at the top
            self.file.close()
            raise ErcDataError(path, f"unreadable top-level entry ({str(e).splitlines()[0]})") from None
        if len(groups) != 1:
            self.file.close()
            raise ErcDataError(path, f"{len(groups)} top-level groups {groups}; a computational sequence has one, "
                                     "`<name>` holding `data` and `metadata`")
        self.name = groups[0]
        data = self.file[self.name].get("data")
        if not isinstance(data, h5py.Group):
            self.file.close()
            raise ErcDataError(path, f"group {self.name!r} has no `data` group")
        self.data = data

    def __contains__(self, video: str) -> bool:
        return video in self.data

    def videos(self) -> list[str]:
        return list(self.data)

    def read(self, video: str) -> tuple[np.ndarray, np.ndarray]:
        """(features (N, D), intervals (N, 2)) of a video, checked."""
        where = f"{self.name}/data/{video}"
        try:
            entry = self.data[video]
        except (KeyError, OSError) as e:  # a dangling link inside the file
            raise ErcDataError(self.path, f"{where}: unreadable ({str(e).splitlines()[0]})") from None
        for part in ("features", "intervals"):
            if not isinstance(entry, h5py.Group) or not isinstance(entry.get(part), h5py.Dataset):
                raise ErcDataError(self.path, f"{where} has no `{part}` dataset")
        features, intervals = entry["features"][()], entry["intervals"][()]
        if features.dtype.kind not in "fiub":
            raise ErcDataError(self.path, f"{where}/features are not numbers (dtype {features.dtype})")
        if features.ndim != 2:
            raise ErcDataError(self.path, f"{where}/features have shape {features.shape}, expected (N, D)")
        if intervals.ndim != 2 or intervals.shape[1] != 2 or intervals.dtype.kind not in "fiu":
            raise ErcDataError(self.path, f"{where}/intervals have shape {intervals.shape}, expected (N, 2) seconds")
        if len(features) != len(intervals):
            raise ErcDataError(self.path, f"{where}: {len(features)} feature rows but {len(intervals)} intervals")
        intervals = intervals.astype(np.float64)
        bad = ~np.isfinite(intervals).all(axis=1) | (intervals[:, 1] < intervals[:, 0])
        if bad.any():
            i = int(np.argmax(bad))
            raise ErcDataError(self.path, f"{where}/intervals row {i} is not a time span: {intervals[i].tolist()}")
        return features, intervals

    def close(self) -> None:
        self.file.close()


def read_folds(files: DatasetFiles, options: dict) -> tuple[dict[str, str], Path | str]:
    """{video: split} from the SDK's folds file or `options.folds`, and where it came from (for errors)."""
    if ("folds" in files.entries) == ("folds" in options):
        raise ErcDataError("options", "folds: give the folds either as files.folds (the SDK's *_std_folds.py) or "
                                      "as options.folds {train, valid, test}, one of the two")
    if "folds" in options:
        lists, source = options["folds"], "options"
        if not isinstance(lists, dict) or set(lists) != set(SPLITS) or \
                not all(isinstance(v, list) for v in lists.values()):
            raise ErcDataError("options", "folds: needs lists train, valid and test")
        names = {split: f"folds.{split}" for split in SPLITS}
    else:
        source = files.path("folds")
        try:
            tree = ast.parse(source.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as e:
            raise ErcDataError(source, f"unreadable folds file ({str(e).splitlines()[0]})") from None
        found = {}
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    found[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    continue
        names = FOLD_NAMES
        missing = [n for n in names.values() if not isinstance(found.get(n), list)]
        if missing:
            raise ErcDataError(source, f"no list {missing[0]} (the SDK's folds file assigns "
                                       f"{', '.join(FOLD_NAMES.values())})")
        lists = {split: found[name] for split, name in names.items()}
    split_of = {}
    for split in SPLITS:
        for video in lists[split]:
            video = str(video)
            if video in split_of and split_of[video] != split:
                where = "folds: " if source == "options" else ""
                raise ErcDataError(source, f"{where}video {video!r} is in both {names[split_of[video]]} and "
                                           f"{names[split]}")
            split_of[video] = split
    return split_of, source


def sentiment_ids(scores: np.ndarray, classes: str) -> np.ndarray:
    if classes == "binary":
        return (scores >= 0).astype(np.int16)
    if classes == "binary_nonzero":
        return np.where(scores > 0, 1, np.where(scores < 0, 0, -1)).astype(np.int16)
    # the SDK's cmumosei_round: under -2 -> -3, [-2,-1) -> -2, [-1,0) -> -1, 0, (0,1] -> 1, (1,2] -> 2, over 2 -> 3
    rounded = np.where(scores < 0, np.maximum(np.floor(scores), -3), np.minimum(np.ceil(scores), 3))
    return (rounded + 3).astype(np.int16)


def emotion_ids(values: np.ndarray, columns: list[int]) -> np.ndarray:
    """The highest intensity's index in `columns` (a tie goes to the first listed); len(columns) where all are 0."""
    intensities = values[:, columns]
    return np.where((intensities > 0).any(axis=1), np.argmax(intensities, axis=1), len(columns)).astype(np.int16)


def segment_weights(frames: np.ndarray, segments: np.ndarray, average: str) -> np.ndarray:
    """(segments, frames) weights: which frames a segment averages, and how much each counts."""
    start = np.maximum(frames[None, :, 0], segments[:, None, 0])
    end = np.minimum(frames[None, :, 1], segments[:, None, 1])
    overlap = end - start
    span = segments[:, 1] - segments[:, 0]
    point = (frames[None, :, 0] <= segments[:, None, 0]) & (segments[:, None, 0] <= frames[None, :, 1])
    hit = np.where(span[:, None] > EPSILON, overlap > EPSILON, point)
    if average == "overlap":
        return np.where(hit, np.where(span[:, None] > EPSILON, overlap, 1.0), 0.0)
    return hit.astype(np.float64)


def average_features(seq: Sequence, video: str, segments: np.ndarray, ids: list[str], *, average: str,
                     nonfinite: str, counts: dict) -> np.ndarray:
    """The video's feature frames averaged over each segment (rows in `segments` order)."""
    features, frames = seq.read(video)
    features = features.astype(np.float64)
    weights = segment_weights(frames, segments, average)
    bad = ~np.isfinite(features)
    if bad.any():
        used = int(bad[(weights > 0).any(axis=0)].sum())  # frames outside every segment do not matter
        if used and nonfinite != "zero":
            raise ErcDataError(seq.path, f"{seq.name}/data/{video}: {used} NaN/inf feature values in its segments "
                                         "(options.nonfinite: zero reads them as 0)")
        counts["nonfinite"] += used
        features = np.where(bad, 0.0, features)
    total = weights.sum(axis=1)
    if (total <= 0).any():
        i = int(np.argmax(total <= 0))
        raise ErcDataError(seq.path, f"{seq.name}/data/{video}: no feature frame overlaps segment {ids[i]} "
                                     f"({segments[i, 0]:.3f}-{segments[i, 1]:.3f} s)")
    return (weights @ features) / total[:, None]


def build(files: DatasetFiles, options: dict) -> tuple[Prepared, list[str]]:
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ErcDataError("options", f"{unknown[0]}: unknown key (known: {sorted(OPTIONS)})")
    target = options.get("target", "sentiment")
    sentiment = dict(options.get("sentiment") or {})
    classes = sentiment.get("classes", "binary")
    average, nonfinite = options.get("average", "mean"), options.get("nonfinite", "error")
    emotion = options.get("emotion")
    feature_keys = options.get("features") or {}
    for key, value, allowed in (("target", target, ("sentiment", "emotion")), ("sentiment.classes", classes,
                                list(SENTIMENT_CLASSES)), ("average", average, ("mean", "overlap")),
                                ("nonfinite", nonfinite, ("error", "zero"))):
        if value not in allowed:
            raise ErcDataError("options", f"{key}: {value!r} is none of {list(allowed)}")
    if sorted(set(sentiment) - {"column", "classes"}):
        raise ErcDataError("options", f"sentiment.{sorted(set(sentiment) - {'column', 'classes'})[0]}: unknown key "
                                      "(known: column, classes)")
    if target == "emotion" and not emotion:
        raise ErcDataError("options", "target: emotion needs options.emotion.columns")
    if target == "emotion" and classes == "binary_nonzero":  # it would drop emotion-labelled segments scored 0
        raise ErcDataError("options", "target: emotion with sentiment.classes binary_nonzero would drop every segment "
                                      "scored 0; use binary or seven")
    if emotion and not (isinstance(emotion, dict) and isinstance(emotion.get("columns"), dict) and emotion["columns"]):
        raise ErcDataError("options", "emotion: needs columns, {label name: column of the labels' features}")
    if not isinstance(feature_keys, dict) or any(m not in ("text", "audio", "video") for m in feature_keys.values()):
        raise ErcDataError("options", "features: needs {files key: text, audio or video}")
    split_of, folds_source = read_folds(files, options)

    labels_path = files.path("labels")
    labels = Sequence(labels_path)
    try:
        labelled = labels.videos()
        videos = sorted((v for v in labelled if v in split_of), key=lambda v: (SPLITS.index(split_of[v]), v))
        rows, segments = [], {}
        for video in videos:
            values, intervals = labels.read(video)
            if len(values) == 0:
                raise ErcDataError(labels_path, f"{labels.name}/data/{video} has no segments")
            width = values.shape[1]
            wanted = [sentiment.get("column", 0), *((emotion or {}).get("columns") or {}).values()]
            outside = [c for c in wanted if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < width]
            if outside:
                raise ErcDataError("options", f"column {outside[0]!r} is outside the {width} label columns of "
                                              f"{labels_path.name}")
            order = np.argsort(intervals[:, 0], kind="stable")
            values, intervals = values[order].astype(np.float64), intervals[order]
            if not np.isfinite(values[:, wanted]).all():
                raise ErcDataError(labels_path, f"{labels.name}/data/{video}: NaN/inf label values")
            segments[video] = intervals
            for k, row in enumerate(values, start=1):
                rows.append({"dialogue_id": video, "turn": k - 1, "utterance_id": f"{video}_{k}", "speaker": video,
                             "split": split_of[video], "values": row})
    finally:
        labels.close()
    if not rows:
        raise ErcDataError(labels_path, f"no labelled video is in a fold ({len(labelled)} videos, "
                                        f"{len(split_of)} in the folds)")

    values = np.stack([r.pop("values") for r in rows])
    scores = values[:, sentiment.get("column", 0)]
    for r, score, sid in zip(rows, scores, sentiment_ids(scores, classes)):
        r.update(sentiment_score=float(score), sentiment_id=int(sid),
                 sentiment=SENTIMENT_CLASSES[classes][sid] if sid >= 0 else "")
    emotion_labels = []
    if emotion:
        emotion_labels = [*emotion["columns"], emotion.get("none", "neutral")]
        if len(set(emotion_labels)) != len(emotion_labels):
            raise ErcDataError("options", f"emotion labels {emotion_labels} name one class twice (options.emotion."
                                          "columns and options.emotion.none must differ)")
        for r, eid in zip(rows, emotion_ids(values, list(emotion["columns"].values()))):
            r.update(emotion_id=int(eid), emotion=emotion_labels[eid])
    # binary_nonzero leaves the segments scored 0 out: the canonical form has no unlabelled utterance of the task
    keep = np.array([r["sentiment_id"] >= 0 for r in rows])
    rows = [r for r, k in zip(rows, keep) if k]
    if not rows:
        raise ErcDataError(labels_path, "every segment is scored 0: options.sentiment.classes binary_nonzero leaves "
                                        "none")
    table = make_table(rows)
    table["turn"] = table.groupby("dialogue_id", sort=False).cumcount().astype("int32")

    features, nonfinite_counts = {}, {}
    for key, modality in feature_keys.items():
        path = files.path(key)
        seq, counts = Sequence(path), {"nonfinite": 0}
        try:
            parts = []
            for video in videos:
                if video not in seq:
                    raise ErcDataError(path, f"no video {video!r} (labelled in {labels_path.name}, fold "
                                             f"{split_of[video]})")
                ids = [f"{video}_{k}" for k in range(1, len(segments[video]) + 1)]
                parts.append(average_features(seq, video, segments[video], ids, average=average, nonfinite=nonfinite,
                                              counts=counts))
            group = seq.name
        finally:
            seq.close()
        entry = files.entries[key]
        features[key] = FeatureSet(key, modality, np.concatenate(parts)[keep].astype(np.float32),
                                   [str(entry.get("url") or entry.get("path"))],
                                   info={"label_derived": False, "csd_group": group, "average": average,
                                         "nonfinite_zeroed": counts["nonfinite"]})
        nonfinite_counts[key] = counts["nonfinite"]

    unfolded = sorted(set(labelled) - set(split_of))
    unlabelled = sorted(set(split_of) - set(labelled))
    notes = [
        "one video = one dialogue; its label segments, by start time, are its utterances <video>_<k> (k from 1)",
        f"splits: the folds of {folds_source if isinstance(folds_source, str) else folds_source.name}; "
        f"{len(unfolded)} labelled videos in no fold left out" + (f" (first: {unfolded[0]})" if unfolded else "")
        + f"; {len(unlabelled)} fold videos without labels" + (f" (first: {unlabelled[0]})" if unlabelled else ""),
        {"binary": "binary sentiment: positive iff the score >= 0 (as erc's MOSI adapter)",
         "binary_nonzero": f"binary sentiment: negative < 0 < positive; {int((~keep).sum())} segments scored 0 "
                           "left out",
         "seven": "7-class sentiment: the SDK's rounding of the score to -3..3"}[classes],
    ]
    if emotion:
        notes.append("emotion: the highest intensity of " + ", ".join(emotion["columns"]) + " (ties: the first "
                     f"listed); all 0 is {emotion_labels[-1]!r}")
    if feature_keys:
        notes.append("features: each sequence averaged over each segment, " + (
            "every overlapping frame once (the SDK's align with an averaging collapse)" if average == "mean"
            else "each frame weighted by its overlap in seconds"))
    notes += [f"{key}: {n} NaN/inf values read as 0" for key, n in nonfinite_counts.items() if n]
    meta = {
        "dataset": "csd",
        "target": target,
        "emotion_labels": emotion_labels,
        "sentiment_labels": SENTIMENT_CLASSES[classes],
        "has_sentiment_score": True,
        "sources": files.checksums(),
        "notes": notes,
    }
    return Prepared(table, meta, features), list(table["dialogue_id"].unique())
