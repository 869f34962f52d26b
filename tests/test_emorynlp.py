"""EmoryNLP on the leaderboard: params' `datasets.emorynlp` entry of the generic conversation adapter over the real
mirrored files (ERC_DATA_MIRROR, default ../shared/data; skipped without it).

The counts are recomputed from the raw CSVs here, so the test checks the entry's mapping (a scene = Season +
Episode + Scene_ID, the official splits, the seven labels), not a copy of the adapter's own output.
"""

import ast
import collections
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from erc.data import build_dataset
from erc.data.canonical import save

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("ERC_DATA_MIRROR") or ROOT.parent / "shared" / "data").resolve()
FILES = MIRROR / "declare-lab/MELD/2d2011b409d3ca2d7e94460cd007d434b1d0a102/data/emorynlp"
needs_mirror = pytest.mark.skipif(not (FILES / "emorynlp_test_final.csv").is_file(),
                                  reason=f"no EmoryNLP files in the data mirror at {MIRROR} (set ERC_DATA_MIRROR)")
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SPLIT_FILES = {"train": "train", "valid": "dev", "test": "test"}
LABELS = ["neutral", "joyful", "peaceful", "powerful", "scared", "mad", "sad"]  # as the corpus lists them


def raw_rows(split: str) -> list[dict]:
    with open(FILES / f"emorynlp_{SPLIT_FILES[split]}_final.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def emorynlp(tmp_path_factory):
    os.environ["ERC_DATA_MIRROR"] = str(MIRROR)
    prep, dialogues = build_dataset(PARAMS, "emorynlp", cache=tmp_path_factory.mktemp("cache"))
    save(prep, tmp_path_factory.mktemp("prepared") / "emorynlp", expected_dialogues=dialogues)  # the canonical checks
    return prep


def test_emorynlp_is_a_text_only_pipeline_dataset_on_the_shared_encoder():
    """In the list every stage iterates over, fed by the MiniLM feature set the other datasets' text uses: its
    featurize stage needs no new encoder."""
    assert "emorynlp" in PARAMS["pipeline"]["datasets"]
    assert PARAMS["datasets"]["emorynlp"]["adapter"] == "conversations"
    assert PARAMS["inputs"]["emorynlp"] == {"text": "minilm"}
    assert {PARAMS["inputs"][d]["text"] for d in PARAMS["pipeline"]["datasets"]} == {"minilm"}
    assert "minilm" in PARAMS["featurize"]["encoders"]
    assert "emorynlp" not in PARAMS["featurize"]["media"]


@needs_mirror
def test_emorynlp_official_splits_scenes_and_labels(emorynlp):
    t = emorynlp.table
    assert emorynlp.meta["emotion_labels"] == LABELS
    assert emorynlp.meta["target"] == "emotion" and emorynlp.meta["sentiment_labels"] == []
    assert emorynlp.features == {} and emorynlp.media is None  # text only
    assert len(t) == 9489 and t["dialogue_id"].nunique() == 827
    for split in SPLIT_FILES:
        rows, part = raw_rows(split), t[t["split"] == split]
        scenes = {f"s{r['Season']}_e{r['Episode']}_c{r['Scene_ID']}" for r in rows}
        assert set(part["dialogue_id"]) == scenes, split
        assert len(part) == len(rows), split
        raw = collections.Counter(r["Emotion"].casefold() for r in rows)
        assert part["emotion"].value_counts().to_dict() == raw, split
        assert (part["emotion_id"] == part["emotion"].map(LABELS.index)).all()
    assert [len(set(t.loc[t["split"] == s, "dialogue_id"])) for s in SPLIT_FILES] == [659, 89, 79]


@needs_mirror
def test_emorynlp_scene_order_turns_and_speakers(emorynlp):
    """A scene is ordered by Utterance_ID, whose gaps leave the turn a rank; a speaker list joins its names."""
    t = emorynlp.table.set_index("utterance_id")
    scene = emorynlp.table[emorynlp.table["dialogue_id"] == "s1_e2_c2"]
    assert scene["utterance_id"].tolist()[:9] == [f"s1_e2_c2_utt{u}" for u in (1, 2, 3, 4, 5, 6, 8, 9, 12)]
    assert scene["turn"].tolist() == list(range(len(scene)))
    first = t.loc["s1_e2_c1_utt1"]
    assert (first["split"], first["turn"], first["speaker"], first["emotion"]) == ("train", 0, "Monica Geller", "joyful")
    assert first["text"].startswith("What you guys don't understand is")
    several = [r for s in SPLIT_FILES for r in raw_rows(s) if r["Speaker"].count("'") > 2]
    assert several, "the files have utterances spoken by several people"
    r = several[0]
    names = ast.literal_eval(r["Speaker"])
    assert t.loc[f"s{r['Season']}_e{r['Episode']}_c{r['Scene_ID']}_utt{r['Utterance_ID']}", "speaker"] == ", ".join(names)


@needs_mirror
def test_check_data_on_emorynlp_prints_the_counts():
    env = {**os.environ, "ERC_DATA_MIRROR": str(MIRROR)}
    run = subprocess.run([sys.executable, "-m", "erc", "check-data", "emorynlp", "--dialogues", "1"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "emorynlp: 9489 utterances in 827 dialogues; target emotion" in out
    for line in ("train: 659 dialogues, 7551 utterances", "valid: 89 dialogues, 954 utterances",
                 "test: 79 dialogues, 984 utterances"):
        assert line in out
    assert "warning" not in out  # every label is in train
