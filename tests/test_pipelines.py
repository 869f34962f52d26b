"""Stage programs on bad params: exit 1 with one line naming the params file, before any work starts."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def run_train(tmp_path, params: dict, model="baseline", dataset="meld"):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "pipelines/train.py", "--dataset", dataset, "--model", model,
                           "--out", str(tmp_path / "out.json"), "--params", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("change, model, dataset, fragment", [
    (lambda p: None, "no_such_model", "meld", "unknown model 'no_such_model'"),
    (lambda p: None, "baseline", "no_such_dataset", "no inputs.no_such_dataset entry"),
    (lambda p: p["models"]["baseline"].update(hiddn=3), "baseline", "meld", "models.baseline.hiddn: unknown key"),
    (lambda p: p["train"].update(learning_rate=3), "baseline", "meld", "train.learning_rate: unknown key"),
])
def test_train_stage_rejects_bad_params(tmp_path, change, model, dataset, fragment):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    change(params)
    result = run_train(tmp_path, params, model, dataset)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {tmp_path / 'params.yaml'}: ")
    assert fragment in lines[0]
    assert not (tmp_path / "out.json").exists()


def test_train_overrides_apply_from_general_to_specific():
    from erc.train import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(lr=0.1, per_model={"sdt": {"lr": 0.2, "per_dataset": {"iemocap": {"lr": 0.4}}}},
                           per_dataset={"iemocap": {"lr": 0.3}})
    lr = lambda dataset, model: configs_from_params(params, dataset, model, seeds=[0])[0].lr  # noqa: E731
    assert lr("meld", "baseline") == 0.1
    assert lr("meld", "sdt") == 0.2
    assert lr("iemocap", "baseline") == 0.3
    assert lr("iemocap", "sdt") == 0.4


def test_teacher_takes_one_modality_and_the_teacher_seed():
    from erc.train import configs_from_params

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (cfg,) = configs_from_params(params, "iemocap", "baseline", seeds=[7], modalities=["text"])
    assert cfg.inputs == {"text": params["inputs"]["iemocap"]["text"]} and cfg.seed == 7
