"""Visual utterance vectors from a video's sampled frames, through any transformers image encoder.

Frames are decoded by the ffmpeg binary inside the `imageio-ffmpeg` wheel (RGB, at the video's size), `frames`
of them taken evenly over the clip; each goes through the image processor and the model (ViT, CLIP's or
SigLIP's vision tower, DINOv2, ...), giving its pooled output (or the mean of its last hidden states), and the
frame vectors are averaged. A video that cannot be decoded or has no frame is a `MediaError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erc.features.audio import MediaError
from erc.features.text import device_of, dtype_of, resolve_encoder


def sample_frames(path, count: int) -> list[np.ndarray]:
    """`count` RGB frames (H, W, 3) spread evenly over the video (all of them when it has fewer)."""
    import imageio_ffmpeg

    path = Path(path)
    if not path.is_file():
        raise MediaError(path, "missing media file")
    try:
        reader = imageio_ffmpeg.read_frames(str(path))
        meta = next(reader)
        width, height = meta["size"]
        frames = [np.frombuffer(f, dtype=np.uint8).reshape(height, width, 3) for f in reader]
    except (RuntimeError, OSError, StopIteration, KeyError) as e:
        raise MediaError(path, f"undecodable video ({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__})") from None
    if not frames:
        raise MediaError(path, "no video frames")
    keep = np.unique(np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int))
    return [frames[i] for i in keep]


@dataclass
class FrameEncoder:
    """`featurize.visual.<name>` in params.yaml."""

    model: str
    frames: int = 8
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        path = resolve_encoder(self.model)
        self._device = device_of(self.device)
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype_of(self.dtype, self._device))
        self.encoder = (model.vision_model if hasattr(model, "vision_model") else model).to(self._device).eval()
        self.processor = AutoImageProcessor.from_pretrained(path)
        vision = getattr(config, "vision_config", config)
        self.names = [f"frame_mean{i}" for i in range(vision.hidden_size)]

    @torch.inference_mode()
    def __call__(self, path) -> np.ndarray:
        frames = sample_frames(path, self.frames)
        inputs = self.processor(images=frames, return_tensors="pt")["pixel_values"]
        out = self.encoder(pixel_values=inputs.to(self._device, dtype=next(self.encoder.parameters()).dtype))
        pooled = out.pooler_output if getattr(out, "pooler_output", None) is not None else out.last_hidden_state.mean(1)
        return pooled.float().mean(0).cpu().numpy()
