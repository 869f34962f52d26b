"""What a user types wrong on the command line ends in one line before anything starts, and a killed stage's leftovers
go with the next run (issue 27, items 8, 9, 10a, 12b/c): real stage programs in subprocesses, real params, a tiny
prepared dataset, a real (local-mode) training run in a real sqlite MLflow store for `erc predict`."""

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from erc.errors import ErcDataError
from erc.params import load_params
from tests.fixtures import AUDIO_DIM, INPUTS, TEXT_DIM, tiny_project

ROOT = Path(__file__).resolve().parent.parent


def run(*args, cwd=ROOT, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A params file whose dataset `tiny` is prepared under its data_dir; one seed, one epoch, local mode."""
    # a featurize stage with nothing to compute: seconds
    return tiny_project(tmp_path_factory.mktemp("cli_input"), train={"seeds": [0], "epochs": 1, "num_workers": 0},
                        featurize={"encoders": {}, "media": {}})


def isolated(project: Path, name: str) -> dict:
    """Environment of a stage run whose MLflow store and Ray folder are its own (to see that nothing was made)."""
    (project / name).mkdir(exist_ok=True)
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{project / name / 'mlflow.db'}", "RAY_TMPDIR": str(project / name / "ray")}


def one_error_line(done) -> str:
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]  # no traceback, no Ray start
    return lines[0]


# ------------------------------------------------------------------------------------- item 9: --set mistakes


@pytest.mark.parametrize("setting, message", [
    ("train.seeds=[0", "--set train.seeds: '[0' is not a YAML value (while parsing a flow sequence; expected ','"),
    ("models.baseline=5", "--set models.baseline: params hold a section here, not a value (5); set one of its keys, "
                          "e.g. --set models.baseline."),
    ("train.seeds=0", "--set train.seeds: params hold a list here, not a value (0)"),
    ("train.seeds=", "--set train.seeds: params hold a list here, not a value (None)"),
    ("models=[baseline]", "--set models: params hold a section here, not a list (['baseline'])"),
    ("train.lr.max=1", "--set train.lr.max: train.lr is a value (0.001), not a section"),
    ("trian.seeds=[0]", "--set trian.seeds: no 'trian' in params"),
    ("train.epochs", "--set 'train.epochs': not key=value"),
], ids=["unclosed-list", "section-by-number", "list-by-number", "list-by-nothing", "section-by-list",
        "value-as-section", "misspelt-section", "no-value"])
def test_bad_set_is_one_line_naming_the_key(project, setting, message):
    env = isolated(project, f"set-{abs(hash(setting))}")
    done = run("pipelines/train.py", "--dataset", "tiny", "--model", "baseline", "--set", setting,
               "--out", str(project / "set.json"), "--params", str(project / "params.yaml"), env=env)
    line = one_error_line(done)
    assert line.startswith(f"error: {project / 'params.yaml'}: {message}"), line
    assert not (project / "set.json").exists() and not Path(env["RAY_TMPDIR"]).exists()
    assert not Path(env["MLFLOW_TRACKING_URI"].removeprefix("sqlite:///")).exists()


def test_set_follows_params_sections():
    """`mmolre_context: *mmolre` makes one section of two in YAML: setting it through one name sets both, as
    `dvc exp run -S` does in the file. Keys with dots (a search space's `train.lr`) are one key."""
    params = load_params(ROOT / "params.yaml", ["models.mmolre.hidden=64",
                                                "tune.space.all.train.lr={uniform: [0.001, 0.002]}"])
    assert params["models"]["mmolre"]["hidden"] == 64
    assert params["models"]["mmolre_context"]["hidden"] == 64
    assert params["tune"]["space"]["all"]["train.lr"] == {"uniform": [0.001, 0.002]}
    assert "train" not in params["tune"]["space"]["all"]
    shipped = load_params(ROOT / "params.yaml", ["train.class_weights=[1, 2, 3]", "models.baseline={hidden: 8}",
                                                 "pipeline.probed=[]", "train.per_model.sdt.lr=0.1"])
    assert shipped["train"]["class_weights"] == [1, 2, 3] and shipped["models"]["baseline"] == {"hidden": 8}
    assert shipped["train"]["per_model"] == {"sdt": {"lr": 0.1}}


# ------------------------------------------------------------------------------- item 8: unwritable outputs


def test_unwritable_out_of_train_is_found_before_training(project):
    """The issue's case: the whole training and a registration, then a traceback at the write. Now: one line,
    before Ray, MLflow or a run."""
    env = isolated(project, "train-out")
    (project / "a_file").write_text("not a folder")
    for out, problem in [(project / "a_file" / "runs.json", f"cannot be created: {project / 'a_file'} is not a folder"),
                         (project, "is a folder: give a file path")]:
        done = run("pipelines/train.py", "--dataset", "tiny", "--model", "baseline", "--out", str(out),
                   "--params", str(project / "params.yaml"), env=env)
        assert one_error_line(done) == f"error: {out}: {problem}"
        assert not Path(env["RAY_TMPDIR"]).exists() and not (project / "train-out" / "mlflow.db").exists()


@pytest.mark.parametrize("program", ["featurize", "leaderboard", "report", "predict"])
def test_unwritable_out_of_every_program_is_one_line(project, tmp_path, program):
    (tmp_path / "a_file").write_text("not a folder")
    out = tmp_path / "a_file" / "out"
    params = str(project / "params.yaml")
    args = {"featurize": ["pipelines/featurize.py", "tiny", "--prepared", str(project / "data" / "prepared" / "tiny"),
                          "--params", params],
            "leaderboard": ["pipelines/leaderboard.py", str(tmp_path / "runs"), "--params", params],
            "report": ["pipelines/report.py", str(tmp_path / "runs"), "--leaderboard", str(tmp_path / "lb.csv"),
                       "--params", params],
            "predict": ["-m", "erc.cli", "predict", str(tmp_path / "c.csv"), "--model", "0" * 32,
                        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]}[program]
    pd.DataFrame({"speaker": ["A"], "text": ["hi"]}).to_csv(tmp_path / "c.csv", index=False)
    done = run(*args, "--out", str(out), env=isolated(tmp_path, "store"))
    culprit = out / "leaderboard.csv" if program == "leaderboard" else out
    assert one_error_line(done) == f"error: {culprit}: cannot be created: {tmp_path / 'a_file'} is not a folder"
    assert not (tmp_path / "mlflow.db").exists() and list((tmp_path / "store").iterdir()) == []


# ------------------------------------------------------------------------ item 10a: a killed featurize's folder


def test_featurize_removes_what_a_killed_run_left_and_keeps_a_live_runs(project, tmp_path):
    """kill -9 runs no clean-up: the stage's temporary folder `.<out>.<random>/` stays. The next run removes it; a
    folder that a live run holds (locked) stays, as does anything else beside the output."""
    out = tmp_path / "features" / "tiny"
    dead = out.parent / ".tiny.k9x0abcd"
    (dead / "tiny").mkdir(parents=True)
    (dead / "tiny" / "minilm.npy").write_bytes(b"half written")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    live = out.parent / ".tiny.live1234"
    (live / "tiny").mkdir(parents=True)
    os.utime(live, (old, old))
    other = out.parent / ".tiny.v2.abcdefgh"  # another output's name, not this one's temporary folder
    other.mkdir()
    os.utime(other, (old, old))
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running stage holds its folder
        done = run("pipelines/featurize.py", "tiny", "--prepared", str(project / "data" / "prepared" / "tiny"),
                   "--out", str(out), "--params", str(project / "params.yaml"))
    finally:
        os.close(fd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_dir() and not dead.exists()
    assert f"removed {dead}" in done.stdout
    assert live.is_dir() and other.is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([".tiny.live1234", ".tiny.v2.abcdefgh", "tiny"])


# ---------------------------------------------------------------------- item 12b/c: erc predict's inputs and CSV


@pytest.fixture(scope="module")
def text_audio_model(project):
    """The baseline on the fixture's text16 + audio8 sets, one epoch in local mode, in its own MLflow store."""
    from erc.training.config import TrainConfig
    from erc.training.driver import run as train

    uri = f"sqlite:///{project / 'predict' / 'mlflow.db'}"
    (project / "predict").mkdir()
    cfg = TrainConfig(dataset="tiny", prepared=str(project / "data" / "prepared" / "tiny"), feature_dirs=[],
                      inputs=dict(INPUTS), model="baseline", model_config={"hidden": 8}, epochs=1, batch_size=4,
                      storage_path=str(project / "predict" / "ray"), tracking_uri=uri, experiment="erc-cli-input")
    return {"uri": uri, "run_id": train(cfg)["run_id"]}


def conversation_with_video(path: Path) -> Path:
    rng = np.random.default_rng(0)
    vectors = lambda dim: [" ".join(f"{v:.4f}" for v in rng.normal(size=dim)) for _ in range(3)]  # noqa: E731
    pd.DataFrame({"speaker": ["A", "B", "A"], "text": ["hi, you", "well", "bye"], "text_features": vectors(TEXT_DIM),
                  "audio_features": vectors(AUDIO_DIM), "video_features": vectors(4)}).to_csv(path, index=False)
    return path


def test_predict_says_which_inputs_the_model_does_not_take_and_writes_real_csv(text_audio_model, tmp_path):
    path = conversation_with_video(tmp_path / "talk.csv")
    command = ["-m", "erc.cli", "predict", str(path), "--model", text_audio_model["run_id"],
               "--tracking-uri", text_audio_model["uri"]]
    done = run(*command, "--out", str(tmp_path / "p.csv"))
    assert done.returncode == 0, done.stderr[-3000:]
    warnings = [line for line in done.stderr.splitlines() if "video_features" in line]
    assert warnings == [f"warning: {path}: the model takes text, audio only; ignored: video_features"], done.stderr
    frame = pd.read_csv(tmp_path / "p.csv")
    assert list(frame.columns[:4]) == ["dialogue_id", "speaker", "text", "emotion"]
    assert frame["text"].tolist() == ["hi, you", "well", "bye"]  # a comma inside a field: real CSV quoting
    probabilities = frame[[c for c in frame.columns if c.startswith("p_")]]
    assert probabilities.shape == (3, 3) and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    done = run(*command, "--out", str(tmp_path / "p.json"))  # the suffix chooses JSON as --json does
    assert done.returncode == 0, done.stderr[-3000:]
    assert pd.read_json(tmp_path / "p.json")["emotion"].tolist() == frame["emotion"].tolist()
    done = run(*command, "--json", "--out", str(tmp_path / "q.csv"))
    assert one_error_line(done).startswith(f"error: {tmp_path / 'q.csv'}: --json with a .csv file")


def test_unwritable_check_creates_nothing(tmp_path):
    from erc.io import check_writable

    check_writable(tmp_path / "new" / "deeper" / "out.json")
    check_writable(tmp_path, folder=True)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ErcDataError, match="is a file: a folder is written here"):
        (tmp_path / "f").write_text("")
        check_writable(tmp_path / "f", folder=True)
