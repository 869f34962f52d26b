"""The model interface every erc model implements, and the registry that params.yaml picks from.

A model is an `nn.Module` built as `Model(config, spec)`:
- `config`: the model's own dataclass (`Model.Config`), filled from params;
- `spec`: what the data gives it (`ModelSpec`: feature dim per modality, classes, score head or not).
`forward(batch: Batch) -> ModelOutput` returns per-utterance logits (and a sentiment score where the
dataset has one) and a dict of named, already-weighted loss terms whose sum is the training loss.

Every model reads the same outputs the same way: `probabilities(out)` gives the per-utterance class
probabilities, and `gates(model, batch, out)` the weights of each of its gates or routers over named experts
(or modalities) as `Gates`; a model with gates says so with a `gates(batch, out)` method, a model without has
none. A missing modality is the batch's `modality_mask` set False; each model documents what it does then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

MODELS: dict[str, type] = {}


@dataclass
class ModelSpec:
    input_dims: dict[str, int]  # modality -> feature dim
    num_classes: int
    num_sentiment_classes: int = 0  # a second classification task (MELD sentiment), 0 = none
    has_score: bool = False  # continuous sentiment regression (MOSI)
    class_weights: list[float] | None = None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, C)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # named terms; loss = their sum
    score: torch.Tensor | None = None  # (B, T) continuous sentiment
    sentiment_logits: torch.Tensor | None = None  # (B, T, C_sentiment)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. gate weights

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())


@dataclass
class Gates:
    """One gate or router of a model: per-utterance weights over named experts (or modalities).

    weights: (B, T, E), each valid row sums to 1 (zeros for the experts a sparse router did not choose).
    valid: (B, T) bool, the utterances this gate ran on real input for (padding and, for a per-modality
    router, utterances missing that modality are out).
    top_k: the experts a sparse router keeps per utterance; None for a dense (soft) gate.
    """

    names: list[str]
    weights: torch.Tensor
    valid: torch.Tensor
    top_k: int | None = None


def probabilities(out: ModelOutput) -> torch.Tensor:
    """(B, T, C) class probabilities of the model's prediction."""
    return out.logits.float().softmax(-1)


def gates(model: torch.nn.Module, batch, out: ModelOutput) -> dict[str, Gates]:
    """The model's gates and routers on this batch by name (`{}` for a model without any)."""
    method = getattr(model, "gates", None)
    return method(batch, out) if method is not None else {}


def register(name: str):
    def add(cls):
        MODELS[name] = cls
        cls.registry_name = name
        return cls

    return add


def build_model(name: str, spec: ModelSpec, overrides: dict | None = None) -> torch.nn.Module:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(MODELS)}")
    cls = MODELS[name]
    known = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = set(overrides or {}) - known
    if unknown:
        raise KeyError(f"model {name}: unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    return cls(cls.Config(**(overrides or {})), spec)


def _register_all() -> None:
    """Import every model module in this package, so that its @register runs (one file per model)."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name != "blocks" and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


_register_all()


def models_markdown() -> str:
    """docs/models.md: every registered model's module docstring (what follows the paper, the official
    code, where they differ, and the choices made), with its config defaults."""
    import inspect
    import sys

    parts = ["# The models", "",
             "Generated from the model files' docstrings by `python -m erc.models > docs/models.md`; edit those,",
             "not this file.", ""]
    for name in sorted(MODELS):
        cls = MODELS[name]
        doc = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
        defaults = "\n".join(f"    {f.name} = {f.default!r}" for f in dataclasses.fields(cls.Config)
                             if f.default is not dataclasses.MISSING)
        parts += [f"## `{name}` ({cls.__module__.replace('.', '/')}.py)", "", doc, "",
                  "Config defaults:", "", defaults, ""]
    return "\n".join(parts)
