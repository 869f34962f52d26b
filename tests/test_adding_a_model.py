"""Adding a model as docs/models.md says, in a copy of the project: one file in erc/models/, one line in the registry,
a `models.<name>` params entry and its search space; then the train stage's program trains it over two seeds and the
leaderboard stage ranks it beside the baseline, as any registered model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.fixtures import make_prepared
from tests.import_graph import ROOT

TOY_MODEL = '''"""Toy: each utterance alone through one linear layer (a test of adding a model, not a model to use)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from erc.data.dialogues import IGNORE, Batch
from erc.models import ModelOutput, ModelSpec, register
from erc.models.blocks import cross_entropy


@dataclass
class ToyConfig:
    scale: float = 1.0
    dropout: float = 0.1  # every model has one: tune.space.all searches it


@register("toy")
class Toy(nn.Module):
    Config = ToyConfig

    def __init__(self, config: ToyConfig, spec: ModelSpec):
        super().__init__()
        self.config, self.modalities = config, sorted(spec.input_dims)
        width = sum(spec.input_dims.values())
        self.linear = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, spec.num_classes))

    def forward(self, batch: Batch) -> ModelOutput:
        x = torch.cat([batch.features[m] * batch.modality_mask[m].unsqueeze(-1) for m in self.modalities], -1)
        out = ModelOutput(logits=self.config.scale * self.linear(x))
        if (batch.labels != IGNORE).any():
            out.losses["ce"] = cross_entropy(out.logits, batch.labels)
        return out
'''


def project_with_a_toy_model(root: Path) -> Path:
    for part in ("erc", "pipelines"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "erc/models/toy.py").write_text(TOY_MODEL)  # the file
    registry = root / "erc/models/__init__.py"  # the registry line
    text = registry.read_text()
    assert '    "baseline": "erc.models.baseline",\n' in text
    registry.write_text(text.replace('    "baseline": "erc.models.baseline",\n',
                                     '    "baseline": "erc.models.baseline",\n    "toy": "erc.models.toy",\n'))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())  # the params entry and the search space
    params["models"]["toy"] = {"scale": 1.0}
    params["tune"]["space"]["toy"] = {"model.scale": {"uniform": [0.5, 2.0]}}
    params["pipeline"] = {"datasets": ["tiny"], "models": ["baseline", "toy"], "distilled": [], "probed": []}
    params["inputs"]["tiny"] = {"text": "text16", "audio": "audio8"}
    params["train"].update(seeds=[0, 1], epochs=3, patience=3, batch_size=2)
    params["data_dir"] = str(root / "data")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    make_prepared(root / "data/prepared/tiny")
    return root


def run(project: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(project), "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run([sys.executable, *argv], cwd=project, env=env, capture_output=True, text=True, timeout=600)


def test_a_new_model_trains_through_the_train_stage_and_reaches_the_leaderboard(tmp_path):
    project = project_with_a_toy_model(tmp_path / "project")
    for model in ("baseline", "toy"):
        done = run(project, "pipelines/train.py", "--dataset", "tiny", "--model", model,
                   "--out", f"runs/tuned/tiny/{model}.json")
        assert done.returncode == 0, done.stderr[-3000:]
    toy = yaml.safe_load((project / "runs/tuned/tiny/toy.json").read_text())
    assert toy["model"] == "toy" and [r["seed"] for r in toy["runs"]] == [0, 1]
    done = run(project, "pipelines/leaderboard.py", "runs/tuned", "--out", "reports")
    assert done.returncode == 0, done.stderr[-3000:]
    board = pd.read_csv(project / "reports/leaderboard.csv")
    row = board[(board["dataset"] == "tiny") & (board["model"] == "toy")].iloc[0]
    assert row["n_seeds"] == 2 and pd.notna(row["p_vs_baseline"])
    assert row["wf1_mean"] == pytest.approx(sum(r["test_wf1"] for r in toy["runs"]) / 2)
    assert "| toy |" in (project / "reports/leaderboard.md").read_text()
    # the search space is the search stage's, checked against the toy's config like any model's
    done = run(project, "-c", "import yaml; from erc.training.tune import space_for; "
                              "print(sorted(space_for(yaml.safe_load(open('params.yaml')), 'toy')))")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[-2] == "['model.dropout', 'model.scale', 'train.lr']"
