"""How erc's cost grows with the corpus: a generated conversational corpus at 10k, 100k and 1M utterances, each
stage timed and its peak memory measured, and the growth exponent between sizes.

    python benchmarks/scale.py                                   # 10k, 100k, 1M utterances, every model
    python benchmarks/scale.py --sizes 10000 100000 --models baseline sdt --step-seconds 30
    python benchmarks/scale.py --dry-run                         # 500 and 2,000 utterances, one model (seconds)

The corpus: dialogues whose lengths follow MELD's training split (by decile; `--shape iemocap` for IEMOCAP's
long sessions), 2-4 speakers each, MELD's emotion mix with sentiment derived from it as in MELD, short random
texts; dialogues dealt 8:1:1 to train, valid and test. Per size, each stage runs in a process of its own, so its
peak RSS (its own VmHWM, read inside it) is its own:

- `prepare`: the generated table made canonical, saved and loaded back (erc.data.canonical);
- `featurize`: the texts through a tiny random BERT (one layer, `--feature-dim` wide: the encoder's own arithmetic
  is small, so what is measured is erc's), written as the memory-mapped feature matrix (featurize_text);
- `probe`: the featurize stage's leakage probe on that matrix (erc.evaluation.leakage, as pipelines/featurize.py);
- `train:<model>`: the training data loaded as the train stage loads it (load_task, train and valid), then one
  epoch of the real `train_epoch` with the CPU stepper, the model at params' widths, params' batch size and lr. An
  epoch that would outlast `--step-seconds` is stopped there and its time extrapolated from the utterances/s
  reached (marked `*` in the table, `extrapolated` in the JSON);
- `predict`: `erc predict`'s part-wise path (erc.serving.predict: check, encode with the tiny encoder, predict
  part by part) over the test part, with the first model's checkpoint from its training step;
- `leaderboard`: the leaderboard's statistics (summary, bootstrap intervals, Holm-corrected paired tests;
  erc.evaluation.leaderboard) on generated predictions for the test part, 3 models x 5 seeds.

A stage's time is its work, timed inside its process (Python's start and imports apart: `process_s`); its RSS is
the process's own peak (VmHWM, imports included; `base_rss_mb`: its resident set when the work began). The growth
exponent between two sizes is log(t2/t1)/log(n2/n1), the same for RSS. Flagged: a time exponent above 1.15, and RSS that grows
between two sizes by more than the feature matrix does (+ SLACK_MB): memory beyond the memory-mapped matrix.
Run it alone on the machine. Figures go to benchmarks/results/scale.json (a DVC metrics file) and the log-log plot
to scale.png beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from predict_memory import WORDS, measure

FEATURE = "tiny"  # the feature set featurize writes and the models read (text)
# MELD's training split (Poria et al. 2019, table 3): emotion counts; sentiment follows from the emotion as in MELD
# (surprise either way).
EMOTIONS = {"neutral": 4710, "surprise": 1205, "fear": 268, "sadness": 683, "joy": 1743, "disgust": 271, "anger": 1109}
SENTIMENTS = ["negative", "neutral", "positive"]
SENTIMENT_OF = {"neutral": "neutral", "joy": "positive", "surprise": None, "fear": "negative", "sadness": "negative",
                "disgust": "negative", "anger": "negative"}
FAKE_MODELS = {"baseline": 0.55, "fake_a": 0.60, "fake_b": 0.62}  # accuracy of each generated model's predictions
SEEDS = 5
TIME_EXPONENT_FLAG = 1.15
SLACK_MB = 32  # RSS growth tolerated beyond the matrix's (allocator and page noise)
PREPARE, FEATURIZE, PROBE, PREDICT, LEADERBOARD = "prepare", "featurize", "probe", "predict", "leaderboard"


# ---------------------------------------------------------------- the corpus


def corpus(n: int, shape: str, seed: int = 0):
    """`n` utterances in dialogues of `shape`'s lengths (benchmarks/gpu.py's SHAPES), as a raw table."""
    import numpy as np
    import pandas as pd
    from gpu import SHAPES

    rng = np.random.default_rng(seed)
    deciles = SHAPES[shape]["deciles"]
    mean = float(np.mean(deciles))
    lengths = np.maximum(1, np.rint(np.interp(rng.uniform(0, 10, int(2 * n / mean) + 10), np.arange(11), deciles)))
    lengths = lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    dialogues = int(np.searchsorted(ends, n)) + 1
    lengths = lengths[:dialogues]
    lengths[-1] -= int(ends[dialogues - 1] - n)  # exactly n utterances
    dialogue = np.repeat(np.arange(dialogues), lengths)
    turn = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    split = np.array(["train"] * 8 + ["valid", "test"])[dialogue % 10]  # 8:1:1, every split at any size
    speakers = rng.integers(2, 5, dialogues)[dialogue]
    who = (rng.integers(0, 300, dialogues)[dialogue] + rng.integers(0, 1 << 30, n) % speakers) % 300
    names = np.array(list(EMOTIONS), dtype=object)
    counts = np.array(list(EMOTIONS.values()), dtype=np.float64)
    emotion = rng.choice(len(names), size=n, p=counts / counts.sum())
    sentiment = np.array([SENTIMENT_OF[e] or "" for e in names], dtype=object)[emotion]
    surprised = sentiment == ""
    sentiment[surprised] = np.where(rng.random(int(surprised.sum())) < 0.5, "positive", "negative")
    pool = [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), int(k))) for k in rng.integers(2, 16, min(n, 50_000))]
    text = np.array(pool, dtype=object)[rng.integers(0, len(pool), n)]
    ids = np.char.add("d", dialogue.astype(str))
    return pd.DataFrame({"dialogue_id": ids, "turn": turn, "utterance_id": np.char.add(np.char.add(ids, "_u"), turn.astype(str)),
                         "speaker": np.char.add("s", who.astype(str)), "text": text, "split": split,
                         "emotion_id": emotion, "emotion": names[emotion],
                         "sentiment_id": np.searchsorted(SENTIMENTS, sentiment.astype(str)), "sentiment": sentiment})


def tiny_encoder(directory: Path, dim: int) -> Path:
    """A random one-layer BERT `dim` wide with MiniLM's tokenizer (tests/media_fixtures.py's), saved to `directory`."""
    import transformers as tf

    from tests.media_fixtures import text_tokenizer

    tokenizer = text_tokenizer()
    model = tf.BertModel(tf.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=dim, num_hidden_layers=1,
                                       num_attention_heads=max(1, dim // 64) if dim >= 64 else 4,
                                       intermediate_size=dim, max_position_embeddings=256))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---------------------------------------------------------------- the steps (each in a process of its own)


def rss_mb(field: str = "VmHWM") -> float:
    """This process's own peak (VmHWM) or current (VmRSS) resident set. Not ru_maxrss: Linux carries the forking
    parent's peak over exec into it, so every step would read at least the parent's (which holds the corpus)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field + ":"))) / 1024


def started() -> tuple[float, float]:
    """The step's clock start and its resident set then (imports and inputs read, the work not begun)."""
    return time.perf_counter(), rss_mb("VmRSS")


def step_prepare(conf: dict, here: Path) -> dict:
    import pandas as pd

    from erc.data import canonical

    raw = pd.read_parquet(here / "generated.parquet")
    meta = {"dataset": "scale", "target": "emotion", "sources": {}, "has_sentiment_score": False,
            "emotion_labels": list(EMOTIONS), "sentiment_labels": SENTIMENTS}
    start, base = started()
    canonical.save(canonical.Prepared(canonical.make_table(raw), meta, {}), here / "prepared")
    rows = len(canonical.load(here / "prepared", feature_names=[]).table)
    return {"base_rss_mb": base, "seconds": time.perf_counter() - start, "rows": rows}


def step_featurize(conf: dict, here: Path) -> dict:
    from erc.data import canonical
    from erc.features.text import TextEncoderSpec, featurize_text

    encoder = Path(conf["work"]) / "encoder"
    if not (encoder / "config.json").exists():  # made once, by the first size's step, before its clock starts
        tiny_encoder(encoder, conf["feature_dim"])
    spec = TextEncoderSpec(model=str(encoder), pooling="mean", max_length=128)
    start, base = started()
    table = canonical.load(here / "prepared", feature_names=[]).table
    timing = featurize_text(table, here / "features", FEATURE, spec, batch_size=conf["featurize_batch_size"],
                            source=[str(here / "prepared/utterances.parquet")], progress=False)
    return {"base_rss_mb": base, "seconds": time.perf_counter() - start, "encode_seconds": timing["seconds"],
            "utterances_per_s": timing["utterances_per_s"]}


def step_probe(conf: dict, here: Path) -> dict:
    from erc.data import canonical
    from erc.evaluation.leakage import probe_features

    start, base = started()
    prepared = canonical.load(here / "prepared", feature_names=[])
    fs = canonical.load_features(here / "features", FEATURE)
    probe_features("scale", prepared.table, {FEATURE: fs}, prepared.meta, max_gap=conf["max_gap"])
    return {"base_rss_mb": base, "seconds": time.perf_counter() - start, "probe": fs.info["leakage_probe"]}


class OutOfTime(Exception):
    pass


class Budgeted:
    """A stepper that counts the utterances it steps on and stops the epoch (OutOfTime) once `seconds` are spent."""

    def __init__(self, stepper, seconds: float):
        self.inner, self.seconds, self.utterances, self.steps = stepper, seconds, 0, 0
        self.start = time.perf_counter()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.utterances += batch.num_utterances
        return self.inner(batch)

    def step(self) -> None:
        self.inner.step()
        self.steps += 1
        if time.perf_counter() - self.start > self.seconds:
            raise OutOfTime


def step_train(conf: dict, here: Path, model_name: str) -> dict:
    import torch

    from erc import tracking
    from erc.models import build_model
    from erc.models.checkpoint import save_checkpoint
    from erc.training import distributed
    from erc.training.config import TrainConfig
    from erc.training.loop import seed_everything, train_epoch
    from erc.training.task import load_task

    cfg = TrainConfig(dataset="scale", prepared=str(here / "prepared"), feature_dirs=[str(here / "features")],
                      inputs={"text": FEATURE}, model=model_name, model_config=conf["model_configs"][model_name],
                      **conf["train"])
    start, base = started()
    task = load_task(cfg)  # train and valid, as the train stage's worker loads them
    load_s = time.perf_counter() - start
    seed_everything(0)
    model = build_model(model_name, task.spec, cfg.model_config)
    stepper = Budgeted(distributed.stepper(cfg, model, 1, torch.device("cpu")), conf["step_seconds"])
    train = task.splits["train"]
    try:
        train_epoch(stepper, train, cfg, 0, 0, 1)
        complete = True
    except OutOfTime:
        complete = False
    ran = time.perf_counter() - stepper.start
    rate = stepper.utterances / max(ran, 1e-9)
    epoch_s = ran if complete else train.num_utterances / max(rate, 1e-9)
    if model_name == conf["predict_model"]:  # the checkpoint the predict step serves, as a logged model holds it
        (here / "model").mkdir(exist_ok=True)
        save_checkpoint(here / "model", stepper.module, name=model_name, config=cfg.model_config, spec=task.spec,
                        feature_stats=task.stats)
        (here / "model" / tracking.MODEL_INFO).write_text(json.dumps(tracking.model_info(cfg, task)))
    return {"base_rss_mb": base, "seconds": load_s + epoch_s, "load_seconds": load_s, "epoch_seconds": epoch_s,
            "extrapolated": not complete, "ran_seconds": ran, "steps": stepper.steps, "utterances_per_s": rate,
            "train_utterances": train.num_utterances, "params": sum(p.numel() for p in model.parameters())}


def step_predict(conf: dict, here: Path) -> dict:
    import pandas as pd
    import torch

    from erc import tracking
    from erc.models.checkpoint import LoadedModel, load_checkpoint
    from erc.serving.predict import check_conversation, predict_parts, text_encoder

    start, base = started()
    model, _ = load_checkpoint(here / "model")  # as erc.models.checkpoint.load_model, without the MLflow store
    state = torch.load(here / "model" / "model.pt", map_location="cpu", weights_only=True)
    stats = {name: (s["mean"].numpy(), s["std"].numpy()) for name, s in state["feature_stats"].items()}
    loaded = LoadedModel(model, json.loads((here / "model" / tracking.MODEL_INFO).read_text()), stats, "scale")
    table = pd.read_parquet(here / "prepared/utterances.parquet", columns=["dialogue_id", "speaker", "text", "split"])
    table = table[table["split"] == "test"].drop(columns="split").reset_index(drop=True)
    source = here / "prepared/utterances.parquet"
    check_conversation(table, source, loaded)
    rows = sum(len(frame) for frame in predict_parts(table, source, loaded, encoder=text_encoder(table, loaded)))
    return {"base_rss_mb": base, "seconds": time.perf_counter() - start, "rows": rows}


def step_leaderboard(conf: dict, here: Path) -> dict:
    import numpy as np
    import pandas as pd

    from erc.evaluation import leaderboard, stats

    table = pd.read_parquet(here / "prepared/utterances.parquet", columns=["dialogue_id", "split", "emotion_id"])
    table = table[table["split"] == "test"]
    actual, names = table["emotion_id"].to_numpy(), np.array(list(EMOTIONS), dtype=object)
    classes, rng = len(names), np.random.default_rng(0)
    runs, predictions = [], {}
    for model, accuracy in FAKE_MODELS.items():
        for seed in range(SEEDS):
            pred = np.where(rng.random(len(actual)) < accuracy, actual, rng.integers(0, classes, len(actual)))
            cm = stats.dialogue_confusions(np.zeros(len(actual), dtype=np.int64), actual, pred, 1, classes)[0]
            recall = np.diag(cm) / np.maximum(cm.sum(1), 1)
            precision = np.diag(cm) / np.maximum(cm.sum(0), 1)
            run_id = f"{model}-{seed}"
            runs.append({"dataset": "scale", "variant": "tuned", "model": model, "features": FEATURE,
                         "class_weights": "none", "label_derived": "", "leakage_warning": "", "seed": seed,
                         "run_id": run_id, "wf1": float(stats.weighted_f1(cm)), "acc": float((pred == actual).mean()),
                         "macro_f1": float(np.mean(2 * recall * precision / np.maximum(recall + precision, 1e-12)))})
            predictions[run_id] = pd.DataFrame({"dialogue_id": table["dialogue_id"].to_numpy(), "actual": names[actual],
                                                "predicted": names[pred]})
    runs = pd.DataFrame(runs)
    start, base = started()
    board = leaderboard.add_significance(leaderboard.summarise(runs), runs, predictions)
    return {"base_rss_mb": base, "seconds": time.perf_counter() - start, "rows": len(actual),
            "dialogues": int(table["dialogue_id"].nunique()), "board_rows": len(board)}


STEPS = {PREPARE: step_prepare, FEATURIZE: step_featurize, PROBE: step_probe, PREDICT: step_predict,
         LEADERBOARD: step_leaderboard}


def run_step(stage: str, work: Path, size: int) -> None:
    """One stage at one size in this process: its figures to <size>/<stage>.result.json."""
    conf = json.loads((work / "config.json").read_text())
    here = work / str(size)
    kind, _, model = stage.partition(":")
    result = step_train(conf, here, model) if kind == "train" else STEPS[stage](conf, here)
    result["peak_rss_mb"] = rss_mb()
    (here / f"{stage.replace(':', '_')}.result.json").write_text(json.dumps(result))


# ---------------------------------------------------------------- the whole benchmark


def exponent(a: float, b: float, n1: int, n2: int) -> float | None:
    return math.log(b / a) / math.log(n2 / n1) if a > 0 and b > 0 else None


def growth(results: dict, sizes: list[int], matrix_mb: dict) -> tuple[dict, list[str]]:
    """Per stage, the exponents between consecutive sizes, and the flags (see the module's docstring)."""
    exponents, flags = {}, []
    for stage, by_size in results.items():
        exponents[stage] = []
        for n1, n2 in pairwise(sizes):
            a, b = by_size.get(str(n1), {}), by_size.get(str(n2), {})
            if not (a.get("ok") and b.get("ok")):
                continue
            e = {"from": n1, "to": n2, "time": exponent(a["seconds"], b["seconds"], n1, n2),
                 "rss": exponent(a["peak_rss_mb"], b["peak_rss_mb"], n1, n2),
                 "rss_growth_mb": b["peak_rss_mb"] - a["peak_rss_mb"],
                 "matrix_growth_mb": matrix_mb[str(n2)] - matrix_mb[str(n1)]}
            exponents[stage].append(e)
            if e["time"] is not None and e["time"] > TIME_EXPONENT_FLAG:
                flags.append(f"{stage}: time grows as n^{e['time']:.2f} from {n1:,} to {n2:,} utterances "
                             f"(> {TIME_EXPONENT_FLAG})")
            if e["rss_growth_mb"] > e["matrix_growth_mb"] + SLACK_MB:
                flags.append(f"{stage}: peak RSS grows {e['rss_growth_mb']:.0f} MB from {n1:,} to {n2:,} utterances, "
                             f"the feature matrix {e['matrix_growth_mb']:.0f} MB (+{SLACK_MB} MB tolerated)")
    return exponents, flags


def table(results: dict, exponents: dict, sizes: list[int]) -> str:
    """Stage x size: time (s; * extrapolated), peak RSS (MB), then the exponents between consecutive sizes."""
    pairs = [f"{n1:,}->{n2:,}" for n1, n2 in pairwise(sizes)]
    head = (f"{'stage':<22}" + "".join(f"{f'{n:,}: time':>16}{'RSS':>9}" for n in sizes)
            + "".join(f"{'exp t ' + p:>22}{'exp RSS':>9}" for p in pairs))
    lines = [head, "-" * len(head)]
    for stage, by_size in results.items():
        line = f"{stage:<22}"
        for n in sizes:
            r = by_size.get(str(n))
            if r is None or not r.get("ok"):
                line += f"{'failed' if r else '-':>16}{'':>9}"
                continue
            line += f"{r['seconds']:>14.2f}s{'*' if r.get('extrapolated') else ' '}{r['peak_rss_mb']:>7.0f}MB"
        by_pair = {f"{e['from']:,}->{e['to']:,}": e for e in exponents.get(stage, [])}
        for p in pairs:
            e = by_pair.get(p)
            fmt = (lambda v: f"{v:.2f}" if v is not None else "n/a")
            line += f"{fmt(e['time']) if e else '-':>22}{fmt(e['rss']) if e else '-':>9}"
        lines.append(line)
    return "\n".join(lines)


def plot(results: dict, sizes: list[int], path: Path) -> None:
    """Log-log time and peak RSS against corpus size, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.get_cmap("tab20").colors  # the default cycle repeats after 10 stages
    for i, (stage, by_size) in enumerate(results.items()):
        points = [(n, by_size[str(n)]) for n in sizes if by_size.get(str(n), {}).get("ok")]
        if not points:
            continue
        x = [n for n, _ in points]
        style = {"marker": "os^v"[i % 4], "color": colors[2 * i % 20 + (i // 10) % 2], "label": stage}
        t_ax.plot(x, [r["seconds"] for _, r in points], **style)
        m_ax.plot(x, [r["peak_rss_mb"] for _, r in points], **style)
    for ax, what in ((t_ax, "wall time (s)"), (m_ax, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("utterances")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    t_ax.legend(fontsize=8)
    fig.suptitle("erc's stages against corpus size (benchmarks/scale.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--models", nargs="+", help="default: every registered model")
    parser.add_argument("--stages", nargs="+", choices=[PREPARE, FEATURIZE, PROBE, "train", PREDICT, LEADERBOARD],
                        help="default: all (a stage needs the ones before it)")
    parser.add_argument("--step-seconds", type=float, default=60.0,
                        help="a training epoch's most seconds; a longer one is stopped and extrapolated")
    parser.add_argument("--shape", choices=["meld", "iemocap"], default="meld", help="dialogue lengths like this corpus")
    parser.add_argument("--feature-dim", type=int, default=384, help="the tiny encoder's width (MiniLM's: 384)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one; 1M needs ~2 GB)")
    parser.add_argument("--dry-run", action="store_true", help="500 and 2,000 utterances, one model at tiny widths")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/scale.json (--dry-run: scale_dry_run.json)")
    parser.add_argument("--plot", type=Path, help="default: the --out path with .png")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # the child process of one stage at one size
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step:
        run_step(args.step, args.work, args.size)
        return 0

    from erc.io import write_json
    from erc.models import MODELS
    from erc.params import load_params

    params = load_params(ROOT / "params.yaml")
    unknown = sorted(set(args.models or ()) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; registered: {sorted(MODELS)}")
    models = args.models or sorted(MODELS)
    configs = {m: params["models"].get(m, {}) for m in models}
    if args.dry_run:  # the model contract's tiny widths, kept in one place
        from tests.test_model_contract import TINY

        args.sizes, models, args.feature_dim = [500, 2000], args.models or ["baseline"], 32
        args.step_seconds = min(args.step_seconds, 10.0)
        configs = {m: TINY.get(m, {}) for m in models}
    sizes = sorted(set(args.sizes))
    wanted = args.stages or [PREPARE, FEATURIZE, PROBE, "train", PREDICT, LEADERBOARD]
    stages = [s for s in (PREPARE, FEATURIZE, PROBE) if s in wanted] + \
             ([f"train:{m}" for m in models] if "train" in wanted else []) + \
             [s for s in (PREDICT, LEADERBOARD) if s in wanted]
    out = args.out or ROOT / "benchmarks/results" / ("scale_dry_run.json" if args.dry_run else "scale.json")
    png = args.plot or out.with_suffix(".png")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train = params["train"]
    conf = {"feature_dim": args.feature_dim, "step_seconds": args.step_seconds, "predict_model": models[0],
            "model_configs": configs, "featurize_batch_size": params["featurize"]["batch_size"],
            "max_gap": (params.get("leakage") or {}).get("max_gap", 10.0),
            "train": {k: train[k] for k in ("batch_size", "lr", "weight_decay", "grad_clip")}}
    results = {s: {} for s in stages}
    matrix_mb = {str(n): n * args.feature_dim * 4 / 2**20 for n in sizes}
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="erc-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        conf["work"] = str(work)
        (work / "config.json").write_text(json.dumps(conf))
        for n in sizes:
            here = work / str(n)
            shutil.rmtree(here, ignore_errors=True)
            here.mkdir()
            corpus(n, args.shape).to_parquet(here / "generated.parquet", index=False)
            for stage in stages:
                command = [sys.executable, __file__, "--step", stage, "--work", str(work), "--size", str(n)]
                ran = measure(command)
                result_file = here / f"{stage.replace(':', '_')}.result.json"
                r = {"ok": ran["returncode"] == 0 and result_file.exists(), "process_s": ran["wall_s"],
                     "returncode": ran["returncode"]}
                if r["ok"]:
                    r.update(json.loads(result_file.read_text()))
                else:
                    r["stderr_tail"] = ran["stderr_tail"]
                results[stage][str(n)] = r
                print(f"{n:>9,} {stage:<22} " + (f"{r['seconds']:8.2f} s{'*' if r.get('extrapolated') else ' '} "
                                                  f"{r['peak_rss_mb']:6.0f} MB (process {r['process_s']:.1f} s)"
                                                  if r["ok"] else f"FAILED ({r['returncode']}): "
                                                  + " | ".join(ran["stderr_tail"])), file=sys.stderr, flush=True)
            shutil.rmtree(here, ignore_errors=True)  # 1M's matrix is 1.5 GB: one size on disk at a time
    exponents, flags = growth(results, sizes, matrix_mb)
    print(f"\n{table(results, exponents, sizes)}\n(* epoch stopped at {args.step_seconds:g} s and extrapolated from its "
          f"utterances/s; time: the stage's work, imports apart; RSS: the process's peak)")
    for line in flags:
        print(f"flag: {line}")
    if not flags:
        print("flags: none (every time exponent <= 1.15, RSS growth within the feature matrix's)")
    write_json(out, {"sizes": sizes, "shape": args.shape, "feature_dim": args.feature_dim, "models": models,
                     "step_seconds": args.step_seconds, "dry_run": args.dry_run, "cpus": os.cpu_count(),
                     "loadavg": os.getloadavg(), "matrix_mb": matrix_mb, "seconds": time.perf_counter() - began,
                     "stages": results, "exponents": exponents, "flags": flags})
    plot(results, sizes, png)
    print(f"wrote {out} and {png}")
    return 0 if all(r["ok"] for by_size in results.values() for r in by_size.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
