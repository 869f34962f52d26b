"""VoiceERC's `prosody8` computed from audio, so the models trained on its CSVs (`erc.data.voiceerc`) can hear
new speech.

The method is VoiceERC's (zehuiwu/VoiceERC, `feature_utils/extract_audio_feature.py`), through Praat's own
algorithms in praat-parselmouth; the values come in `erc.data.voiceerc.COLUMNS` order:

- duration: the clip's length (s);
- avg_intensity: `To Intensity` (minimum pitch 100 Hz, automatic time step, mean subtracted), its energy-averaged
  mean in dB re 2e-5 Pa (Praat's floor for digital silence is -300 dB);
- intensity_variation: the (population) std of that Intensity's frame values;
- avg_pitch, pitch_std, pitch_range: `To Pitch` (automatic time step, 75-600 Hz), Praat's mean in Hz and the std
  and max - min of the voiced frames;
- articulation_rate: syllable nuclei per second of phonation, by de Jong & Wempe's script as VoiceERC's
  `syllable_nuclei.py` runs it (silence -25 dB, minimum dip 2 dB, minimum pause 0.3 s);
- mean_hnr: Praat's mean of the cross-correlation Harmonicity (10 ms step, 75 Hz, silence 0.1, 1 period per
  window), over its voiced frames.

NaN exactly where VoiceERC's CSV has an empty cell: avg_pitch when no frame is voiced (then pitch_std and
pitch_range are 0, as VoiceERC writes them), mean_hnr when no Harmonicity frame is voiced, articulation_rate when
VoiceERC's script fails on the clip (no intensity peak above its threshold, no voiced nucleus, no sounding
interval, or Praat refusing a clip too short for its analyses); `erc.data.voiceerc` fills those cells with the
training split's column median, and a caller of this module must do the same. A clip that Praat cannot analyse at
all (shorter than its intensity, pitch or harmonicity window) has no row in VoiceERC's CSVs: here it is a
`MediaError`, the error that masks an utterance's audio.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from erc.data.media import MediaItem
from erc.data.voiceerc import COLUMNS
from erc.features.audio import SAMPLE_RATE, SILENCE_DBFS, MediaError, load_audio

# de Jong & Wempe's settings as VoiceERC's syllable_nuclei.py fixes them (its arguments are not exposed there).
SILENCE_DB = -25.0  # below the 99% intensity quantile: silent
MIN_DIP_DB = 2.0  # a peak counts when the intensity falls this far before the next peak
MIN_PAUSE_S = 0.3  # shortest silent interval
MIN_SOUNDING_S = 0.1  # shortest sounding interval
NUCLEI_MIN_PITCH_HZ = 50.0  # the intensity contour that peaks are read from
# Sound: To Pitch (ac): time step, floor, candidates, very accurate, silence, voicing, octave, octave-jump,
# voiced/unvoiced costs, ceiling; a peak is a nucleus only where this contour is voiced.
NUCLEI_PITCH = (0.02, 30.0, 4, False, 0.03, 0.25, 0.01, 0.35, 0.25, 450.0)


def prosody8(wave: np.ndarray, sample_rate: int = SAMPLE_RATE, *, source: str | Path = "waveform") -> np.ndarray:
    """The 8 values (float64, `COLUMNS` order; NaN where VoiceERC's CSV is empty) of a mono waveform; `source`
    names it in the `MediaError` of a clip Praat cannot analyse."""
    import parselmouth
    from parselmouth.praat import call

    wave = np.asarray(wave, dtype=np.float64)  # Praat's samples; float32 input converts exactly
    if wave.ndim != 1:
        raise MediaError(source, f"prosody8 needs a mono waveform, got shape {wave.shape}")
    sound = parselmouth.Sound(wave, sampling_frequency=float(sample_rate))
    try:
        intensity = call(sound, "To Intensity", 100.0, 0.0, True)
        pitch = call(sound, "To Pitch", 0.0, 75.0, 600.0)
        harmonicity = sound.to_harmonicity_cc()
    except parselmouth.PraatError as e:  # VoiceERC skipped such a file: no row, so no audio for it
        why = " ".join(str(e).split())
        raise MediaError(source, f"Praat cannot analyse this {len(wave) / sample_rate:.3f} s clip ({why})") from None
    voiced = pitch.selected_array["frequency"]
    voiced = voiced[voiced != 0]
    return np.array([
        sound.get_total_duration(),
        call(intensity, "Get mean", 0.0, 0.0, "energy"),
        np.std(intensity.values),
        call(pitch, "Get mean", 0.0, 0.0, "Hertz"),  # NaN when nothing is voiced
        np.std(voiced) if voiced.size else 0.0,
        np.ptp(voiced) if voiced.size else 0.0,
        articulation_rate(sound),
        call(harmonicity, "Get mean", 0.0, 0.0),  # over voiced frames; NaN when there are none
    ], dtype=np.float64)


def prosody8_file(item: MediaItem | str | Path, *, sample_rate: int = SAMPLE_RATE,
                  silence_dbfs: float = SILENCE_DBFS) -> np.ndarray:
    """`prosody8` of a file (or a segment of one), read by `erc.features.audio.load_audio`: mono at `sample_rate`;
    a missing, corrupt or silent file (loudest 25 ms below `silence_dbfs`; -inf lets silence through, as VoiceERC
    did) is its one-line `MediaError`."""
    path = item.path if isinstance(item, MediaItem) else item
    return prosody8(load_audio(item, sample_rate=sample_rate, silence_dbfs=silence_dbfs), sample_rate, source=path)


def prosody8_batch(clips: Iterable[np.ndarray | MediaItem | str | Path], *, sample_rate: int = SAMPLE_RATE,
                   silence_dbfs: float = SILENCE_DBFS) -> np.ndarray:
    """One `prosody8` row per clip, shape (n, 8): a waveform (at `sample_rate`) as it is, a path or `MediaItem`
    read by `load_audio`. The first bad clip stops the batch with its `MediaError`."""
    rows = [prosody8(c, sample_rate) if isinstance(c, np.ndarray)
            else prosody8_file(c, sample_rate=sample_rate, silence_dbfs=silence_dbfs) for c in clips]
    return np.stack(rows) if rows else np.empty((0, len(COLUMNS)))


def articulation_rate(sound) -> float:
    """Voiced syllable nuclei per second of sounding time, de Jong & Wempe (2009) as VoiceERC runs it; NaN
    wherever VoiceERC's run raised (its CSV cell is then empty)."""
    import parselmouth

    try:
        with warnings.catch_warnings():  # Praat notes a clip of nearly constant level; the script goes on
            warnings.simplefilter("ignore", parselmouth.PraatWarning)
            nuclei, sounding_s = _syllable_nuclei(sound)
    except parselmouth.PraatError:  # a clip too short for the 50 Hz intensity or the 30 Hz pitch
        return math.nan
    # VoiceERC's script also divides sounding time by the count (ASD): no nucleus raised there, so no value
    return nuclei / sounding_s if nuclei and sounding_s > 0 else math.nan


def _syllable_nuclei(sound) -> tuple[int, float]:
    """(voiced nuclei inside sounding intervals, total sounding time in s)."""
    from parselmouth.praat import call

    intensity = sound.to_intensity(NUCLEI_MIN_PITCH_HZ)
    lowest = call(intensity, "Get minimum", 0.0, 0.0, "Parabolic")
    highest = call(intensity, "Get maximum", 0.0, 0.0, "Parabolic")
    almost_highest = call(intensity, "Get quantile", 0.0, 0.0, 0.99)  # not a stray non-speech burst
    peak_floor = max(almost_highest + SILENCE_DB, lowest)
    # "To TextGrid (silences)" takes its threshold relative to the maximum
    grid = call(intensity, "To TextGrid (silences)", SILENCE_DB - (highest - almost_highest), MIN_PAUSE_S,
                MIN_SOUNDING_S, "silent", "sounding")
    sounding_s = 0.0
    for i in range(1, call(grid, "Get number of intervals", 1) + 1):
        if call(grid, "Get label of interval", 1, i) == "sounding":
            sounding_s += call(grid, "Get end time of interval", 1, i) - call(grid, "Get start time of interval", 1, i)

    # peaks of the intensity contour read as a Sound, above the floor
    contour = call(call(intensity, "Down to Matrix"), "To Sound (slice)", 1)
    extrema = call(contour, "To PointProcess (extrema)", "Left", "yes", "no", "Sinc70")
    times = (call(extrema, "Get time from index", i) for i in range(1, call(extrema, "Get number of points") + 1))
    peaks = [t for t in times if call(contour, "Get value at time", t, "Cubic") > peak_floor]

    # a peak is a nucleus when the intensity dips more than MIN_DIP_DB between it and the next peak; as in the
    # script, the last peak has no next one and is never counted, and the first peak's level is read from the
    # contour, the later ones' from the Intensity
    level = call(contour, "Get value at time", peaks[0], "Cubic") if peaks else math.nan
    nuclei = []
    for here, following in itertools.pairwise(peaks):
        if abs(level - call(intensity, "Get minimum", here, following, "None")) > MIN_DIP_DB:
            nuclei.append(here)
        level = call(intensity, "Get value at time", following, "Cubic")

    pitch = sound.to_pitch_ac(*NUCLEI_PITCH)
    voiced = [t for t in nuclei if not math.isnan(pitch.get_value_at_time(t))
              and call(grid, "Get label of interval", 1, call(grid, "Get interval at time", 1, t)) == "sounding"]
    return len(voiced), sounding_s
