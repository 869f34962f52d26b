"""Prepared datasets as dialogues, and dialogues as padded batches: what every model consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from erc.data.canonical import Prepared
from erc.errors import ErcDataError

IGNORE = -100  # label value for padding and unlabelled utterances (cross_entropy's ignore_index)


@dataclass
class Batch:
    """A batch of B dialogues padded to T utterances.

    features:      {modality: (B, T, D_m) float}
    modality_mask: {modality: (B, T) bool}  utterance present and this modality available for it
    mask:          (B, T) bool  real (not padded) utterances
    speakers:      (B, T) long  speaker index: within the dialogue by first appearance, or by the dataset's sorted
                                speaker names (`train.speakers: name`); 0 for padding
    labels:        (B, T) long  the dataset's target class, IGNORE where padded or unlabelled
    sentiment:     (B, T) long  sentiment class where the dataset has one besides the target, else IGNORE
    score:         (B, T) float continuous sentiment, NaN where none
    rows:          (B, T) long  row of the utterance in the prepared table, -1 for padding
    """

    features: dict[str, torch.Tensor]
    modality_mask: dict[str, torch.Tensor]
    mask: torch.Tensor
    speakers: torch.Tensor
    labels: torch.Tensor
    sentiment: torch.Tensor
    score: torch.Tensor
    rows: torch.Tensor

    def to(self, device, float_dtype: torch.dtype | None = None) -> "Batch":
        """On `device`; floating tensors also cast to `float_dtype` when given (a bf16/fp16 engine)."""

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, float_dtype) if float_dtype is not None and t.is_floating_point() else t.to(device)

        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = {k: move(v) for k, v in value.items()} if isinstance(value, dict) else move(value)
        return Batch(**moved)

    @property
    def num_utterances(self) -> int:
        return int(self.mask.sum())


@dataclass
class Dialogue:
    rows: np.ndarray  # table rows, in turn order
    speakers: np.ndarray
    labels: np.ndarray
    sentiment: np.ndarray
    score: np.ndarray


class Standardised:
    """A feature matrix standardised row by row as it is read: `view[rows]` is ((values[rows] - mean) / std) in
    float32, 0 where a row has no features. The same numbers a standardised copy of the whole matrix holds (the
    arithmetic is elementwise), computed per batch: a split holds no copy of the (memory-mapped) matrix."""

    def __init__(self, values: np.ndarray, mean: np.ndarray, std: np.ndarray, present: np.ndarray | None = None):
        self.values, self.mean, self.std, self.present = values, mean, std, present

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.values.shape[0]), int(self.values.shape[1]))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        out = ((self.values[rows] - self.mean) / self.std).astype(np.float32)
        if self.present is not None:
            out[~self.present[rows]] = 0.0
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:  # numpy 2's protocol: the standardised matrix exists only as a new array
            raise ValueError("a Standardised view has no array to share: it standardises into a new one")
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)


class DialogueData:
    """One split's dialogues plus the feature matrices they index into: standardised arrays, or `Standardised`
    views that standardise the rows a batch reads."""

    def __init__(self, dialogues: list[Dialogue], features: dict[str, np.ndarray | Standardised],
                 present: dict[str, np.ndarray]):
        self.dialogues = dialogues
        self.features = features
        self.present = present

    def __len__(self) -> int:
        return len(self.dialogues)

    @property
    def num_utterances(self) -> int:
        return int(sum(len(d.rows) for d in self.dialogues))

    def collate(self, indices) -> Batch:
        chosen = [self.dialogues[i] for i in indices]
        B, T = len(chosen), max(len(d.rows) for d in chosen)
        rows = np.full((B, T), -1, dtype=np.int64)
        speakers = np.zeros((B, T), dtype=np.int64)
        labels = np.full((B, T), IGNORE, dtype=np.int64)
        sentiment = np.full((B, T), IGNORE, dtype=np.int64)
        score = np.full((B, T), np.nan, dtype=np.float32)
        for b, d in enumerate(chosen):
            n = len(d.rows)
            rows[b, :n], speakers[b, :n], labels[b, :n] = d.rows, d.speakers, d.labels
            sentiment[b, :n], score[b, :n] = d.sentiment, d.score
        mask = rows >= 0
        safe = np.where(mask, rows, 0)
        features, modality_mask = {}, {}
        for m, matrix in self.features.items():
            feats = matrix[safe]
            feats[~mask] = 0.0
            features[m] = torch.from_numpy(feats)
            modality_mask[m] = torch.from_numpy(mask & self.present[m][safe])
        return Batch(features, modality_mask, torch.from_numpy(mask), torch.from_numpy(speakers),
                     torch.from_numpy(labels), torch.from_numpy(sentiment), torch.from_numpy(score),
                     torch.from_numpy(rows))

    def subset(self, indices) -> "DialogueData":
        """These dialogues only (sharing the feature matrices): one worker's part of a split."""
        return DialogueData([self.dialogues[i] for i in indices], self.features, self.present)

    def labelled(self, indices) -> int:
        """Labelled utterances in these dialogues: what a batch's loss is averaged over."""
        return int(sum((self.dialogues[i].labels != IGNORE).sum() for i in indices))

    def batch_indices(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> list[np.ndarray]:
        """Dialogue indices of each batch of `batch_size` dialogues, the same for any number of workers.

        Shuffling sorts by length inside buckets of 10 batches, so padding stays small while the batch
        composition still changes from epoch to epoch; each batch is ordered longest first.
        """
        order = np.arange(len(self.dialogues))
        if not shuffle:
            return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        order = np.random.default_rng(seed).permutation(order)
        lengths = np.array([len(self.dialogues[i].rows) for i in order])
        bucket = batch_size * 10
        order = np.concatenate([order[s:s + bucket][np.argsort(-lengths[s:s + bucket], kind="stable")]
                                for s in range(0, len(order), bucket)])
        starts = np.random.default_rng(seed + 1).permutation(np.arange(0, len(order), batch_size))
        return [order[s:s + batch_size] for s in starts]

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0):
        """Yield padded batches of `batch_size` dialogues (see `batch_indices`)."""
        for indices in self.batch_indices(batch_size, shuffle=shuffle, seed=seed):
            yield self.collate(indices)


def deal(indices: np.ndarray, parts: int) -> list[np.ndarray]:
    """Split a longest-first batch into `parts` of near-equal length by dealing it like cards.

    A part may be empty when the batch has fewer dialogues than parts.
    """
    return [indices[p::parts] for p in range(parts)]


def feature_stats(prep: Prepared, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of a feature set over the training split's present rows (float64 arithmetic, float32 out)."""
    fs = prep.features[name]
    train = (prep.table["split"] == "train").to_numpy()
    if fs.present is not None:
        train = train & fs.present
    mean, std = row_moments(fs.values, np.flatnonzero(train))
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def row_moments(values: np.ndarray, rows: np.ndarray, *, block_rows: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """np.mean and np.std (float64) over `values[rows]`, bit for bit, streamed `block_rows` rows at a time: no
    float64 copy of the rows. numpy sums a C-ordered matrix over axis 0 one row after another, and so does this,
    carrying the running sum into each block as its first row; then the same division, and the same second pass
    over the squared deviations from the mean, as np.std's. A one-column (or Fortran-ordered) matrix numpy sums
    pairwise along the rows instead: that is computed whole, as before (its float64 copy is 8 bytes a row)."""
    if len(rows) == 0 or values.shape[1] == 1 or not values.flags.c_contiguous:  # empty: NaN and numpy's warning
        whole = values[rows].astype(np.float64)
        return whole.mean(0), whole.std(0)
    buffer = np.empty((min(block_rows, len(rows)) + 1, values.shape[1]))

    def row_sum(transform) -> np.ndarray:
        total = None
        for start in range(0, len(rows), block_rows):
            chunk = rows[start:start + block_rows]
            first = 0 if total is None else 1
            block = buffer[first:first + len(chunk)]
            block[:] = values[chunk]
            transform(block)
            if total is not None:
                buffer[0] = total
            total = buffer[:first + len(chunk)].sum(0)
        return total

    mean = row_sum(lambda block: None) / len(rows)
    var = row_sum(lambda block: np.square(np.subtract(block, mean, out=block), out=block)) / len(rows)
    return mean, np.sqrt(var)


def speaker_names(table) -> list[str]:
    """The dataset's speaker names, sorted: the index of `speakers: name` (IEMOCAP: Female 0, Male 1)."""
    return sorted(table["speaker"].astype(str).unique())


def speaker_index(who, names: list[str] | None = None, source="speaker") -> np.ndarray:
    """One dialogue's speaker indices: by order of first turn, or (`names`) by position among the dataset's names."""
    who = [str(s) for s in who]
    if names is None:
        first = {s: i for i, s in enumerate(dict.fromkeys(who))}
        return np.array([first[s] for s in who], dtype=np.int64)
    index = {s: i for i, s in enumerate(names)}
    unknown = sorted(set(who) - set(index))
    if unknown:
        raise ErcDataError(source, f"speakers {unknown} are not among the names the model was trained on {names}")
    return np.array([index[s] for s in who], dtype=np.int64)


def split_data(prep: Prepared, split: str | tuple[str, ...], inputs: dict[str, str], target: str,
               stats: dict[str, tuple[np.ndarray, np.ndarray]], speakers: str = "appearance") -> DialogueData:
    """The dialogues of one split (or of several, in table order). `inputs` maps modality -> feature set; `target`
    is emotion or sentiment. `speakers`: each dialogue's speaker index by order of first turn (`appearance`), or
    by the speaker's name among the dataset's sorted names (`name`: the same index in every dialogue)."""
    t = prep.table
    splits = (split,) if isinstance(split, str) else tuple(split)
    names = speaker_names(t) if speakers == "name" else None
    features, present = {}, {}
    for modality, name in inputs.items():
        fs = prep.features[name]
        mean, std = stats[name]
        features[modality] = Standardised(fs.values, mean, std, fs.present)
        present[modality] = fs.present if fs.present is not None else np.ones(len(t), dtype=bool)
    labels = t[f"{target}_id"].to_numpy().astype(np.int64)
    labels[labels < 0] = IGNORE
    other = "sentiment" if target == "emotion" else None
    sentiment = t["sentiment_id"].to_numpy().astype(np.int64) if other else np.full(len(t), IGNORE)
    sentiment[sentiment < 0] = IGNORE
    score = t["sentiment_score"].to_numpy().astype(np.float32)
    dialogues = []
    part = t.index[t["split"].isin(splits)]
    for _, idx in t.loc[part].groupby("dialogue_id", sort=False).groups.items():
        rows = np.asarray(idx, dtype=np.int64)
        who = t.loc[rows, "speaker"].astype(str).to_numpy()
        dialogues.append(Dialogue(rows, speaker_index(who, names), labels[rows], sentiment[rows], score[rows]))
    return DialogueData(dialogues, features, present)
