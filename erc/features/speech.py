"""Utterance vectors from self-supervised and LLM speech encoders through transformers.

Any model that `AutoModel` loads with a feature extractor (wav2vec2, WavLM, HuBERT, data2vec-audio, ...),
the encoder of a Whisper model, and the audio tower of Qwen2-Audio (where transformers has it; the whole
checkpoint is read, the language model dropped). A hub id or a local path.

`layer` picks a hidden state (-1 the last, 0 the input to the first layer: SSL models' middle layers often
carry more paralinguistics); audio longer than `chunk_seconds` is cut into chunks encoded one at a time
(Whisper-type encoders take at most 30 s); the frames of all chunks are pooled (`mean`, or `meanstd`:
mean and standard deviation concatenated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from erc.features.audio import SAMPLE_RATE
from erc.features.text import device_of, dtype_of, resolve_encoder

WHISPER_SECONDS = 30.0  # a Whisper-type encoder reads exactly 30 s of log-mel frames
WHISPER_FRAMES_PER_S = 50  # its output frames per second of audio


def _load_auto(path, dtype):
    from transformers import AutoFeatureExtractor, AutoModel

    return AutoFeatureExtractor.from_pretrained(path), AutoModel.from_pretrained(path, dtype=dtype), False


def _load_whisper(path, dtype):
    from transformers import AutoFeatureExtractor, WhisperModel

    return AutoFeatureExtractor.from_pretrained(path), WhisperModel.from_pretrained(path, dtype=dtype).get_encoder(), True


def _load_qwen2_audio(path, dtype):
    from transformers import AutoFeatureExtractor, Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(path, dtype=dtype)
    return AutoFeatureExtractor.from_pretrained(path), model.audio_tower, True


# model_type -> loader returning (feature extractor, encoder module, whisper-style 30 s input)
LOADERS = {"whisper": _load_whisper, "qwen2_audio": _load_qwen2_audio}


@dataclass
class SpeechEncoder:
    """`featurize.speech.<name>` in params.yaml."""

    model: str
    layer: int = -1
    pooling: str = "mean"  # mean | meanstd
    chunk_seconds: float = 20.0
    dtype: str = "auto"
    device: str = "auto"
    finetune: dict | None = None  # stage 1: tune on the dataset's training labels first (erc.training.finetune.FinetuneConfig)

    def __post_init__(self):
        from transformers import AutoConfig

        if self.pooling not in ("mean", "meanstd"):
            raise ValueError(f"unknown speech pooling {self.pooling!r} (mean, meanstd)")
        path = resolve_encoder(self.model)
        self._device = device_of(self.device)
        kind = AutoConfig.from_pretrained(path).model_type
        self.extractor, model, self.whisper_style = LOADERS.get(kind, _load_auto)(path, dtype_of(self.dtype, self._device))
        self.encoder = model.to(self._device).eval()
        if self.whisper_style:
            self.chunk_seconds = min(self.chunk_seconds, WHISPER_SECONDS)
        config = self.encoder.config
        hidden = getattr(config, "hidden_size", None) or config.d_model
        self.names = [f"{stat}{i}" for stat in (("mean", "std") if self.pooling == "meanstd" else ("mean",))
                      for i in range(hidden)]

    @torch.inference_mode()
    def frames(self, wave: np.ndarray) -> torch.Tensor:
        """(T, H) hidden states of layer `layer` over the whole waveform, chunk by chunk."""
        step = int(self.chunk_seconds * SAMPLE_RATE)
        out = []
        dtype = next(self.encoder.parameters()).dtype
        for start in range(0, len(wave), step):
            chunk = wave[start:start + step]
            if len(chunk) < SAMPLE_RATE // 10 and out:  # a last sliver under 0.1 s adds nothing
                break
            inputs = self.extractor(chunk, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            # a Whisper-type input is padded to 30 s: keep the frames of the real audio only
            keep = max(1, math.ceil(len(chunk) / SAMPLE_RATE * WHISPER_FRAMES_PER_S)) if self.whisper_style else None
            inputs = {k: v.to(self._device, dtype=dtype if v.is_floating_point() else v.dtype)
                      for k, v in inputs.items() if k in ("input_values", "input_features")}
            hidden = self.encoder(**inputs, output_hidden_states=True).hidden_states[self.layer][0]
            out.append(hidden[:keep].float())
        return torch.cat(out)

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        frames = self.frames(wave)
        parts = [frames.mean(0)] + ([frames.std(0, unbiased=False)] if self.pooling == "meanstd" else [])
        return torch.cat(parts).cpu().numpy().astype(np.float32)
