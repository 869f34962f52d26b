"""benchmarks/scale.py (issue 33): its dry run end to end (every stage at both sizes, timed and measured in a process
of its own, exponents computed, the table printed, the plot written), its growth flags, and the time budget that
stops a training epoch and extrapolates it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale

from erc.models import build_model
from erc.training import distributed
from erc.training.config import TrainConfig
from erc.training.loop import train_epoch
from tests.fixtures import make_prepared, task_of

STAGES = {"prepare", "featurize", "probe", "train:baseline", "predict", "leaderboard"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    out = tmp / "scale.json"
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--dry-run", "--out", str(out), "--work",
                           str(tmp / "work")], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout, out


def test_dry_run_measures_every_stage_at_every_size(dry_run):
    report, _, _ = dry_run
    assert report["dry_run"] and report["sizes"] == [500, 2000] and report["models"] == ["baseline"]
    assert set(report["stages"]) == STAGES
    for stage, by_size in report["stages"].items():
        assert set(by_size) == {"500", "2000"}, stage
        for size, r in by_size.items():
            assert r["ok"] and r["returncode"] == 0, (stage, size, r)
            assert r["seconds"] > 0 and r["peak_rss_mb"] > 0, (stage, size, r)
            assert r["process_s"] >= r["seconds"] and r["peak_rss_mb"] >= r["base_rss_mb"] > 0, (stage, size, r)
    stages = report["stages"]
    for size in (500, 2000):
        assert stages["prepare"][str(size)]["rows"] == size
        test_rows = stages["predict"][str(size)]["rows"]
        assert 0 < test_rows < size and stages["leaderboard"][str(size)]["rows"] == test_rows
        train = stages["train:baseline"][str(size)]
        assert train["utterances_per_s"] > 0 and train["steps"] >= 1 and 0 < train["train_utterances"] < size
        assert not train["extrapolated"] and train["epoch_seconds"] == pytest.approx(train["ran_seconds"])
    assert report["matrix_mb"] == {"500": 500 * 32 * 4 / 2**20, "2000": 2000 * 32 * 4 / 2**20}


def test_dry_run_computes_the_exponents_and_prints_the_table(dry_run):
    report, stdout, out = dry_run
    stages = report["stages"]
    for stage in STAGES:
        (e,) = report["exponents"][stage]
        assert (e["from"], e["to"]) == (500, 2000)
        expected = math.log(stages[stage]["2000"]["seconds"] / stages[stage]["500"]["seconds"]) / math.log(4)
        assert e["time"] == pytest.approx(expected)
        assert math.isfinite(e["rss"])
    lines = stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    assert "500: time" in lines[head] and "2,000: time" in lines[head] and "exp t 500->2,000" in lines[head]
    rows = {line.split()[0]: line for line in lines[head + 2:head + 2 + len(STAGES)]}
    assert set(rows) == STAGES
    for stage, line in rows.items():
        assert f"{report['exponents'][stage][0]['time']:.2f}" in line and "MB" in line
    assert ("flags: none" in stdout) != any(line.startswith("flag: ") for line in lines)
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_growth_flags_superlinear_time_and_memory_beyond_the_matrix():
    def stage(t1, t2, m1, m2):
        return {"1000": {"ok": True, "seconds": t1, "peak_rss_mb": m1}, "10000": {"ok": True, "seconds": t2,
                                                                             "peak_rss_mb": m2}}

    matrix = {"1000": 1.0, "10000": 10.0}  # grows 9 MB
    results = {"linear": stage(1.0, 10.0, 300.0, 300.0 + 9 + scale.SLACK_MB),
               "quadratic": stage(1.0, 100.0, 300.0, 300.0), "copies": stage(1.0, 10.0, 300.0, 400.0)}
    exponents, flags = scale.growth(results, [1000, 10000], matrix)
    assert exponents["linear"][0]["time"] == pytest.approx(1.0) and exponents["quadratic"][0]["time"] == pytest.approx(2.0)
    assert [f.split(":")[0] for f in flags] == ["quadratic", "copies"]
    assert "n^2.00" in flags[0] and "100 MB" in flags[1] and "9 MB" in flags[1]


def test_budget_stops_the_real_epoch_and_counts_what_it_stepped(tmp_path):
    task = task_of(make_prepared(tmp_path / "tiny"))
    cfg = TrainConfig(dataset="tiny", prepared="", inputs={}, batch_size=2)
    stepper = scale.Budgeted(distributed.stepper(cfg, build_model("baseline", task.spec, {"hidden": 8}), 1,
                                                 torch.device("cpu")), seconds=0.0)
    with pytest.raises(scale.OutOfTime):
        train_epoch(stepper, task.splits["train"], cfg, 0, 0, 1)
    assert stepper.steps == 1 and 0 < stepper.utterances < task.splits["train"].num_utterances
