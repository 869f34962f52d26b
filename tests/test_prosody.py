"""VoiceERC's prosody8 from audio (erc.features.prosody) on generated sound whose Praat values are known by hand:
a pure tone's pitch, a sine's level in dB re 2e-5 Pa, silence, a counted train of syllable-like bursts, the HNR
of a tone and of noise; and the values VoiceERC's own extract_audio_features_with_praat gave for one clip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erc.data.media import MediaItem
from erc.data.voiceerc import COLUMNS
from erc.features.audio import MediaError
from erc.features.prosody import prosody8, prosody8_batch, prosody8_file
from tests.media_fixtures import SR, write_audio


def values(wave, sr=SR) -> dict:
    row = prosody8(wave, sr)
    assert row.shape == (8,) and row.dtype == np.float64
    return dict(zip(COLUMNS, row))


def sine(seconds: float, freq: float = 200.0, amplitude: float = 0.1, sr: int = SR) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * sr)) / sr)


def db_spl(amplitude: float) -> float:
    """Praat's intensity of a sine: its mean square (A^2 / 2) in dB re (2e-5 Pa)^2."""
    return 10 * math.log10(amplitude ** 2 / 2 / 4e-10)


def bursts(count: int, period: float, *, pause: float = 0.5, seed: int = 0) -> np.ndarray:
    """`count` syllable-like bursts (a 200 Hz tone under a raised cosine, one per `period` s, dipping to nothing
    between them) with `pause` s of faint noise before and after."""
    t = np.arange(round(count * period * SR)) / SR
    voiced = (0.5 - 0.5 * np.cos(2 * np.pi * t / period)) * sine(count * period, amplitude=0.3)
    quiet = np.zeros(round(pause * SR))
    wave = np.concatenate([quiet, voiced, quiet])
    return wave + 1e-4 * np.random.default_rng(seed).normal(size=len(wave))


def test_pure_tone_has_its_pitch_and_no_pitch_spread():
    v = values(sine(1.0, 200.0))
    assert v["duration"] == 1.0
    assert v["avg_pitch"] == pytest.approx(200.0, abs=0.05)
    assert v["pitch_std"] < 0.01 and v["pitch_range"] < 0.05
    v = values(sine(1.0, 130.0))
    assert v["avg_pitch"] == pytest.approx(130.0, abs=0.05)


@pytest.mark.parametrize("amplitude", [0.3, 0.1, 0.01])
def test_intensity_is_db_re_20_micropascal(amplitude):
    v = values(sine(1.0, amplitude=amplitude))
    assert v["avg_intensity"] == pytest.approx(db_spl(amplitude), abs=0.01)  # 0.1 -> 70.97 dB
    assert v["intensity_variation"] < 0.01


def test_mean_intensity_averages_energy_and_variation_is_the_frame_std():
    # 1 s at 0.1 then 1 s at 0.01: frames at 70.97 and 50.97 dB. Energy mean: 10 log10 of the mean power,
    # 3 dB under the loud half (a mean of dB would be 60.97); the frames' std is half the 20 dB step.
    v = values(np.concatenate([sine(1.0, amplitude=0.1), sine(1.0, amplitude=0.01)]))
    energy_mean = 10 * math.log10((10 ** (db_spl(0.1) / 10) + 10 ** (db_spl(0.01) / 10)) / 2)
    assert v["avg_intensity"] == pytest.approx(energy_mean, abs=0.1)
    assert v["intensity_variation"] == pytest.approx(10.0, abs=0.5)


def test_silence_gives_what_voiceerc_wrote():
    # Praat's floor of -300 dB, no voiced frame (mean pitch undefined: an empty CSV cell; std and range 0 as
    # VoiceERC writes them), no syllable peak (its script raised: empty), no voiced HNR frame (empty)
    row = prosody8(np.zeros(SR), SR)
    np.testing.assert_array_equal(row, [1.0, -300.0, 0.0, np.nan, 0.0, 0.0, np.nan, np.nan])


@pytest.mark.parametrize("count,period", [(10, 0.2), (6, 0.3)])
def test_articulation_rate_is_nuclei_per_second_of_phonation(count, period):
    # de Jong & Wempe's loop judges each peak by the dip before the next one, so the last burst is never counted:
    # count - 1 nuclei over the voiced stretch (count * period s); the 0.5 s pauses are not phonation.
    v = values(bursts(count, period))
    assert v["articulation_rate"] == pytest.approx((count - 1) / (count * period), rel=0.03)


def test_a_long_pause_is_not_phonation_time():
    five = bursts(5, 0.2)
    v = values(np.concatenate([five, bursts(5, 0.2, seed=1)]))  # 1 s of pause between two 1 s stretches
    assert v["duration"] == pytest.approx(4.0)
    assert v["articulation_rate"] == pytest.approx(9 / 2.0, rel=0.03)  # not 9 / 4 s (speech rate)


def test_a_steady_tone_has_no_syllable_nucleus():
    assert math.isnan(values(sine(1.0))["articulation_rate"])  # one peak, nothing after it: VoiceERC's empty cell


def test_hnr_is_high_for_a_tone_and_low_for_noise():
    assert values(sine(1.0))["mean_hnr"] > 60.0
    noise = values(0.1 * np.random.default_rng(0).normal(size=SR))
    assert noise["mean_hnr"] < 0.0
    assert math.isnan(noise["avg_pitch"]) and noise["pitch_std"] == 0.0


def test_same_values_as_voiceerc_gave_for_a_wav(tmp_path):
    # zehuiwu/VoiceERC's extract_audio_features_with_praat (praat-parselmouth 0.4.7, Praat 6.1.38) on this
    # 16-bit 16 kHz file: five bursts, a pause, five more
    wave = np.concatenate([bursts(5, 0.2), bursts(5, 0.2, seed=1)]).astype(np.float32)
    path = write_audio(tmp_path / "bursts.wav", wave, subtype="PCM_16")
    voiceerc = [4.0, 73.30388829164995, 29.118970346299598, 200.2163914433892, 0.3068188689032539, 1.0403723932327864,
                4.536290322580645, 36.11448793267484]
    np.testing.assert_allclose(prosody8_file(path), voiceerc, rtol=1e-8)


def test_a_clip_praat_cannot_analyse_is_a_media_error_naming_it():
    # shorter than To Intensity's 64 ms window at 100 Hz: VoiceERC's CSVs have no row for such a clip
    with pytest.raises(MediaError, match=r"^clip\.wav: Praat cannot analyse this 0\.050 s clip \(.*0\.064 s") as e:
        prosody8(sine(0.05), SR, source="clip.wav")
    assert "\n" not in str(e.value)
    with pytest.raises(MediaError, match="mono"):
        prosody8(np.zeros((SR, 2)), SR)


def test_files_segments_and_batches(tmp_path):
    tone = sine(1.0).astype(np.float32)
    path = write_audio(tmp_path / "tone.wav", tone, subtype="FLOAT")
    # a float wav at erc's 16 kHz is read as written (no resampling): the same row as the waveform
    np.testing.assert_array_equal(prosody8_file(path), prosody8(tone, SR))
    dialog = write_audio(tmp_path / "dialog.wav", np.concatenate([tone, np.zeros(SR, np.float32), 0.5 * tone]),
                         subtype="FLOAT")
    rows = prosody8_batch([MediaItem(dialog, 0.0, 1.0), tone, MediaItem(dialog, 2.0, 3.0)])
    assert rows.shape == (3, 8)
    np.testing.assert_array_equal(rows[0], rows[1])
    assert rows[0, COLUMNS.index("avg_intensity")] - rows[2, COLUMNS.index("avg_intensity")] == pytest.approx(
        20 * math.log10(2), abs=0.01)
    assert prosody8_batch([]).shape == (0, 8)
    # a silent segment is erc's one-line silent-audio error unless the caller lets silence through as VoiceERC did
    with pytest.raises(MediaError, match="silent audio"):
        prosody8_file(MediaItem(dialog, 1.2, 1.8))
    assert prosody8_file(MediaItem(dialog, 1.2, 1.8), silence_dbfs=-np.inf)[1] == -300.0
    # a 44.1 kHz file is resampled to 16 kHz like every erc audio set: the tone keeps its pitch and level
    hifi = prosody8_file(write_audio(tmp_path / "hifi.wav", sine(1.0, sr=44_100).astype(np.float32), 44_100))
    assert hifi[COLUMNS.index("avg_pitch")] == pytest.approx(200.0, abs=0.05)
    assert hifi[COLUMNS.index("avg_intensity")] == pytest.approx(db_spl(0.1), abs=0.01)
