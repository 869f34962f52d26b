"""Hand-made acoustic feature sets from a 16 kHz waveform, through kept libraries (no signal processing here).

- `opensmile`: the openSMILE sets that the `opensmile` package ships, as utterance-level functionals:
  eGeMAPSv02 (88), ComParE_2016 (6,373), IS09 emotion (384), IS10 paralinguistics (1,582; the set of SDT's
  IEMOCAP features), GeMAPS, emobase, IS11-IS13.
- `librosa`: statistics over frames: log-mel and MFCC mean and std, F0 (pYIN) over voiced frames, the voiced
  fraction and voicing probability, and RMS energy in dB.

Every extractor has `names` (one per dimension) and maps a waveform to a float32 vector of `len(names)`.
Both pickle as their settings, so `erc.features.featurize` can run them in worker processes (`featurize.workers`).

A row's numbers must not depend on where it was computed: BLAS kernels sum in another order with another thread
count (OpenBLAS's Haswell kernels do; 62 of 1,068 librosa values moved by 2e-7 between 1 and 2 workers). So
reading a file and every hand-made set run with one thread in whichever process computes the row
(`single_threaded`), the stage's own as well as a worker; the processes are the parallelism.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import numpy as np

from erc.features.audio import SAMPLE_RATE, MediaError, load_audio


@dataclass
class OpenSmileSet:
    """openSMILE functionals of one of the package's feature sets (`opensmile.FeatureSet` names)."""

    set: str = "eGeMAPSv02"
    in_worker_processes: ClassVar[bool] = True  # CPU-bound, computed single-threaded, cheap to rebuild

    def __post_init__(self):
        import opensmile

        if self.set not in opensmile.FeatureSet.__members__:
            raise ValueError(f"unknown openSMILE set {self.set!r}; the package has {list(opensmile.FeatureSet.__members__)}")
        self.smile = opensmile.Smile(feature_set=opensmile.FeatureSet[self.set],
                                     feature_level=opensmile.FeatureLevel.Functionals)
        self.names = list(self.smile.feature_names)

    def __getstate__(self):  # the Smile object holds a C handle: a worker process builds its own
        return {"set": self.set}

    def __setstate__(self, state):
        self.set = state["set"]
        self.__post_init__()

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        return self.smile.process_signal(wave, SAMPLE_RATE).to_numpy(dtype=np.float32)[0]


@dataclass
class LibrosaStats:
    """Frame statistics through librosa (25 ms windows, 10 ms hop)."""

    n_mels: int = 64
    n_mfcc: int = 20
    fmin: float = 60.0  # F0 search range (Hz)
    fmax: float = 500.0
    f0_hop: int = 320  # pYIN's hop in samples (20 ms): pYIN is most of the cost
    in_worker_processes: ClassVar[bool] = True

    def __post_init__(self):
        stats = ("mean", "std")
        self.names = ([f"logmel{i}_{s}" for s in stats for i in range(self.n_mels)]
                      + [f"mfcc{i}_{s}" for s in stats for i in range(self.n_mfcc)]
                      + ["f0_semitone_mean", "f0_semitone_std", "f0_semitone_p10", "f0_semitone_p90",
                         "voiced_fraction", "voiced_prob_mean",
                         "rms_db_mean", "rms_db_std", "rms_db_p10", "rms_db_p90"])

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        import librosa

        n_fft, hop = 400, 160
        mel = librosa.feature.melspectrogram(y=wave, sr=SAMPLE_RATE, n_fft=n_fft, hop_length=hop, n_mels=self.n_mels)
        logmel = librosa.power_to_db(mel, top_db=80.0)
        mfcc = librosa.feature.mfcc(S=logmel, n_mfcc=self.n_mfcc)
        f0, voiced, prob = librosa.pyin(wave, fmin=self.fmin, fmax=self.fmax, sr=SAMPLE_RATE, frame_length=1024,
                                        hop_length=self.f0_hop)
        semitones = 12 * np.log2(f0[voiced] / 55.0) if voiced.any() else np.zeros(1)  # re A1; unvoiced: 0
        rms_db = librosa.amplitude_to_db(librosa.feature.rms(y=wave, frame_length=n_fft, hop_length=hop)[0], top_db=80.0)
        parts = [logmel.mean(1), logmel.std(1), mfcc.mean(1), mfcc.std(1),
                 [semitones.mean(), semitones.std(), *np.percentile(semitones, [10, 90])],
                 [voiced.mean(), np.nan_to_num(prob).mean()],
                 [rms_db.mean(), rms_db.std(), *np.percentile(rms_db, [10, 90])]]
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts])


EXTRACTORS = {"opensmile": OpenSmileSet, "librosa": LibrosaStats}


class Extracted(NamedTuple):
    """One item's features: `error` (a bad file) or its vectors, with where the time went."""

    error: MediaError | None
    data: object  # the waveform (or path) when the caller asked to keep it, for extractors run elsewhere
    audio_seconds: float
    vectors: dict
    seconds: dict
    load_seconds: float


def single_threaded():
    """One BLAS and OpenMP thread for what runs inside, restored after: the arithmetic of a worker process."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)  # looks the libraries up each time: scipy's BLAS loads only with librosa


def extract_item(read, extractors: dict, item, keep_data: bool) -> Extracted:
    """Read `item` and run every extractor on it. The reading and the sets that can run in worker processes run
    single-threaded here too, so a row is the same whichever process computes it; the rest (speech encoders) keep
    this process's threads."""
    try:
        start = time.perf_counter()
        with single_threaded():
            data = read(item)
        load = time.perf_counter() - start
        vectors, seconds = {}, {}
        for name, ex in extractors.items():
            start = time.perf_counter()
            with single_threaded() if getattr(ex, "in_worker_processes", False) else nullcontext():
                vectors[name] = ex(data)
            seconds[name] = time.perf_counter() - start
    except MediaError as e:  # a bad file is the caller's decision: stop or mask
        return Extracted(e, None, 0.0, {}, {}, 0.0)
    audio_seconds = len(data) / SAMPLE_RATE if isinstance(data, np.ndarray) else 0.0
    return Extracted(None, data if keep_data else None, audio_seconds, vectors, seconds, load)


_POOL = {}  # a worker process's extractors and whether the parent needs the waveforms back


def start_pool_worker(extractors: dict, keep_data: bool):
    _POOL.update(extractors=extractors, keep_data=keep_data)


def extract_in_pool(item) -> Extracted:
    return extract_item(load_audio, _POOL["extractors"], item, _POOL["keep_data"])
