"""`erc serve` under callers (issue 29): latency per conversation and conversations per second, 1 and 2 replicas.

    python benchmarks/serve.py                                   # erc-meld-baseline-tuned@best, 1 and 2 replicas
    python benchmarks/serve.py --model erc-iemocap-mister_e@best --replicas 1 2 4 --callers 16
    python benchmarks/serve.py --dry-run                         # a few requests a case: a smoke check

Each conversation has 10 utterances, two speakers taking turns, its texts drawn from a pool of everyday lines.
Two inputs: `text` (the utterances' text alone; a model that also takes audio gets its missing-audio path) and
`text_audio` (each utterance also gives a wav, spoken by espeak-ng when installed, else a voiced tone; the
model's audio features are recomputed from it by the server, `erc.serving.media`). For each number of replicas,
`erc serve` is started as a user starts it (its own local Ray on loopback, one process per replica) and, per
input: a few warm-up requests, then the latency of --latency-requests conversations sent one after another by one
caller (p50, p99), then --throughput-requests sent by --callers callers at once: conversations per second, the
latency under that load, and the mean batch a replica predicted them in (its x-erc-batch-size header). A model
without audio, or a server that cannot hear it, has its `text_audio` case skipped with the reason printed.
Run it alone on the machine: the callers and the server share its cores, and other jobs slow every figure.
Figures go to benchmarks/results/serve.json (a DVC metrics file); --dry-run writes only where --out says.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from queue import Empty, Queue

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402
from erc.serving.serve import BATCH_HEADER  # noqa: E402

UTTERANCES = 10  # per conversation
LINES = ["I can't believe you did that!", "What? I only borrowed it for a day.", "You never asked me, not once.",
         "Fine, I'm sorry, okay? I should have asked.", "Thanks. That actually means a lot to me.",
         "Are we still going to the game on Saturday?", "Of course we are, I already bought the tickets!",
         "Oh no, I think I left my keys at the office.", "Wait, is that a spider on the wall?",
         "This is the best pizza I have ever had.", "I'm so tired of hearing the same excuses.",
         "Honestly, I don't know what to say anymore.", "Did you hear that they closed the old bakery?",
         "That's wonderful news, congratulations!", "Please, just leave me alone for a while.",
         "Hmm, I guess that could work.", "Why would anyone do something like that?",
         "We lost the contract. All of it.", "Look at this, it's snowing in April!", "Okay. Let's get started then."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def erc_serve(model: str, *args: str, tracking_uri: str | None = None, cwd=ROOT, timeout: float = 300):
    """`erc serve MODEL ARGS` on a free port of 127.0.0.1, in a process of its own: yields (process, URL, its stderr
    lines so far) once it says it answers; SIGTERM (its Ctrl-C: Serve and Ray stopped) and its end afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}  # its own local Ray
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "erc.cli", "serve", model, "--port", str(port), *args]
    if tracking_uri:
        command += ["--tracking-uri", tracking_uri]
    proc = subprocess.Popen(command, cwd=cwd, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines, seen = Queue(), []
    threading.Thread(target=lambda: [*map(lines.put, proc.stderr), lines.put(None)], daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not seen or not seen[-1].startswith("erc serve:"):
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            except Empty:
                line = None
            if line is None:
                raise RuntimeError(f"erc serve {model} did not come up within {timeout:.0f} s:\n" + "".join(seen[-30:]))
            seen.append(line)
        yield proc, f"http://127.0.0.1:{port}/", seen
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            import psutil

            for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
                p.kill()
            raise


# A server on this machine, never through a proxy (urlopen's shared opener keeps the proxies of its first call).
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def post(url: str, body) -> tuple[int, dict, dict]:
    """(status, JSON answer, headers) of a POST of `body` (JSON, or bytes as they are)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with LOOPBACK.open(request, timeout=300) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def speech(folder: Path) -> tuple[list[Path], str]:
    """A wav per line of LINES, and how they were made."""
    from tests.media_fixtures import espeak, tone, write_audio

    paths, spoken = [], True
    for i, text in enumerate(LINES):
        path = folder / f"line{i:02d}.wav"
        made = espeak(path, text, pitch=30 + 5 * (i % 8))
        spoken = spoken and made is not None
        paths.append(made or write_audio(path, tone(1.0 + 0.1 * (i % 10), 110.0 + 10 * (i % 9), seed=i)))
    return paths, "espeak-ng" if spoken else "tones (espeak-ng not installed)"


def conversations(count: int, audio: list[Path] | None) -> list[list[dict]]:
    """`count` conversations of UTTERANCES utterances, each a different run through LINES."""
    out = []
    for k in range(count):
        rows = []
        for j in range(UTTERANCES):
            i = (k * 7 + j * 3) % len(LINES)
            rows.append({"speaker": "AB"[j % 2], "text": LINES[i], **({"audio": str(audio[i])} if audio else {})})
        out.append(rows)
    return out


def summary(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)), "requests": len(ms)}


def measure(url: str, convs: list[list[dict]], *, warmup: int, latency: int, throughput: int, callers: int) -> dict:
    """Latency of one caller, then conversations/s, latency and batch sizes under `callers` callers."""
    def one(k: int) -> tuple[float, int]:
        start = time.perf_counter()
        status, body, headers = post(url, {"dataframe_records": convs[k % len(convs)]})
        if status != 200 or len(body["predictions"]) != UTTERANCES:
            raise RuntimeError(f"HTTP {status}: {body.get('error', body)}")
        return time.perf_counter() - start, int(headers.get(BATCH_HEADER, 0))

    for k in range(warmup):
        one(k)
    alone = [one(k)[0] for k in range(latency)]
    with ThreadPoolExecutor(callers) as pool:
        start = time.perf_counter()
        loaded = list(pool.map(one, range(throughput)))
        wall = time.perf_counter() - start
    return {"latency": summary(alone), "callers": callers, "conversations_per_s": throughput / wall,
            "under_load": summary([s for s, _ in loaded]), "mean_batch": float(np.mean([b for _, b in loaded]))}


def takes_audio(model: str, tracking_uri: str | None) -> str | None:
    """Why the text_audio case cannot run on `model` (None: it can)."""
    from erc.models.checkpoint import load_model

    inputs = load_model(model, tracking_uri).info["inputs"]
    return None if "audio" in inputs else f"the model takes {', '.join(inputs)}: no audio"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models:/erc-meld-baseline-tuned@best")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--callers", type=int, default=8, help="callers at once in the throughput phase")
    parser.add_argument("--latency-requests", type=int, default=100, help="(a quarter of it with audio)")
    parser.add_argument("--throughput-requests", type=int, default=200, help="(a quarter of it with audio)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument("--dry-run", action="store_true", help="a few requests a case; nothing written but --out")
    parser.add_argument("--out", help="default: benchmarks/results/serve.json (none with --dry-run)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.latency_requests, args.throughput_requests, args.callers = 3, 4, 2
    out = args.out or (None if args.dry_run else str(ROOT / "benchmarks" / "results" / "serve.json"))
    options = ["--max-batch-size", str(args.max_batch_size), "--batch-wait-ms", str(args.batch_wait_ms)]
    results = {"model": args.model, "utterances": UTTERANCES, "max_batch_size": args.max_batch_size,
               "batch_wait_ms": args.batch_wait_ms, "callers": args.callers, "dry_run": args.dry_run,
               "cpu_count": os.cpu_count(), "loadavg_before": list(os.getloadavg()), "text": {}, "text_audio": {}}
    skip = takes_audio(args.model, args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="erc-serve-bench-") as tmp:
        wavs, made = speech(Path(tmp)) if skip is None else (None, None)
        results["audio"] = made
        cases = {"text": conversations(len(LINES), None), "text_audio": conversations(len(LINES), wavs)}
        for replicas in args.replicas:
            start = time.perf_counter()
            server = erc_serve(args.model, "--replicas", str(replicas), *options, tracking_uri=args.tracking_uri)
            with server as (_, url, _):
                up = time.perf_counter() - start
                print(f"{replicas} replica(s): up in {up:.1f} s", file=sys.stderr, flush=True)
                for case, convs in cases.items():
                    if case == "text_audio" and skip is None:
                        status, body, _ = post(url, {"dataframe_records": convs[0]})
                        if status != 200:
                            skip = f"the server cannot hear it: HTTP {status}: {body.get('error', body)}"
                    if case == "text_audio" and skip is not None:
                        print(f"text_audio skipped: {skip}", file=sys.stderr, flush=True)
                        results["text_audio"] = {"skipped": skip}
                        continue
                    share = 4 if case == "text_audio" else 1
                    r = measure(url, convs, warmup=2, latency=max(args.latency_requests // share, 3),
                                throughput=max(args.throughput_requests // share, args.callers), callers=args.callers)
                    results[case][f"replicas_{replicas}"] = {"startup_s": up, **r}
                    print(f"  {case}: p50 {r['latency']['p50_ms']:.0f} ms, p99 {r['latency']['p99_ms']:.0f} ms, "
                          f"{r['conversations_per_s']:.1f} conversations/s", file=sys.stderr, flush=True)
    results["loadavg_after"] = list(os.getloadavg())
    print(f"\n{args.model}: conversations of {UTTERANCES} utterances; latency: one caller; throughput: "
          f"{args.callers} callers, batches of up to {args.max_batch_size}, {args.batch_wait_ms:g} ms wait")
    print(f"{'input':<11} {'replicas':>8} {'p50 ms':>8} {'p99 ms':>8} {'conv/s':>8} {'p50 ms*':>8} {'p99 ms*':>8} "
          f"{'batch*':>7}")
    for case in ("text", "text_audio"):
        if "skipped" in results[case]:
            print(f"{case:<11} skipped: {results[case]['skipped']}")
            continue
        for key, r in results[case].items():
            print(f"{case:<11} {key.split('_')[1]:>8} {r['latency']['p50_ms']:>8.1f} {r['latency']['p99_ms']:>8.1f} "
                  f"{r['conversations_per_s']:>8.2f} {r['under_load']['p50_ms']:>8.1f} "
                  f"{r['under_load']['p99_ms']:>8.1f} {r['mean_batch']:>7.2f}")
    print(f"(* with {args.callers} callers at once; batch: the mean number of conversations predicted together)")
    if out:
        write_json(out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
