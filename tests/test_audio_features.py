"""Speech from audio files: reading (wav, flac, mp3, video through imageio-ffmpeg's ffmpeg) at 16 kHz mono, a
one-line error for each kind of bad file, the acoustic sets (openSMILE, librosa), the transformers speech
encoders on tiny random configs, and the featurize step over a media layout with the counted fallback."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from erc.data import canonical
from erc.data.media import MediaItem
from erc.features.acoustic import LibrosaStats, OpenSmileSet
from erc.features.audio import MediaError, load_audio
from erc.features.featurize import audio_extractors, featurize_media
from erc.features.speech import SpeechEncoder
from tests.media_fixtures import SR, ThreadsSeen, espeak, tiny_speech_model, tone, video_with_audio, write_audio


@pytest.fixture(scope="module")
def speech_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech_models")
    return {kind: tiny_speech_model(kind, root / kind) for kind in ("wav2vec2", "wavlm", "hubert", "whisper")}


# ------------------------------------------------------------------ reading media


def test_reads_wav_flac_mp3_and_video_as_16k_mono(tmp_path):
    stereo = np.stack([tone(1.0, sr=44_100), tone(1.0, 330.0, sr=44_100)], axis=1)
    for name, kwargs in [("a.wav", {}), ("a.flac", {}), ("a.mp3", {"format": "MP3"})]:
        wave = load_audio(write_audio(tmp_path / name, stereo, 44_100, **kwargs))
        assert wave.dtype == np.float32 and wave.ndim == 1
        assert abs(len(wave) - SR) < 0.06 * SR, name  # mp3 adds encoder padding
    clip = video_with_audio(tmp_path / "clip.mp4", write_audio(tmp_path / "v.wav", tone(1.0, sr=22_050), 22_050))
    from_video = load_audio(clip)
    assert abs(len(from_video) - SR) < 0.1 * SR and np.abs(from_video).max() > 0.1


def test_segment_of_a_longer_recording(tmp_path):
    path = write_audio(tmp_path / "dialog.wav", np.concatenate([tone(1.0), np.zeros(SR, np.float32), tone(1.0)]))
    assert len(load_audio(MediaItem(path, 0.25, 0.75))) == SR // 2
    with pytest.raises(MediaError, match="silent audio"):
        load_audio(MediaItem(path, 1.1, 1.9))


@pytest.mark.parametrize("kind,problem", [
    ("missing", "missing media file"),
    ("empty", r"empty media file \(0 bytes\)"),
    ("corrupt", "undecodable audio"),
    ("corrupt_video", "undecodable media \\(ffmpeg: "),
    ("no_samples", "no audio samples"),
    ("silent", r"silent audio \(RMS -inf dBFS"),
])
def test_bad_media_is_one_line_naming_the_file(tmp_path, kind, problem):
    path = {"missing": tmp_path / "gone.wav", "empty": tmp_path / "empty.wav", "corrupt": tmp_path / "junk.wav",
            "corrupt_video": tmp_path / "junk.mp4", "no_samples": tmp_path / "none.wav",
            "silent": tmp_path / "silent.flac"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind in ("corrupt", "corrupt_video"):
        path.write_bytes(b"RIFF\x00\x01garbage" * 50)
    elif kind == "no_samples":
        write_audio(path, np.zeros(0, np.float32))
    elif kind == "silent":
        write_audio(path, np.zeros(SR, np.float32))
    with pytest.raises(MediaError, match=problem) as raised:
        load_audio(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


# ------------------------------------------------------------------ acoustic sets


@pytest.mark.parametrize("name,dim", [("eGeMAPSv02", 88), ("IS09", 384), ("IS10", 1582)])
def test_opensmile_sets_have_their_published_sizes(name, dim):
    ex = OpenSmileSet(name)
    v = ex(tone(1.5))
    assert len(ex.names) == dim and v.shape == (dim,) and np.isfinite(v).all()


def test_opensmile_pitch_follows_the_tone():
    ex = OpenSmileSet("eGeMAPSv02")
    f0 = ex.names.index("F0semitoneFrom27.5Hz_sma3nz_amean")
    low, high = ex(tone(1.5, 150.0))[f0], ex(tone(1.5, 300.0))[f0]
    assert high - low == pytest.approx(12.0, abs=1.5)  # an octave is 12 semitones


def test_librosa_statistics():
    ex = LibrosaStats(n_mels=32, n_mfcc=13)
    low, high = ex(tone(1.0, 150.0)), ex(tone(1.0, 300.0))
    assert low.shape == (len(ex.names),) == (2 * 32 + 2 * 13 + 10,)
    f0 = ex.names.index("f0_semitone_mean")
    assert high[f0] - low[f0] == pytest.approx(12.0, abs=1.0)
    assert low[ex.names.index("voiced_fraction")] > 0.8
    noise = ex(np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32))
    assert noise[ex.names.index("voiced_fraction")] < 0.3


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_generated_speech_pitch_is_measured(tmp_path):
    ex = LibrosaStats()
    f0 = ex.names.index("f0_semitone_mean")
    low = ex(load_audio(espeak(tmp_path / "low.wav", "the weather is lovely today", pitch=10)))
    high = ex(load_audio(espeak(tmp_path / "high.wav", "the weather is lovely today", pitch=90)))
    assert high[f0] > low[f0] + 2 and 0.2 < low[ex.names.index("voiced_fraction")] < 1.0


# ------------------------------------------------------------------ transformers speech encoders


@pytest.mark.parametrize("kind", ["wav2vec2", "wavlm", "hubert", "whisper"])
def test_speech_encoder_families_pool_their_frames(speech_models, kind):
    enc = SpeechEncoder(model=str(speech_models[kind]), pooling="meanstd")
    wave = tone(1.0)
    frames = enc.frames(wave)
    v = enc(wave)
    assert v.shape == (64,) == (len(enc.names),) and np.isfinite(v).all()
    np.testing.assert_allclose(v[:32], frames.mean(0).numpy(), rtol=1e-5, atol=1e-6)
    if kind == "whisper":
        assert frames.shape[0] == 50  # 1 s of the 30 s window: only the real audio's frames are pooled
    assert np.abs(enc(tone(1.0, 330.0)) - v).max() > 1e-4


def test_speech_encoder_layer_and_chunking(speech_models):
    path = str(speech_models["wav2vec2"])
    wave = tone(3.0)
    whole = SpeechEncoder(model=path, chunk_seconds=30.0)
    chunked = SpeechEncoder(model=path, chunk_seconds=1.0)
    # each chunk's edges lose a frame or two of the convolutional front end's receptive field
    assert 0 < whole.frames(wave).shape[0] - chunked.frames(wave).shape[0] <= 2 * 3
    assert np.abs(SpeechEncoder(model=path, layer=0)(wave) - whole(wave)).max() > 1e-4
    whisper = SpeechEncoder(model=str(speech_models["whisper"]), chunk_seconds=60.0)
    assert whisper.chunk_seconds == 30.0
    assert whisper.frames(tone(31.0)).shape[0] == 1500 + 50


# ------------------------------------------------------------------ featurize over media


def test_featurize_media_masks_and_counts_bad_files(tmp_path, speech_models):
    good = [write_audio(tmp_path / f"g{i}.wav", tone(1.0, 150.0 + 50 * i)) for i in range(3)]
    silent = write_audio(tmp_path / "silent.wav", np.zeros(SR, np.float32))
    items = [MediaItem(good[0]), MediaItem(tmp_path / "missing.wav"), MediaItem(good[1]), MediaItem(silent),
             MediaItem(good[2])]
    params = {"acoustic": {"egemaps": {"kind": "opensmile", "set": "eGeMAPSv02"}},
              "speech": {"w2v": {"model": str(speech_models["wav2vec2"]), "layer": 1}}}
    extractors = audio_extractors(params, None)
    out = tmp_path / "features"
    with pytest.raises(MediaError, match="missing.wav: missing media file"):
        featurize_media(items, extractors, out / "strict", source=["test"], progress=False)
    figures = featurize_media(items, extractors, out, source=["test"], on_bad_media="mask", progress=False)
    assert figures["bad_media"] == 2 and figures["files"] == 5 and figures["audio_seconds"] == pytest.approx(3.0)
    for name, dim in [("egemaps", 88), ("w2v", 32)]:
        fs = canonical.load_features(out, name)
        assert fs.values.shape == (5, dim) and fs.modality == "audio"
        assert fs.present.tolist() == [True, False, True, False, True] and fs.info["bad_media"] == 2
        assert not fs.values[[1, 3]].any() and fs.values[[0, 2, 4]].any(axis=1).all()


def test_worker_processes_give_the_same_rows_and_the_same_bad_file_errors(tmp_path, speech_models):
    from threadpoolctl import threadpool_limits

    clips = [write_audio(tmp_path / f"c{i}.wav", tone(0.5 + 0.25 * i, 120.0 + 40 * i)) for i in range(5)]
    items = [MediaItem(c) for c in clips[:2]] + [MediaItem(tmp_path / "gone.wav")] + [MediaItem(c) for c in clips[2:]]
    params = {"acoustic": {"egemaps": {"kind": "opensmile", "set": "eGeMAPSv02"}, "lib": {"kind": "librosa"}},
              "speech": {"w2v": {"model": str(speech_models["wav2vec2"]), "layer": 1}}}  # stays in this process
    extractors = audio_extractors(params, None)
    with pytest.raises(MediaError, match="gone.wav: missing media file"):
        featurize_media(items, extractors, tmp_path / "strict", source=["test"], progress=False, workers=2)
    # The stage's process has 2 BLAS threads, as on any 2-core machine: with OpenBLAS's Haswell kernels (AMD EPYC),
    # librosa's rows computed with them differed in the 7th digit from a worker's, computed with one.
    with threadpool_limits(2):
        figures = {w: featurize_media(items, extractors, tmp_path / f"w{w}", source=["test"], on_bad_media="mask",
                                      progress=False, workers=w) for w in (1, 2)}
    assert figures[2]["workers"] == 2 and figures[2]["bad_media"] == figures[1]["bad_media"] == 1
    assert figures[2]["audio_seconds"] == pytest.approx(figures[1]["audio_seconds"]) == pytest.approx(5.0)
    for name in ("egemaps", "lib", "w2v"):
        one, two = (canonical.load_features(tmp_path / f"w{w}", name) for w in (1, 2))
        assert two.present.tolist() == [True, True, False, True, True, True]
        np.testing.assert_array_equal(one.values, two.values)
        assert figures[2]["seconds"][name] > 0


def test_every_hand_made_row_is_computed_single_threaded_in_any_process(tmp_path):
    """The cause of the worker-count difference, on any CPU: a row computed in the stage's process used its BLAS
    threads, a worker's one. Now both use one, and the stage's own threads are back afterwards."""
    from threadpoolctl import threadpool_info, threadpool_limits

    clips = [MediaItem(write_audio(tmp_path / f"c{i}.wav", tone(0.5, 150.0 + 30 * i))) for i in range(4)]
    with threadpool_limits(2):
        for workers in (1, 2):
            featurize_media(clips, {"seen": ThreadsSeen()}, tmp_path / f"w{workers}", source=["test"], progress=False,
                            workers=workers)
            seen = canonical.load_features(tmp_path / f"w{workers}", "seen").values
            assert seen.tolist() == [[1.0, 1.0]] * 4, workers
        assert max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas") == 2


def test_featurize_workers_param():
    from erc.errors import ErcDataError
    from erc.features.featurize import media_workers

    assert media_workers(3) == 3 and media_workers("auto") >= 1 and media_workers(None) == media_workers("auto")
    for bad in (0, "two", True, 1.5):
        with pytest.raises(ErcDataError, match="params.yaml: featurize.workers must be auto or an integer >= 1"):
            media_workers(bad)


def test_unknown_media_set_is_a_params_error():
    from erc.errors import ErcDataError

    with pytest.raises(ErcDataError, match=r"params.yaml: media sets \['nope'\]"):
        audio_extractors({"acoustic": {}}, ["nope"])
    with pytest.raises(ErcDataError, match="kind must be one of"):
        audio_extractors({"acoustic": {"x": {"kind": "praat"}}}, None)
