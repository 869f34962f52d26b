"""Stage 1 (MiSTER-E): fine-tune a text or speech encoder on the training split's labels, then pool its features.

A text encoder entry of `featurize.encoders` (or a speech encoder of `featurize.speech`) with a `finetune:`
block gets its features from a copy of the encoder tuned on this dataset: LoRA adapters (peft; or every weight with `method: full`) and MiSTER-E's head
(LayerNorm on the pooled state, then ReLU, dropout and a linear classifier) are trained with focal loss on the
training split only; the epoch with the best validation weighted F1 is kept; the adapters are merged into the
encoder, which then encodes every utterance (train, valid and test) like any other encoder of its kind
(`erc.features.text`, `erc.features.speech`). Speech clips are cropped to `crop_seconds` while tuning (MiSTER-E: 5 s);
the features are of the whole clip. Test labels are never read.

The training runs in Ray Train's TorchTrainer (`num_workers` workers, GPUs with `use_gpu`), each worker
taking its part of every batch under DDP; validation predictions are gathered and scored once. Rank 0
writes the features into the stage's output folder (a path every worker sees), and prints a progress line
about every tenth of an epoch. `num_workers: 0` is Ray Train's local mode: the same loop in this process.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from erc.data.canonical import Prepared
from erc.data.media import media_items
from erc.errors import ErcDataError
from erc.features.text import TextEncoderSpec, prompts
from erc.sources import DatasetFiles

LORA_TARGETS = {  # peft knows most models' attention projections; these are the ones it may not
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    **{kind: ["q_proj", "v_proj"] for kind in ("wav2vec2", "wavlm", "hubert", "data2vec-audio", "whisper",
                                                "qwen2_audio_encoder")},
}


@dataclass
class FinetuneConfig:
    """`featurize.encoders.<name>.finetune` in params.yaml (MiSTER-E's text settings are r 8, alpha 32,
    dropout 0.1, lr 1e-5, 20 epochs, focal gamma 2, on a 7B LLM; these defaults suit a small encoder)."""

    method: str = "lora"  # lora | full
    r: int = 8
    alpha: int = 32
    dropout: float = 0.1  # LoRA dropout
    target_modules: list | None = None  # None: peft's default for the model type (or LORA_TARGETS)
    head_dropout: float = 0.5
    focal_gamma: float = 2.0
    lr: float = 2e-4
    weight_decay: float = 0.01
    epochs: int = 3
    batch_size: int = 32  # utterances per optimizer step, over all workers
    max_train_utterances: int | None = None  # a random subset of the training split (a quick run)
    crop_seconds: float = 5.0  # speech: clips cut to this while tuning
    seed: int = 0
    datasets: list | None = None  # the datasets to tune on (None: every dataset featurized)
    num_workers: int = 0  # 0: Ray Train's local mode (this process); N: a worker group of N
    use_gpu: bool = False
    cpus_per_worker: float | None = None
    storage_path: str = "ray_results/stage1"

    @classmethod
    def from_params(cls, spec: dict, *, source="params.yaml") -> "FinetuneConfig":
        unknown = sorted(set(spec) - {f.name for f in fields(cls)})
        if unknown:
            raise ErcDataError(source, f"unknown finetune key(s) {unknown}")
        cfg = cls(**spec)
        if cfg.method not in ("lora", "full"):
            raise ErcDataError(source, f"finetune.method must be lora or full, not {cfg.method!r}")
        return cfg


class Classifier(nn.Module):
    """Encoder -> pooled utterance state -> LayerNorm -> ReLU -> dropout -> linear (MiSTER-E's stage-1 head)."""

    def __init__(self, encoder: nn.Module, hidden: int, classes: int, pooling: str, dropout: float):
        super().__init__()
        self.encoder, self.pooling = encoder, pooling
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, classes))

    def forward(self, inputs: dict, positions: torch.Tensor) -> torch.Tensor:
        """`inputs` for the encoder; `positions`: the (B, T) mask of its real output positions, or (B,) their
        count when the padding is at the end."""
        from erc.features.text import pool

        hidden = self.encoder(**inputs).last_hidden_state
        mask = positions if positions.dim() == 2 else \
            (torch.arange(hidden.shape[1], device=hidden.device)[None] < positions[:, None]).long()
        return self.head(pool(hidden, mask, self.pooling).float())


class TextInputs:
    """Utterance texts -> token batches; the tuned encoder's features through `erc.features.text.encode_texts`."""

    modality = "text"

    def __init__(self, config: dict, device: torch.device):
        from erc.features.text import default_pooling, load_encoder

        self.config, self.device = config, device
        self.tokenizer, self.encoder = load_encoder(config["model"], dtype=config["info"].get("dtype", "auto"),
                                                    device=str(device))
        if config["info"].get("template"):
            self.tokenizer.truncation_side = "left"  # keep the utterance at the end, as erc.features.text does
        self.pooling = default_pooling(self.encoder) if config["pooling"] == "auto" else config["pooling"]
        self.hidden = getattr(self.encoder.config, "hidden_size", None) or self.encoder.config.d_model
        self.ids = self.tokenizer(config["texts"], truncation=True, max_length=config["max_length"])["input_ids"]

    def batch(self, rows) -> tuple[dict, torch.Tensor]:
        padded = self.tokenizer.pad({"input_ids": [self.ids[i] for i in rows]}, return_tensors="pt").to(self.device)
        return ({"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]},
                padded["attention_mask"])  # the mask itself: right or left padding alike

    def write(self, tuned: nn.Module, out: Path, info: dict) -> None:
        from erc.features.text import encode_texts, feature_file

        texts = self.config["texts"]
        with feature_file(out, self.config["name"], "text", rows=len(texts), dim=self.hidden,
                          source=self.config["source"], info={**info, "pooling": self.pooling}) as fs:
            encode_texts(texts, self.tokenizer, tuned, batch_size=64, max_length=self.config["max_length"],
                         pooling=self.pooling, out=fs.values, progress=False)


class SpeechInputs:
    """Media items -> cropped 16 kHz waveforms -> the speech encoder's inputs; features through `erc.features.speech`."""

    modality = "audio"

    def __init__(self, config: dict, device: torch.device):
        from erc.data.media import MediaItem
        from erc.features.speech import SpeechEncoder

        self.config, self.device = config, device
        spec = {k: v for k, v in config["info"].items() if k in ("layer", "pooling", "chunk_seconds", "dtype")}
        self.speech = SpeechEncoder(model=config["model"], device=str(device), **spec)
        self.encoder, self.pooling = self.speech.encoder, "mean"
        self.hidden = getattr(self.encoder.config, "hidden_size", None) or self.encoder.config.d_model
        self.items = [MediaItem(Path(p), s, e) for p, s, e in config["items"]]
        self.crop = int(FinetuneConfig(**config["finetune"]).crop_seconds * 16_000)

    def batch(self, rows) -> tuple[dict, torch.Tensor]:
        import math

        from erc.features.audio import load_audio
        from erc.features.speech import WHISPER_FRAMES_PER_S

        waves = [load_audio(self.items[i])[:self.crop] for i in rows]
        samples = torch.tensor([len(w) for w in waves])
        dtype = next(self.encoder.parameters()).dtype
        if self.speech.whisper_style:  # padded to 30 s; 50 output frames per second of real audio
            inputs = self.speech.extractor(waves, sampling_rate=16_000, return_tensors="pt")
            lengths = torch.tensor([math.ceil(n / 16_000 * WHISPER_FRAMES_PER_S) for n in samples.tolist()])
            return {"input_features": inputs["input_features"].to(self.device, dtype)}, lengths.to(self.device)
        inputs = self.speech.extractor(waves, sampling_rate=16_000, padding=True, return_attention_mask=True,
                                       return_tensors="pt")
        lengths = self.encoder._get_feat_extract_output_lengths(samples)
        return ({"input_values": inputs["input_values"].to(self.device, dtype),
                 "attention_mask": inputs["attention_mask"].to(self.device)}, lengths.to(self.device))

    def write(self, tuned: nn.Module, out: Path, info: dict) -> None:
        from erc.features.featurize import featurize_media

        self.speech.encoder = tuned
        featurize_media(self.items, {self.config["name"]: self.speech}, out, source=self.config["source"],
                        specs={self.config["name"]: info}, progress=False)


INPUTS = {"text": TextInputs, "audio": SpeechInputs}


def with_adapters(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    """LoRA adapters (only they train), or the model as is for full fine-tuning."""
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules or LORA_TARGETS.get(model.config.model_type)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    return get_peft_model(model, config)


def _batches(rows: np.ndarray, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    rows = rng.permutation(rows) if rng is not None else rows
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: tune, select on validation, and (rank 0) write the features of the selected epoch."""
    import ray.train
    from ray.train.torch import get_device, prepare_model

    from erc.metrics import classification_metrics
    from erc.models.blocks import focal_loss
    from erc.training.distributed import gather

    cfg = FinetuneConfig(**config["finetune"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if ray.is_initialized():
        device = get_device()
    else:  # Ray Train's local mode: this process
        device = torch.device("cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    labels, splits = np.asarray(config["labels"]), np.asarray(config["splits"])
    inputs = INPUTS[config["modality"]](config, device)
    inputs.encoder.train()
    model = Classifier(with_adapters(inputs.encoder, cfg), inputs.hidden, config["classes"], inputs.pooling,
                       cfg.head_dropout).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ddp = prepare_model(model) if world > 1 else model
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def forward(rows, net):
        return net(*inputs.batch(rows))

    train_rows = np.flatnonzero((splits == "train") & (labels >= 0))
    if cfg.max_train_utterances and len(train_rows) > cfg.max_train_utterances:
        train_rows = np.sort(np.random.default_rng(cfg.seed).choice(train_rows, cfg.max_train_utterances, replace=False))
    valid_rows = np.flatnonzero((splits == "valid") & (labels >= 0))
    best = {"val_wf1": -1.0, "epoch": -1, "state": None}
    history, first_batch_loss = [], None  # the loss before any step, for the record
    for epoch in range(cfg.epochs):
        model.train()
        start, losses = time.perf_counter(), []
        batches = _batches(train_rows, cfg.batch_size, np.random.default_rng(cfg.seed * 1000 + epoch))
        for step, rows in enumerate(batches, 1):
            part = rows[rank::world]
            if len(part) == 0:  # a last batch smaller than the workers: every worker must still step
                part = rows[:1]
            optimizer.zero_grad()
            loss = focal_loss(forward(part, ddp), torch.as_tensor(labels[part], device=device), gamma=cfg.focal_gamma)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            first_batch_loss = losses[0] if first_batch_loss is None else first_batch_loss
            if rank == 0 and (step % max(1, len(batches) // 10) == 0 or step == len(batches)):
                seconds = time.perf_counter() - start
                print(f"stage 1 {config['name']}  epoch {epoch + 1}/{cfg.epochs}  batch {step}/{len(batches)}  "
                      f"loss {np.mean(losses[-max(1, len(batches) // 10):]):.3f}  "
                      f"~{seconds / step * (len(batches) - step):.0f} s left in the epoch", flush=True)
        model.eval()
        with torch.inference_mode():
            mine = valid_rows[rank::world]
            predicted = np.concatenate([forward(rows, model).argmax(-1).cpu().numpy()
                                        for rows in _batches(mine, 64, None)] or [np.zeros(0, int)])
        parts = gather((mine, predicted))
        rows_all = np.concatenate([p[0] for p in parts])
        pred_all = np.concatenate([p[1] for p in parts])
        scores = classification_metrics(labels[rows_all], pred_all, config["label_names"], prefix="val_")
        record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_wf1": scores["val_wf1"],
                  "val_acc": scores["val_acc"], "epoch_s": time.perf_counter() - start}
        history.append(record)
        if rank == 0:
            print(f"stage 1 {config['name']}  epoch {epoch + 1}/{cfg.epochs}  train loss {record['train_loss']:.3f}  "
                  f"val wF1 {record['val_wf1']:.2f}  best {max(record['val_wf1'], best['val_wf1']):.2f}  "
                  f"{record['epoch_s']:.0f} s", flush=True)
        if record["val_wf1"] > best["val_wf1"]:  # the first of equal ones
            best = {"val_wf1": record["val_wf1"], "epoch": epoch,
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()
                              if k.startswith("head") or "lora_" in k or cfg.method == "full"}}
        ray.train.report(record)

    if rank == 0:
        model.load_state_dict(best["state"], strict=False)
        tuned = model.encoder.merge_and_unload() if cfg.method == "lora" else model.encoder
        tuned.eval()
        # The record lives in the feature set's own JSON: a `<name>.*.json` beside it would pass for a feature set.
        record = {"history": history, "first_batch_loss": first_batch_loss, "selected_epoch": best["epoch"],
                  "selected_val_wf1": best["val_wf1"], "train_utterances": int(len(train_rows)),
                  "trainable_parameters": int(sum(p.numel() for p in trainable))}
        inputs.write(tuned, Path(config["out_dir"]), {**config["info"], "selected_epoch": best["epoch"],
                                                      "selected_val_wf1": best["val_wf1"], "stage1": record})


def finetune_and_featurize(table, labels: np.ndarray, label_names: list[str], out_dir, name: str, *, model: str,
                           cfg: FinetuneConfig, source: list[str], info: dict, texts: list[str] | None = None,
                           items: list | None = None, pooling: str = "auto", max_length: int = 128) -> dict:
    """Driver side: one TorchTrainer run over `texts` (a text encoder) or media `items` (a speech encoder);
    returns the stage-1 record (history, selected epoch)."""
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from erc.features.text import resolve_encoder
    from erc.training.cluster import scaling_config, start_ray

    out_dir = Path(out_dir).resolve()
    config = {"finetune": asdict(cfg), "modality": "text" if items is None else "audio", "texts": list(texts or []),
              "items": [(str(i.path), i.start, i.end) for i in items or []], "labels": labels.tolist(),
              "splits": table["split"].tolist(), "classes": len(label_names), "label_names": label_names,
              "model": resolve_encoder(model), "pooling": pooling, "max_length": max_length,
              "out_dir": str(out_dir), "name": name, "source": source, "info": info}
    start_ray(cfg.num_workers, cfg.use_gpu)
    cpus = cfg.cpus_per_worker or max(1, (os.cpu_count() or 1) // max(cfg.num_workers, 1))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=scaling_config(cfg.num_workers, cfg.use_gpu, cpus),
        run_config=RunConfig(name=f"stage1-{name}-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path(cfg.storage_path).resolve()) if "://" not in cfg.storage_path
                             else cfg.storage_path),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return json.loads((out_dir / f"{name}.json").read_text())["stage1"]


def finetune_dataset(dataset: str, prepared: Prepared, table_source: str, params: dict, out, *,
                     source="params.yaml"):
    """Stage 1 for every encoder of `featurize` with a `finetune:` block, on one dataset, written into `out`
    beside the featurize stage's other sets; yields the terminal lines."""
    section = params["featurize"]
    if prepared.table["text"].str.len().sum():
        for name, spec in (section.get("encoders") or {}).items():
            spec = TextEncoderSpec.from_params(spec, source=source)
            if spec.finetune is not None:
                yield from finetune_text(dataset, prepared, table_source, name, spec, out, source=source)
    media = (section.get("media") or {}).get(dataset)
    tuned = {name: spec for name, spec in (section.get("speech") or {}).items()
             if spec.get("finetune") is not None and media is not None and (media.get("sets") is None
                                                                              or name in media["sets"])}
    if tuned:
        files = DatasetFiles(params["datasets"][dataset]["files"]) if dataset in params.get("datasets", {}) else None
        items = media_items(prepared.table, media, files, source=source)
        for name, spec in tuned.items():
            yield from finetune_speech(dataset, prepared, items, name, spec, out, source=source)


def finetune_text(dataset: str, prepared: Prepared, table_source: str, name: str, spec: TextEncoderSpec, out, *,
                  source="params.yaml"):
    """Stage 1 for one text encoder on one dataset (erc.training.finetune); yields the terminal lines."""
    cfg = FinetuneConfig.from_params(spec.finetune, source=source)
    if cfg.datasets is not None and dataset not in cfg.datasets:
        yield f"{dataset} {name}: not tuned on {dataset} (finetune.datasets), skipped"
        return
    target = prepared.meta["target"]
    info = {k: v for k, v in vars(spec).items() if v is not None}
    record = finetune_and_featurize(prepared.table, prepared.table[f"{target}_id"].to_numpy(),
                                    prepared.meta[f"{target}_labels"], out, name, model=spec.model, cfg=cfg,
                                    source=[table_source], info=info,
                                    texts=prompts(prepared.table, spec.template, spec.context_turns),
                                    pooling=spec.pooling, max_length=spec.max_length)
    yield from stage1_lines(dataset, name, record)

def finetune_speech(dataset: str, prepared: Prepared, items, name: str, spec: dict, out, *, source="params.yaml"):
    """Stage 1 for one speech encoder on one dataset (erc.training.finetune); yields the terminal lines."""
    cfg = FinetuneConfig.from_params(spec["finetune"], source=source)
    if cfg.datasets is not None and dataset not in cfg.datasets:
        yield f"{dataset} {name}: not tuned on {dataset} (finetune.datasets), skipped"
        return
    target = prepared.meta["target"]
    record = finetune_and_featurize(prepared.table, prepared.table[f"{target}_id"].to_numpy(),
                                    prepared.meta[f"{target}_labels"], out, name, model=spec["model"], cfg=cfg,
                                    source=[f"media:{name}"], info={k: v for k, v in spec.items() if v is not None},
                                    items=items)
    yield from stage1_lines(dataset, name, record)

def stage1_lines(dataset: str, name: str, record: dict):
    for r in record["history"]:
        yield (f"{dataset} {name} stage 1 epoch {r['epoch']}: train loss {r['train_loss']:.4f}, "
               f"val wF1 {r['val_wf1']:.2f} ({r['epoch_s']:.0f} s)")
    yield (f"{dataset} {name}: features of the tuned encoder (epoch {record['selected_epoch']}, "
           f"val wF1 {record['selected_val_wf1']:.2f})")
