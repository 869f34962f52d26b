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

Adding a model is one file here, one line in `REGISTRY`, a `models.<name>` entry in params.yaml and its search
space (`tune.space.<name>`); docs/models.md says how.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch

# The registry, one line per model: its name (params' `models.<name>`, `pipeline.models`) -> the module that defines
# it with `@register(name)`. A model's module is imported when the model is first asked for, so a process that trains
# one model imports that model's file alone. (DVC's stages depend on erc/models as a whole: a `dvc repro` after any
# change here reruns every model's stages.)
REGISTRY = {
    "baseline": "erc.models.baseline",
    "dialoguernn": "erc.models.dialoguernn",
    "mister_e": "erc.models.mister_e",
    "mmgcn": "erc.models.mmgcn",
    "mmolre": "erc.models.mmolre",
    "mmolre_context": "erc.models.mmolre_context",
    "sdt": "erc.models.sdt",
    "summer": "erc.models.summer",
    "utterance": "erc.models.utterance",
}


class Registry(MutableMapping):
    """Model name -> class; the module of `REGISTRY` is imported on first use. A class registered from a module of
    its own (`@register` in a user's package, once imported) is found too."""

    def __init__(self):
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        if name not in self._classes and name in REGISTRY:
            importlib.import_module(REGISTRY[name])
            if name not in self._classes:
                raise ImportError(f"{REGISTRY[name]} defines no model registered as {name!r} (@register({name!r}))")
        return self._classes[name]

    def __setitem__(self, name: str, cls: type) -> None:
        self._classes[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._classes[name]

    def __contains__(self, name) -> bool:
        return name in REGISTRY or name in self._classes

    def __iter__(self):
        return iter(sorted({*REGISTRY, *self._classes}))

    def __len__(self) -> int:
        return len({*REGISTRY, *self._classes})


MODELS = Registry()


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


ADDING = """## Adding a model

1. One file, `erc/models/<name>.py`: a config dataclass on top (its defaults the paper's), then the model, an
   `nn.Module` built as `Model(config, spec)` whose `forward(batch)` returns a `ModelOutput` (per-utterance logits,
   a score where `spec.has_score`, and named loss terms), registered with `@register("<name>")`. Shared blocks and
   losses are in `erc/models/blocks.py`; the module's docstring says what follows the paper and the official code
   and every choice made (it becomes this page).
2. One line in `REGISTRY` (`erc/models/__init__.py`): `"<name>": "erc.models.<name>"`.
3. Its params: `models.<name>` (the widths to train at), its search space `tune.space.<name>` (its own loss weights;
   `tune.space.all` covers learning rate and dropout), and `<name>` in `pipeline.models`; where its official code
   has a configuration of its own, `paper.<name>.<dataset>` (run under `train.protocol: paper`, for the gap
   table). `dvc repro` then searches and trains it (and, since the stages depend on erc/models as a whole, trains
   the other models again), and the leaderboard ranks it.
4. Its tiny config in `tests/test_model_contract.py` (`TINY`, `LEARNS`) and its stored outputs
   (`python -m tests.test_model_contract`): the contract every model meets. Its own test file keeps what is
   specific to its paper. `tests/test_adding_a_model.py` does steps 1 to 3 with a toy model in a copy of the
   project and runs it through the train stage and the leaderboard."""


def models_markdown() -> str:
    """docs/models.md: every registered model's module docstring (what follows the paper, the official
    code, where they differ, and the choices made), with its config defaults."""
    import inspect
    import sys

    parts = ["# The models", "",
             "Generated from the model files' docstrings by `python -m erc.models > docs/models.md`; edit those,",
             "not this file.", "", ADDING, ""]
    for name in sorted(MODELS):
        cls = MODELS[name]
        doc = inspect.cleandoc(sys.modules[cls.__module__].__doc__ or "")
        defaults = "\n".join(f"    {f.name} = {f.default!r}" for f in dataclasses.fields(cls.Config)
                             if f.default is not dataclasses.MISSING)
        parts += [f"## `{name}` ({cls.__module__.replace('.', '/')}.py)", "", doc, "",
                  "Config defaults:", "", defaults, ""]
    return "\n".join(parts)
