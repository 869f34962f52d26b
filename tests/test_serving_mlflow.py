"""A logged erc model served by `mlflow models serve` (issue 29): a real training run of MiSTER-E (text from a tiny
random BERT + the fixture's audio, one epoch) registered in a real sqlite store with the alias `best`, served from
`models:/<name>@best` on 127.0.0.1 in a subprocess; its REST answer to a conversation is `erc predict`'s."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from erc.models.checkpoint import load_model
from erc.serving.predict import predict
from tests.fixtures import AUDIO_DIM, EMOTIONS, encoded_texts, train_tiny_mister_e
from tests.media_fixtures import tiny_text_model

NAME = "erc-tiny-mister_e"
GATES = {"speech", "text", "cross"}  # MiSTER-E's gate over its experts
LINES = [("A", "I can't believe you did that!"), ("B", "What? I only borrowed it."), ("A", "You never asked me."),
         ("B", "Fine, I'm sorry, okay?"), ("A", "Thanks. That means a lot.")]
READY_SECONDS = 180  # mlflow, torch and the model imported and loaded on 2 busy cores


@pytest.fixture(scope="module")
def trained(ray_session, tiny_emotion, tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_mlflow")
    spec = {"model": str(tiny_text_model("bert", root / "bert")), "pooling": "mean", "max_length": 32}
    encoded_texts(tiny_emotion, root / "features", "tinybert", spec, max_length=32)
    uri, _ = train_tiny_mister_e(tiny_emotion, root, {"text": "tinybert", "audio": "audio8"}, "erc-serving-mlflow",
                                 epochs=1)
    import mlflow

    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, "best", "1")
    return {"root": root, "uri": uri}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# No proxy: urlopen's shared opener keeps the proxies of its first call, which may be a test's dead one.
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(url: str, body: dict | None = None, timeout: float = 60.0):
    """(status, parsed JSON or text) of a GET, or a POST of `body` as JSON."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with LOOPBACK.open(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def server(trained):
    """`mlflow models serve -m models:/erc-tiny-mister_e@best --env-manager local` with no --host: its default."""
    port = free_port()
    log = trained["root"] / "serve.log"
    bin_dir = Path(sys.executable).parent  # as in an activated environment: the CLI runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": trained["uri"], "MLFLOW_DISABLE_TELEMETRY": "true",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    mlflow_cli = bin_dir / "mlflow"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@best",
                                 "--env-manager", "local", "-p", str(port)],
                                cwd=trained["root"], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline, last = time.monotonic() + READY_SECONDS, None
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if call(f"http://127.0.0.1:{port}/ping", timeout=2)[0] == 200:
                    break
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                listening = [f"{c.laddr.ip}:{c.laddr.port} pid {c.pid}" for c in psutil.net_connections("inet")
                             if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
                pytest.fail(f"mlflow models serve not ready in {READY_SECONDS} s (last: {last!r}; listening on "
                            f"{port}: {listening}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "pid": proc.pid}
    finally:
        stop(proc)


def stop(proc) -> None:
    """The server's whole process group (the CLI and the uvicorn it starts, in their own session)."""
    for signal, wait in ((15, 30), (9, None)):
        try:
            os.killpg(proc.pid, signal)
        except ProcessLookupError:  # the group is gone
            break
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def records() -> list[dict]:
    """The conversation: audio for every utterance but the third (its audio missing: the mask path)."""
    rng = np.random.default_rng(0)
    out = [{"speaker": s, "text": t, "audio_features": rng.normal(size=AUDIO_DIM).round(4).tolist()} for s, t in LINES]
    out[2]["audio_features"] = None
    return out


def test_served_model_answers_as_erc_predict(trained, server, tmp_path):
    status, answer = call(server["url"] + "/invocations", {"dataframe_records": records()})
    assert status == 200, answer
    served = answer["predictions"]

    path = tmp_path / "conversation.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records()))
    expected = predict(path, load_model(f"{NAME}@best", trained["uri"]))

    assert len(served) == len(LINES) == len(expected)
    assert [r["speaker"] for r in served] == [s for s, _ in LINES]
    assert [r["text"] for r in served] == [t for _, t in LINES]
    assert [r["emotion"] for r in served] == expected["emotion"].tolist()
    probs = np.array([[r["probabilities"][e] for e in EMOTIONS] for r in served])
    np.testing.assert_allclose(probs, expected[[f"p_{e}" for e in EMOTIONS]].to_numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    for record, (_, row) in zip(served, expected.iterrows()):
        assert set(record["gates"]["gate"]) == GATES
        for expert in GATES:
            assert abs(record["gates"]["gate"][expert] - row[f"gate.gate.{expert}"]) <= 1e-6
    # the utterance without audio took the missing-audio path: no weight on speech
    assert served[2]["gates"]["gate"]["speech"] == 0 and served[0]["gates"]["gate"]["speech"] > 0


def test_bad_request_is_400_with_erc_message(server):
    status, answer = call(server["url"] + "/invocations", {"dataframe_records": [{"who": "A", "text": "hi"}]})
    assert status == 400
    assert "request: no 'speaker' column" in answer["message"]


def test_server_binds_loopback_only(server):
    """Listening on 127.0.0.1 alone: no socket of the server's processes on another address, and a connection to the
    port on each of this machine's other addresses is refused."""
    parent = psutil.Process(server["pid"])
    listening = {c.laddr.ip for p in [parent, *parent.children(recursive=True)]
                 for c in p.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server["port"]}
    assert listening == {"127.0.0.1"}
    others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
              if a.family == socket.AF_INET and not a.address.startswith("127.")]
    for address in others:
        with pytest.raises(OSError):
            socket.create_connection((address, server["port"]), timeout=2).close()
