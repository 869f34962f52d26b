"""`erc serve`: the tiny MiSTER-E of test_predict (text through a real encoder, audio as vectors) registered in a real
sqlite store, served by the command itself (its own local Ray, a real Ray Serve deployment) on a free loopback
port; its answers checked against `erc.serving.predict.predict` on the same conversations."""

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from erc.models.checkpoint import load_model
from erc.serving.predict import predict
from erc.serving.serve import BATCH_HEADER, main
from tests.fixtures import EMOTIONS
from tests.test_predict import LINES, NAME, conversation, encoder, trained  # noqa: F401 (fixtures)
from tests.test_ray_loopback import is_loopback, listening_sockets, ray_processes

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402  benchmarks/serve.py: its server and client

GATES = ("speech", "text", "cross")


def records_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_as_predicted(answer: list[dict], expected, atol: float) -> None:
    """The server's records against predict's frame: rows, emotions, probabilities and gates."""
    assert [r["speaker"] for r in answer] == expected["speaker"].tolist()
    assert [r["dialogue_id"] for r in answer] == expected["dialogue_id"].tolist()
    assert [r["text"] for r in answer] == expected["text"].tolist()
    assert [r["emotion"] for r in answer] == expected["emotion"].tolist()
    probs = np.array([[r["probabilities"][e] for e in EMOTIONS] for r in answer])
    np.testing.assert_allclose(probs, expected[[f"p_{e}" for e in EMOTIONS]].to_numpy(), rtol=0, atol=atol)
    gates = np.array([[r["gates"]["gate"][g] for g in GATES] for r in answer])
    np.testing.assert_allclose(gates, expected[[f"gate.gate.{g}" for g in GATES]].to_numpy(), rtol=0, atol=atol)


def test_erc_serve_answers_as_predict_batches_callers_and_listens_on_loopback(trained, encoder, tmp_path):
    loaded = load_model(f"{NAME}/1", trained["uri"])
    one = conversation(tmp_path / "one.jsonl", audio=True, fmt="jsonl")
    others = [conversation(tmp_path / "reversed.jsonl", audio=True, fmt="jsonl", rows=LINES[::-1]),
              conversation(tmp_path / "short.jsonl", audio=True, fmt="jsonl", rows=LINES[:2]),
              conversation(tmp_path / "text.jsonl", fmt="jsonl", rows=LINES[1:])]  # other columns: a pass of its own
    two = tmp_path / "two.jsonl"  # two dialogues, their turns interleaved, numbered (JSON numbers back)
    two.write_text("".join(json.dumps({**r, "dialogue_id": (7, 9)[i % 2]}) + "\n"
                           for i, r in enumerate(records_of(one))))
    others.append(two)
    with bench.erc_serve(f"{NAME}/1", "--max-batch-size", "5", "--batch-wait-ms", "500",
                         tracking_uri=trained["uri"], cwd=tmp_path) as (proc, url, stderr):
        port = int(url.rsplit(":", 1)[1].strip("/"))
        status, body, headers = bench.post(url, {"dataframe_records": records_of(one)})
        assert status == 200, body
        assert headers[BATCH_HEADER] == "1"
        assert_as_predicted(body["predictions"], predict(one, loaded, encoder=encoder), atol=1e-6)
        assert (np.array([[r["gates"]["gate"][g] for g in GATES] for r in body["predictions"]]) > 0).all()

        # Callers at once: predicted together, each answered with its own conversation
        with ThreadPoolExecutor(len(others)) as pool:
            answers = list(pool.map(lambda p: bench.post(url, records_of(p)), others))
        assert all(status == 200 for status, *_ in answers), answers
        assert max(int(h[BATCH_HEADER]) for *_, h in answers) > 1, "no two requests were predicted together"
        for path, (_, body, _) in zip(others, answers):
            assert_as_predicted(body["predictions"], predict(path, loaded, encoder=encoder), atol=1e-6)

        # A bad request: 400 and erc's one line, and the server goes on
        status, body, _ = bench.post(url, b"{not json")
        assert status == 400 and body["error"].startswith("request: not JSON") and "\n" not in body["error"]
        short = [{**r, "audio_features": r["audio_features"][:3]} for r in records_of(one)]
        status, body, _ = bench.post(url, {"dataframe_records": short})
        assert status == 400 and body["error"].startswith("request: row 1: audio features have 3 values")
        status, body, _ = bench.post(url, [{"text": "no speaker"}])
        assert status == 400 and "no 'speaker' column" in body["error"]
        assert bench.post(url, {"dataframe_records": records_of(one)})[0] == 200

        # Loopback only: the proxy on the port asked for, and every other socket of the server and its Ray
        folder = next(line for line in stderr if line.startswith("ray logs: ")).split()[-1].split("/ray/")[0]
        sockets = listening_sockets(ray_processes(proc.pid, folder))
        listening = len(sockets)
        proxy = [ip for ip, p, _ in sockets if p == port]
        outside = [f"{ip}:{p} ({name})" for ip, p, name in sockets if not is_loopback(ip)]
        assert proxy and all(is_loopback(ip) for ip in proxy), proxy
        assert listening >= 8  # Ray's own, the proxy, the replica's inter-deployment gRPC server: all looked at
        assert not outside, "erc serve listens beyond loopback: " + ", ".join(outside)
    assert proc.returncode == 0, "".join(stderr[-20:])
    assert not Path(folder).exists(), "Ray was not shut down"
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ray_processes_left(folder))


def ray_processes_left(folder: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if any(folder in a for a in p.info["cmdline"] or ())]


def test_erc_serve_says_what_is_wrong_before_ray_starts(trained, capsys):
    uri = trained["uri"]
    assert main(["erc-nothing@best", "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "erc-nothing" in err and err.count("\n") == 1
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        assert main([f"{NAME}/1", "--tracking-uri", uri, "--port", str(held.getsockname()[1])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --port: 127.0.0.1:") and "cannot be listened on" in err and err.count("\n") == 1
    assert main([f"{NAME}/1", "--tracking-uri", uri, "--replicas", "0"]) == 1
    assert capsys.readouterr().err == "error: --replicas: 0 is below 1\n"


def test_benchmark_dry_run_measures_text_and_says_why_audio_is_skipped(trained, tmp_path):
    """benchmarks/serve.py --dry-run on the tiny model: its audio8 came with the data, not from media, so the
    server cannot hear a wav for it: the text+audio case is skipped with the server's reason, text is measured."""
    out = tmp_path / "serve.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve.py"), "--dry-run", "--model", f"{NAME}/1",
                           "--tracking-uri", trained["uri"], "--replicas", "1", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    text = results["text"]["replicas_1"]
    assert text["latency"]["requests"] == 3 and text["under_load"]["requests"] == 4
    assert 0 < text["latency"]["p50_ms"] <= text["latency"]["p99_ms"] and text["conversations_per_s"] > 0
    assert 1 <= text["mean_batch"] <= 2
    assert "audio8" in results["text_audio"]["skipped"] and "HTTP 400" in results["text_audio"]["skipped"]
    assert "text_audio skipped: the server cannot hear it" in done.stderr
    rows = [line.split() for line in done.stdout.splitlines()]
    assert ["text", "1"] in [r[:2] for r in rows] and ["text_audio", "skipped:"] in [r[:2] for r in rows]
