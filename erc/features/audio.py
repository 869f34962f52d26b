"""Reading media into 16 kHz mono float32 waveforms, with one-line errors for bad files.

Audio files (wav, flac, ogg, mp3) are read with soundfile (libsndfile); anything else, video included
(MELD's mp4 clips), goes through the ffmpeg binary that the `imageio-ffmpeg` wheel ships, so no system
ffmpeg is needed. Everything is mixed down to mono and resampled to 16 kHz with soxr.

A missing, empty (0 bytes), corrupt (undecodable), sample-less or silent file raises `MediaError`, whose
message is one line naming the file and what is wrong; `erc.features.featurize` either stops on it or, with
`featurize.on_bad_media: mask`, zeroes that utterance's row, marks it absent and counts it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

from erc.data.media import AUDIO_SUFFIXES, MediaItem
from erc.errors import ErcDataError

SAMPLE_RATE = 16_000
# Silence: the loudest FRAME_SECONDS window's RMS below SILENCE_DBFS (dB re full scale). The loudest window, not
# the clip's mean: quiet speech padded with seconds of silence has a low mean but loud frames.
SILENCE_DBFS = -60.0
FRAME_SECONDS = 0.025


class MediaError(ErcDataError):
    """A media file that cannot give a usable waveform; one line naming it."""


def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _decode_ffmpeg(path: Path, sample_rate: int) -> np.ndarray:
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-i", str(path), "-vn", "-ac", "1", "-ar", str(sample_rate),
           "-f", "f32le", "-"]
    done = subprocess.run(cmd, capture_output=True)
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["no message"]
        raise MediaError(path, f"undecodable media (ffmpeg: {lines[-1].strip()})")
    return np.frombuffer(done.stdout, dtype=np.float32).copy()


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile

    try:
        wave, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError, EOFError) as e:
        raise MediaError(path, f"undecodable audio ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})") from None
    return wave.mean(axis=1), int(rate)


def load_audio(item: MediaItem | str | Path, *, sample_rate: int = SAMPLE_RATE,
               silence_dbfs: float = SILENCE_DBFS) -> np.ndarray:
    """The (segment of the) file as float32 mono at `sample_rate`; MediaError for a file that has none, or whose
    loudest 25 ms are below `silence_dbfs` (RMS, dB re full scale)."""
    import soxr

    item = item if isinstance(item, MediaItem) else MediaItem(Path(item))
    path = Path(item.path)
    if not path.is_file():
        raise MediaError(path, "missing media file")
    if path.stat().st_size == 0:
        raise MediaError(path, "empty media file (0 bytes)")
    if path.suffix.lower() in AUDIO_SUFFIXES:
        wave, rate = _decode_soundfile(path)
    else:
        wave, rate = _decode_ffmpeg(path, sample_rate), sample_rate
    if item.start is not None or item.end is not None:
        first = int(round((item.start or 0.0) * rate))
        last = len(wave) if item.end is None else int(round(item.end * rate))
        wave = wave[first:last]
    if wave.size == 0:
        raise MediaError(path, "no audio samples" + (f" in segment {item.start}-{item.end} s" if item.start is not None else ""))
    if not np.isfinite(wave).all():
        raise MediaError(path, "NaN/inf audio samples")
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate).astype(np.float32)
    level = loudest_frame_dbfs(wave, sample_rate)
    if level < silence_dbfs:
        raise MediaError(path, f"silent audio (RMS {level:.0f} dBFS in its loudest {FRAME_SECONDS * 1000:.0f} ms, "
                               f"threshold {silence_dbfs:.0f})")
    return np.ascontiguousarray(wave, dtype=np.float32)


def loudest_frame_dbfs(wave: np.ndarray, sample_rate: int, frame_seconds: float = FRAME_SECONDS) -> float:
    """The RMS (dBFS) of the loudest `frame_seconds` window of `wave` (every start sample; the whole wave when
    shorter), -inf for digital silence."""
    frame = max(1, min(len(wave), round(frame_seconds * sample_rate)))
    energy = np.concatenate([[0.0], np.cumsum(np.square(wave, dtype=np.float64))])
    loudest = float(np.max(energy[frame:] - energy[:-frame])) / frame
    return 10 * np.log10(loudest) if loudest > 0 else -np.inf
