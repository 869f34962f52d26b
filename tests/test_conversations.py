"""The generic conversation adapter (erc.data.conversations), `erc check-data`, and docs/datasets.md's example.

Every corpus is a few rows written into tmp_path in the format under test. Bad input must end in one line
`<file>: row <n>, column <name>: <problem>`, and the prepare stage must leave nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from erc.data import build_dataset, canonical, conversations
from erc.data.conversations import DataProblems
from erc.errors import ErcDataError
from erc.sources import DatasetFiles

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "datasets.md").read_text()


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus(tmp_path: Path, **files: str | bytes | pd.DataFrame) -> dict:
    """Write `name.ext=content` files into tmp_path; returns the params `files` entries, keyed by the split (or
    `all`) before the first dot of the name."""
    entries = {}
    for name, content in files.items():
        split, ext = name.split("_", 1)
        path = tmp_path / f"{split}.{ext}"
        if isinstance(content, pd.DataFrame):
            content.to_parquet(path, index=False)
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode())
        entries[split] = {"path": str(path), "sha256": sha(path)}
    return entries


def build(entries: dict, **options) -> canonical.Prepared:
    prepared, dialogues = conversations.build(DatasetFiles(entries), options)
    canonical.validate(prepared, where="test", expected_dialogues=dialogues)
    return prepared


COLUMNS = {"dialogue": "dia", "turn": "t", "speaker": "who", "text": "text", "emotion": "emo"}
HEADER = "dia,t,who,text,emo\n"
TRAIN = HEADER + "2,0,Ann,Hi there,joy\n2,1,Bob,Go away,anger\n10,0,Ann,Fine,neutral\n1,5,Cy,Later,neutral\n1,2,Cy,Now,joy\n"
TEST = HEADER + "7,0,Bob,Ok,neutral\n7,1,Ann,Great!,joy\n"


def one_line(error: ErcDataError, path, fragment: str) -> str:
    message = str(error)
    assert "\n" not in message and message.startswith(f"{path}: "), message
    assert fragment in message, message
    return message


# ----------------------------------------------------------------------------------------------- options


def test_csv_per_split_order_turns_ids_and_labels_from_train(tmp_path):
    files = corpus(tmp_path, train_csv="\ufeff" + TRAIN, valid_csv=HEADER + "3,0,Di,Hm,joy\n", test_csv=TEST)
    prep = build(files, columns=COLUMNS)  # the train file starts with a byte-order mark, as spreadsheets write
    t = prep.table
    # Dialogues by key as numbers (1, 2, 10), turns by the turn column (5 after 2), made ids <dialogue>_<turn>.
    assert t["utterance_id"].tolist() == ["1_0", "1_1", "2_0", "2_1", "10_0", "3_0", "7_0", "7_1"]
    assert t["text"].tolist()[:2] == ["Now", "Later"]
    assert t["split"].tolist() == ["train"] * 5 + ["valid"] + ["test"] * 2
    assert prep.meta["emotion_labels"] == ["anger", "joy", "neutral"]  # the labels of train, sorted
    assert prep.meta["sentiment_labels"] == [] and prep.meta["target"] == "emotion"
    assert "emotion labels: those seen in train, sorted" in prep.meta["notes"]


def test_validation_carved_from_train_by_dialogue_deterministically(tmp_path):
    rows = "".join(f"{d},{k},A,text {d} {k},{('joy', 'neutral')[k % 2]}\n" for d in range(100, 140) for k in range(3))
    files = corpus(tmp_path, train_csv=HEADER + rows, test_csv=TEST)
    first = build(files, columns=COLUMNS, valid_from_train={"fraction": 0.25, "seed": 3})
    valid = set(first.table.loc[first.table["split"] == "valid", "dialogue_id"])
    assert len(valid) == 10
    assert first.table.groupby("dialogue_id")["split"].nunique().max() == 1  # whole dialogues move
    shuffled = HEADER + "".join(reversed(rows.splitlines(keepends=True)))
    (tmp_path / "shuffled").mkdir()
    again = build(corpus(tmp_path / "shuffled", train_csv=shuffled, test_csv=TEST), columns=COLUMNS,
                  valid_from_train={"fraction": 0.25, "seed": 3})
    assert set(again.table.loc[again.table["split"] == "valid", "dialogue_id"]) == valid  # file order is irrelevant
    other = build(files, columns=COLUMNS, valid_from_train={"fraction": 0.25, "seed": 4})
    assert set(other.table.loc[other.table["split"] == "valid", "dialogue_id"]) != valid
    assert list(first.table["split"].drop_duplicates()) == ["train", "valid", "test"]


def test_tsv_three_column_key_list_speakers_and_label_map(tmp_path):
    rows = ["s\te\tsc\tseq\tspk\tline\tfeel",
            "1\t2\t3\t0\t['Monica Geller']\tHi\tJoyful",
            "1\t2\t3\t1\t['Ross Geller', 'Rachel Green']\tHey\tMAD",
            "1\t2\t4\t0\t['Monica Geller']\tBye\tpeaceful"]
    files = corpus(tmp_path, train_tsv="\n".join(rows) + "\n", test_tsv="\n".join(rows[:1] + [
        "2\t1\t1\t0\t['Joey']\tHow you doin\tjoyful"]) + "\n")
    prep = build(files, columns={"dialogue": ["s", "e", "sc"], "turn": "seq", "speaker": "spk", "text": "line",
                                 "emotion": "feel"},
                 labels={"emotion": ["neutral", "joy", "anger"]},
                 label_map={"emotion": {"joyful": "joy", "Mad": "anger", "peaceful": "neutral"}},
                 valid_from_train={"fraction": 0.5})
    t = prep.table
    split_of = t.groupby("dialogue_id")["split"].first().to_dict()  # one of the two train dialogues is carved
    assert sorted(split_of.items()) == [("1_2_3", split_of["1_2_3"]), ("1_2_4", split_of["1_2_4"]), ("2_1_1", "test")]
    assert {split_of["1_2_3"], split_of["1_2_4"]} == {"train", "valid"}
    assert t.set_index("utterance_id")["speaker"].to_dict()["1_2_3_1"] == "Ross Geller, Rachel Green"
    assert t.set_index("utterance_id")["speaker"].to_dict()["1_2_3_0"] == "Monica Geller"
    assert t.set_index("utterance_id")["emotion"].to_dict() == {"1_2_3_0": "joy", "1_2_3_1": "anger",
                                                               "1_2_4_0": "neutral", "2_1_1_0": "joy"}
    assert prep.meta["emotion_labels"] == ["neutral", "joy", "anger"]


def test_case_sensitive_labels_refuse_other_spellings(tmp_path):
    files = corpus(tmp_path, train_csv=HEADER + "1,0,A,x,Joy\n1,1,A,y,joy\n", test_csv=TEST)
    with pytest.raises(DataProblems) as e:
        build(files, columns=COLUMNS, case_sensitive=True, labels={"emotion": ["joy", "neutral"]})
    one_line(e.value, files["train"]["path"], "row 2, column emo: emotion label 'Joy': it is not one of")


def test_jsonl_flat_file_order_and_made_ids(tmp_path):
    lines = [{"conv": "a", "speaker": ["Ann"], "utt": "Hi", "label": 2},
             {"conv": "a", "speaker": ["Bob", "Cy"], "utt": "Yo", "label": 0},
             {"conv": "b", "speaker": "Ann", "utt": "Bye", "label": 2}]
    test = [{"conv": "c", "speaker": "Bob", "utt": "Ok", "label": 0}]
    files = corpus(tmp_path, train_jsonl="\n".join(map(json.dumps, lines)) + "\n\n",
                   test_jsonl=json.dumps(test[0]) + "\n")
    prep = build(files, columns={"dialogue": "conv", "speaker": "speaker", "text": "utt", "emotion": "label"},
                 labels={"emotion": ["neutral", "joy"]}, label_map={"emotion": {"0": "neutral", "2": "joy"}},
                 ids={"utterance": "{dialogue_id}-{turn}-{split}"}, valid_from_train={"fraction": 0.5, "seed": 1})
    t = prep.table.set_index("text")
    assert t.loc["Yo", "turn"] == 1 and t.loc["Yo", "speaker"] == "Bob, Cy"  # file order, a real list
    assert t.loc["Hi", "emotion"] == "joy" and t.loc["Yo", "emotion"] == "neutral"  # numeric labels mapped
    assert t.loc["Ok", "utterance_id"] == "c-0-test"


def test_jsonl_nested_dialogues(tmp_path):
    dialogue = {"id": "d1", "topic": "x", "turns": [{"who": "A", "say": "Hi", "emotion": "joy"},
                                                   {"who": "B", "say": "Hey", "emotion": "neutral"}]}
    files = corpus(tmp_path, train_jsonl=json.dumps(dialogue) + "\n" + json.dumps({**dialogue, "id": "d2"}) + "\n",
                   test_jsonl=json.dumps({**dialogue, "id": "d3"}) + "\n")
    prep = build(files, utterances_field="turns", valid_from_train={"fraction": 0.5},
                 columns={"dialogue": "id", "speaker": "who", "text": "say", "emotion": "emotion"},
                 ids={"dialogue": "{topic}-{id}"})
    assert set(prep.table["dialogue_id"]) == {"x-d1", "x-d2", "x-d3"}
    assert prep.table.groupby("dialogue_id").size().tolist() == [2, 2, 2]


def test_parquet_one_file_with_a_split_column_score_and_sentiment_target(tmp_path):
    df = pd.DataFrame({"call": [1, 1, 2, 2, 3], "part": ["TR", "TR", "DEV", "DEV", "TE"],
                       "agent": [["Agent 7"], ["Customer"], ["Agent 7"], ["Customer"], ["Agent 2"]],
                       "text": ["Hello", "My bill is wrong", "Sorry", "Thanks", "Bye"],
                       "score": [0.5, -1.5, 0.0, 2.0, -0.1]})
    files = corpus(tmp_path, all_parquet=df)
    prep = build(files, columns={"dialogue": "call", "speaker": "agent", "text": "text", "sentiment_score": "score"},
                 split_column="part", split_values={"train": "TR", "valid": ["DEV", "VAL"], "test": "TE"})
    t = prep.table
    assert t["split"].tolist() == ["train", "train", "valid", "valid", "test"]
    assert t["sentiment"].tolist() == ["positive", "negative", "positive", "positive", "negative"]  # score >= 0
    assert t["sentiment_score"].tolist() == pytest.approx([0.5, -1.5, 0.0, 2.0, -0.1])
    assert prep.meta["target"] == "sentiment" and prep.meta["has_sentiment_score"] is True
    assert prep.meta["sentiment_labels"] == ["negative", "positive"] and t["speaker"].iloc[1] == "Customer"


def test_utterance_id_column_scope_split_templates_and_text_repair(tmp_path):
    head = "Dialogue_ID,Utterance_ID,uid,text,emo\n"
    files = corpus(tmp_path, train_csv=head.encode() + b"0,0,u1,It\x92s fine,joy\n",  # a raw cp1252 byte
                   valid_csv=head + "0,0,u2,What\u00e2\u20ac\u2122s up,joy\n", test_csv=head + "0,3,u3,Ok,joy\n")
    prep = build(files, columns={"dialogue": "Dialogue_ID", "turn": "Utterance_ID", "utterance": "uid", "text": "text",
                                 "emotion": "emo"}, dialogue_scope="split", ids={"dialogue": "{split}_dia{Dialogue_ID}"})
    t = prep.table
    assert t["dialogue_id"].tolist() == ["train_dia0", "valid_dia0", "test_dia0"]  # dialogue 0 in every split
    assert t["utterance_id"].tolist() == ["u1", "u2", "u3"] and t["turn"].tolist() == [0, 0, 0]
    assert t["text"].tolist()[:2] == ["It\u2019s fine", "What\u2019s up"]
    unrepaired = build(files, columns={"dialogue": "Dialogue_ID", "text": "text", "emotion": "emo"},
                       dialogue_scope="split", repair_text=False)
    assert unrepaired.table["text"].iloc[1] == "What\u00e2\u20ac\u2122s up"
    assert unrepaired.table["dialogue_id"].tolist() == ["train_0", "valid_0", "test_0"]


def test_media_paths_are_checked_and_saved_beside_the_table(tmp_path):
    (tmp_path / "wav").mkdir()
    for name in ("a.wav", "b.wav", "c.wav"):
        (tmp_path / "wav" / name).write_bytes(b"RIFF")
    head = "dia,text,emo,audio\n"
    files = corpus(tmp_path, train_csv=head + "1,Hi,joy,wav/a.wav\n1,Yo,joy,wav/b.wav\n",
                   valid_csv=head + "2,Hm,joy,wav/c.wav\n", test_csv=head + "3,Ok,joy,wav/a.wav\n")
    options = {"columns": {"dialogue": "dia", "text": "text", "emotion": "emo", "media": {"audio": "audio"}}}
    prep, dialogues = conversations.build(DatasetFiles(files), options)
    canonical.save(prep, tmp_path / "out", expected_dialogues=dialogues)
    media = pd.read_parquet(tmp_path / "out" / "media.parquet")
    assert media["utterance_id"].tolist() == prep.table["utterance_id"].tolist()
    assert media["audio"].tolist() == [str(tmp_path / "wav" / n) for n in ("a.wav", "b.wav", "c.wav", "a.wav")]
    (tmp_path / "wav" / "b.wav").unlink()
    with pytest.raises(DataProblems) as e:
        conversations.build(DatasetFiles(files), options)
    one_line(e.value, files["train"]["path"], "row 3, column audio: audio file")


# ----------------------------------------------------------------------------------------------- bad input

def _missing_column(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN.replace("emo\n", "feeling\n", 1), test_csv=TEST)
    return files, "train", "missing column 'emo' (options.columns.emotion); the file has"


def _unmapped_label(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN, test_csv=TEST.replace("7,1,Ann,Great!,joy", "7,1,Ann,Great!,happy"))
    return files, "test", "row 3, column emo: emotion label 'happy': it is not one of ['anger', 'joy', 'neutral'] " \
                          "(the labels seen in train) and has no options.label_map.emotion entry"


def _duplicate_turns(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN + "2,1,Ann,Again,joy\n", test_csv=TEST)
    return files, "train", "row 7, column t: duplicate turn '1' in dialogue 2 (also row 3)"


def _dialogue_in_two_splits(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN, test_csv=TEST + "10,5,Ann,Leak,joy\n")
    return files, "test", "row 4, column dia: dialogue 10 is in train"


def _text_not_text(tmp_path):
    lines = [{"dia": 1, "text": "Hi", "emo": "joy"}, {"dia": 1, "text": 42, "emo": "joy"}]
    files = corpus(tmp_path, train_jsonl="\n".join(map(json.dumps, lines)),
                   test_jsonl=json.dumps({"dia": 2, "text": "Ok", "emo": "joy"}))
    return files, "train", "row 2, column text: text is not text: int 42"


def _empty_text(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN.replace("Go away", "  "), test_csv=TEST)
    return files, "train", "row 3, column text: empty text"


def _empty_dialogue(tmp_path):
    lines = [{"id": "d1", "turns": [{"text": "Hi", "emo": "joy"}]}, {"id": "d2", "turns": []}]
    files = corpus(tmp_path, train_jsonl="\n".join(map(json.dumps, lines)),
                   test_jsonl=json.dumps({"id": "d3", "turns": [{"text": "Ok", "emo": "joy"}]}))
    return files, "train", "row 2, column turns: empty dialogue: no utterances"


def _turn_not_a_number(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN.replace("2,1,Bob", "2,x1,Bob") + "5,?,Ann,Alone,joy\n", test_csv=TEST)
    return files, "train", "row 3, column t: turn 'x1' is not a number (1 more"  # and dialogue 5's only turn


BAD = {"missing-column": _missing_column, "unmapped-label": _unmapped_label, "duplicate-turns": _duplicate_turns,
       "dialogue-in-two-splits": _dialogue_in_two_splits, "text-not-text": _text_not_text, "empty-text": _empty_text,
       "empty-dialogue": _empty_dialogue, "turn-not-a-number": _turn_not_a_number}


def options_for(files) -> dict:
    columns = dict(COLUMNS)
    if files["train"]["path"].endswith(".jsonl"):
        columns = {"dialogue": "id" if "turns" in Path(files["train"]["path"]).read_text() else "dia",
                   "text": "text", "emotion": "emo"}
        if columns["dialogue"] == "id":
            return {"columns": columns, "utterances_field": "turns"}
    return {"columns": columns}


@pytest.mark.parametrize("make", BAD.values(), ids=BAD.keys())
def test_bad_input_is_one_line_naming_file_row_and_column(tmp_path, make):
    files, culprit, fragment = make(tmp_path)
    with pytest.raises(ErcDataError) as e:
        conversations.build(DatasetFiles(files), options_for(files))
    one_line(e.value, files[culprit]["path"], fragment)


def test_every_problem_is_kept_and_the_message_says_how_many(tmp_path):
    bad = TRAIN.replace("Go away", "").replace("2,0,Ann", "2,x,Ann") + "1,2,Cy,Again,sad\n"
    files = corpus(tmp_path, train_csv=bad, test_csv=TEST)
    with pytest.raises(DataProblems) as e:
        conversations.build(DatasetFiles(files), {"columns": COLUMNS, "labels": {"emotion": ["joy", "anger", "neutral"]}})
    problems = [str(p) for p in e.value.problems]
    assert len(problems) == 4, problems
    assert str(e.value).endswith("(3 more: `erc check-data` lists them)")
    assert any("column t: turn 'x'" in p for p in problems) and any("empty text" in p for p in problems)
    assert any("duplicate turn '2'" in p for p in problems) and any("label 'sad'" in p for p in problems)


@pytest.mark.parametrize("options, key", [
    ({"columns": {"dialogue": "dia", "txt": "text", "emotion": "emo"}}, "columns.text: missing"),
    ({"columns": {**COLUMNS, "txt": "x"}}, "columns.txt: unknown key"),
    ({"columns": COLUMNS, "format": "xlsx"}, "format: input should be"),
    ({"columns": COLUMNS, "valid_from_train": {"fraction": 1.5}}, "valid_from_train.fraction: input should be less"),
    ({"columns": {"dialogue": "dia", "text": "text"}}, "columns: no label column"),
    ({"columns": COLUMNS, "ids": {"dialogue": "{nope}"}}, "ids.dialogue: template '{nope}' cannot be filled"),
])
def test_bad_options_name_the_params_key(tmp_path, options, key):
    files = corpus(tmp_path, train_csv=TRAIN, test_csv=TEST)
    params = {"datasets": {"talk": {"adapter": "conversations", "files": files, "options": options}}}
    with pytest.raises(ErcDataError) as e:
        build_dataset(params, "talk", source="p.yaml")
    one_line(e.value, "p.yaml", f"datasets.talk.options.{key}")


def test_train_and_test_are_needed(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN, test_csv=HEADER)
    with pytest.raises(ErcDataError) as e:
        conversations.build(DatasetFiles(files), {"columns": COLUMNS})
    one_line(e.value, files["test"]["path"], "no test utterances")
    params = {"datasets": {"talk": {"adapter": "conversations", "files": {"train": files["train"]},
                                    "options": {"columns": COLUMNS}}}}
    with pytest.raises(ErcDataError) as e:
        build_dataset(params, "talk", source="p.yaml")
    one_line(e.value, "p.yaml", "datasets.talk.files.test: missing (train and test are needed")


def test_files_need_their_sha256_and_split_names(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN, test_csv=TEST)
    digest = files["train"].pop("sha256")
    with pytest.raises(ErcDataError) as e:
        conversations.build(DatasetFiles(files), {"columns": COLUMNS})
    one_line(e.value, files["train"]["path"], f"no sha256 in its files entry: add `sha256: {digest}`")
    files["train"]["sha256"] = "0" * 64
    with pytest.raises(ErcDataError, match="checksum mismatch"):
        conversations.build(DatasetFiles(files), {"columns": COLUMNS})
    files["train"]["sha256"], files["test"] = digest, {"sha256": digest}
    params = {"datasets": {"talk": {"adapter": "conversations", "files": files, "options": {"columns": COLUMNS}}}}
    with pytest.raises(ErcDataError) as e:
        build_dataset(params, "talk", source="p.yaml")
    one_line(e.value, "p.yaml", "datasets.talk.files.test: an entry is {url, sha256} or {path, sha256}")
    files["test"] = files["train"]
    files["dev"] = files["train"]
    params = {"datasets": {"talk": {"adapter": "conversations", "files": files, "options": {"columns": COLUMNS}}}}
    with pytest.raises(ErcDataError) as e:
        build_dataset(params, "talk", source="p.yaml")
    one_line(e.value, "p.yaml", "datasets.talk.files.dev: not a split name")


# ----------------------------------------------------------------------------------------------- stage, check-data, docs


def run(cwd: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def params_file(tmp_path: Path, name: str, entry: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"datasets": {name: entry}}))
    return path


def test_prepare_stage_and_check_data_on_bad_input_write_nothing(tmp_path):
    files = corpus(tmp_path, train_csv=TRAIN + "2,1,Ann,Again,joy\n", test_csv=TEST.replace("Ok", ""))
    params = params_file(tmp_path, "talk", {"adapter": "conversations", "files": files, "options": {"columns": COLUMNS}})
    stage = run(tmp_path, str(ROOT / "pipelines" / "prepare.py"), "talk", "--out", "out/talk", "--params", str(params))
    assert stage.returncode == 1 and stage.stderr.count("\n") == 1, stage.stderr
    assert stage.stderr.startswith(f"error: {files['train']['path']}: row 7, column t: duplicate turn")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    check = run(tmp_path, "-m", "erc", "check-data", "talk", "--params", str(params))
    assert check.returncode == 1
    assert check.stderr.splitlines() == [
        "talk: 2 problem(s); nothing was written",
        f"error: {files['train']['path']}: row 7, column t: duplicate turn '1' in dialogue 2 (also row 3)",
        f"error: {files['test']['path']}: row 2, column text: empty text"], check.stderr


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC, flags=re.S)


def worked_example(folder: Path) -> dict:
    """docs/datasets.md's example run as written: its script makes the corpus in `folder`; returns its params
    entries with the real checksums in place of the placeholders."""
    subprocess.run([sys.executable, "-c", doc_blocks("python")[0]], cwd=folder, check=True, timeout=60)
    text = doc_blocks("yaml")[0]
    for split in ("train", "test"):
        text = text.replace(f"{split.upper()}_SHA256", sha(folder / "corpus" / f"friends_{split}.tsv"))
    return yaml.safe_load(text)


def test_docs_worked_example_checks_clean(tmp_path, monkeypatch):
    entries = worked_example(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(entries))
    check = run(tmp_path, "-m", "erc", "check-data", "friends", "--dialogues", "1")
    assert check.returncode == 0, check.stderr
    out = check.stdout
    assert "emotion: ['neutral', 'joy', 'anger', 'fear', 'sadness']" in out
    assert re.search(r"valid: [1-9]\d* dialogues", out) and "problems: none" in out
    assert "1_1_1 (train" in out and "['" not in out.split("first dialogues")[1]  # list speakers read as names
    monkeypatch.chdir(tmp_path)  # the entry's paths are relative to the project root, here tmp_path
    prepared, dialogues = build_dataset(entries, "friends")
    assert prepared.meta["dataset"] == "friends" and len(dialogues) == 32


@pytest.mark.slow
def test_a_new_corpus_is_a_params_entry_through_dvc_repro(tmp_path):
    """docs/datasets.md's corpus (TSV, list speakers, a three-column dialogue key, mapped labels, no validation
    file) added to a fresh clone by editing params.yaml alone; `dvc repro` runs it through the leaderboard."""
    clone = tmp_path / "erc"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    subprocess.run(["git", "checkout", "-q", head.strip()], cwd=clone, check=True)
    home = tmp_path / "corpus_home"
    home.mkdir()
    example = worked_example(home)
    entry = example["datasets"]["friends"]
    for file in entry["files"].values():
        file["path"] = str(home / file["path"])
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["inputs"]["friends"] = example["inputs"]["friends"]
    # Only the new corpus, one seed, two epochs, and one model of each kind (a plain one, a distilled one: the others
    # are the same stage templates): the three built-in datasets need the data mirror and an hour.
    params["pipeline"].update(datasets=["friends"], models=["baseline"], distilled=["summer"], probed=[])
    params["datasets"] = {"friends": entry}
    params["train"].update(seeds=[0], epochs=2, patience=1)
    params["tune"].update(trials=2, epochs=2, grace_period=1)  # the searches `dvc repro` runs first: short ones
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    assert changed.split() == ["M", "params.yaml"]

    env = {**os.environ, "PYTHONPATH": str(clone), "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, timeout=1800)
    board = pd.read_csv(clone / "reports" / "leaderboard.csv")
    models = params["pipeline"]["models"] + params["pipeline"]["distilled"]
    assert set(board["dataset"]) == {"friends"} and sorted(board["model"]) == sorted(models)
    assert board["wf1_mean"].between(0, 100).all()
    prepared = canonical.load(clone / "data" / "prepared" / "friends")
    assert set(prepared.table["split"]) == {"train", "valid", "test"}  # validation carved from train
    assert prepared.meta["emotion_labels"] == ["neutral", "joy", "anger", "fear", "sadness"]
    again = subprocess.run(["dvc", "repro"], cwd=clone, env=env, check=True, capture_output=True, text=True)
    assert "Running stage" not in again.stdout
    # featurize run again writes the same features (its timings, which differ, go to a metrics file apart from them):
    # nothing downstream of it is out of date
    subprocess.run(["dvc", "repro", "-f", "-s", "featurize@friends"], cwd=clone, env=env, check=True,
                   capture_output=True)
    assert json.loads((clone / "reports" / "featurize" / "friends.json").read_text())["minilm"]["utterances_per_s"] > 0
    status = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=clone, env=env, check=True,
                            capture_output=True, text=True)
    assert json.loads(status.stdout) == {}

    # A second corpus, again by params alone: only its own stages, the leaderboard and the report are out of date.
    params["datasets"]["chat"] = entry
    params["inputs"]["chat"] = example["inputs"]["friends"]
    params["pipeline"]["datasets"].append("chat")
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = subprocess.run(["dvc", "status", "--json", "dvc.yaml"], cwd=clone, env=env, check=True,
                            capture_output=True, text=True)
    stale = set(json.loads(status.stdout))
    assert stale == {"prepare@chat", "featurize@chat", "teacher@chat", "leaderboard", "report",
                     *(f"train@chat-{m}" for m in params["pipeline"]["models"]),
                     *(f"train_distilled@chat-{m}" for m in params["pipeline"]["distilled"])}, stale
