"""`erc serve`: a trained model answering conversations over HTTP on Ray Serve, for many callers at once.

    erc serve erc-meld-baseline-tuned@best                           # http://127.0.0.1:8000/, one replica
    erc serve models:/erc-iemocap-mister_e-tuned@best --replicas 2 --port 8080
    curl -s 127.0.0.1:8000/ -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"speaker": "A", "text": "You never asked me."}]}'

A request is one conversation as the model's MLflow pyfunc server (`erc.serving.pyfunc`) takes it: its utterances
as JSON records, {"dataframe_records": [...]} or the list alone, with the columns `erc predict` reads from a file
(`speaker`, `text`, optionally `dialogue_id`, `<modality>_features`, and media as `audio`/`video` absolute paths
on the server's machine, with `start`/`end` seconds). The answer is the pyfunc server's too, {"predictions": [...]}: per
utterance `erc predict --json`'s record (emotion, probabilities, gates), computed by the same code. A bad request
is answered 400 with erc's one-line message, before it joins a batch. The header x-erc-batch-size says how many
conversations were predicted in the caller's pass, its own included.

Each replica loads the model and its text encoder once. Requests that reach a replica together are predicted
together (`@serve.batch`: up to --max-batch-size conversations, waiting at most --batch-wait-ms after the first
for more): their dialogues are encoded and run through the model in one pass, as the dialogues of one file are,
and each caller gets its own conversation back. Ray Serve spreads the requests over --replicas replicas.

The HTTP proxy listens on 127.0.0.1 unless --host says otherwise, on erc's local Ray, itself on loopback
(`erc.training.cluster.init_ray`), or on the cluster RAY_ADDRESS names. Ctrl-C or SIGTERM stops the deployment
and Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading
import time

import pandas as pd
from ray import serve

from erc.errors import ErcDataError
from erc.serving.media import media_columns, media_inputs
from erc.serving.predict import check_conversation, conversation_table, predict_table, text_encoder, to_json
from erc.serving.pyfunc import REQUEST

APP = "erc"  # the Serve application's name
BATCH_HEADER = "x-erc-batch-size"  # an answer's header: how many conversations its pass predicted
LOG_LEVEL = "WARNING"  # Serve's INFO lines (one per request) to its log files only


def _replica_grpc_on_node_address() -> None:
    """Ray Serve 2.60 opens each replica's inter-deployment gRPC server on every interface ("[::]:0", fixed in
    ray.serve._private.replica), whatever address the node has; its callers dial the node's address
    (node_ip:port), so that address alone serves them: 127.0.0.1 on erc's local Ray. Patched at this module's
    import, which a replica does when it unpickles the deployment, before it opens the server."""
    import ray
    from ray.serve._private import replica

    add_port = replica.add_port_to_grpc_server
    if getattr(add_port, "erc_node_address", False):
        return

    def on_node_address(server, address: str):
        if address.startswith("[::]:"):
            ip = ray.util.get_node_ip_address()
            address = f"{f'[{ip}]' if ':' in ip else ip}:{address[len('[::]:'):]}"
        return add_port(server, address)

    on_node_address.erc_node_address = True
    replica.add_port_to_grpc_server = on_node_address


_replica_grpc_on_node_address()


def request_table(body) -> pd.DataFrame:
    """A request's conversation (`conversation_table`'s) from its JSON body."""
    records = body.get("dataframe_records") if isinstance(body, dict) else body
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ErcDataError(REQUEST, 'give the utterances as JSON records: {"dataframe_records": '
                                    '[{"speaker": ..., "text": ...}, ...]} or the list alone')
    return conversation_table(pd.DataFrame.from_records(records), REQUEST)


def predict_together(tables: list[pd.DataFrame], loaded, *, encoder=None, media=None) -> list[list[dict]]:
    """Each conversation's records, predicted in one pass: the conversations' dialogues as those of one file (their
    ids made distinct), the answer split back into each conversation's rows in its own order. The tables are checked
    and have the same columns, `media` the MediaInputs of those columns."""
    parts, dialogues = [], 0
    for table in tables:  # the pass's dialogue ids: 0, 1, ... over the conversations' dialogues
        ids = {d: dialogues + k for k, d in enumerate(pd.unique(table["dialogue_id"]))}
        dialogues += len(ids)
        parts.append(table.assign(dialogue_id=table["dialogue_id"].map(ids)))
    out = predict_table(pd.concat(parts, ignore_index=True), REQUEST, loaded, encoder=encoder, media=media)
    # A dialogue's rows come back in turn order (dialogues possibly reordered): each conversation's rows are
    # taken in its own order, dialogue by dialogue.
    turns = {k: iter(rows) for k, rows in out.groupby("dialogue_id", sort=False).indices.items()}
    answers = []
    for table, part in zip(tables, parts):
        frame = out.iloc[[next(turns[k]) for k in part["dialogue_id"]]].reset_index(drop=True)
        frame["dialogue_id"] = table["dialogue_id"].to_numpy()
        answers.append(to_json(frame, loaded.info["labels"]))
    return answers


@serve.deployment
class ErcModel:
    """One replica: the model and its text encoder loaded once; each request checked alone, then predicted with
    the other requests of its batch."""

    def __init__(self, model: str, tracking_uri: str, max_batch_size: int, batch_wait_s: float):
        import ray
        import torch

        from erc.models.checkpoint import load_model

        # torch's threads as many as the replica's CPUs (it would take every core: replicas would contend)
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.loaded = load_model(model, tracking_uri)
        self.encoder = text_encoder(pd.DataFrame(columns=["speaker", "text"]), self.loaded)  # None: it reads vectors
        self.media = {}  # the modalities given as media -> their MediaInputs, extractors built once
        self.predict_batch.set_max_batch_size(max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_s)

    def media_for(self, table: pd.DataFrame):
        key = tuple(m for m in self.loaded.info["inputs"] if media_columns(table, m))
        if key not in self.media:
            made = media_inputs(table, REQUEST, self.loaded.info)
            self.media[key] = made.load() if made is not None else None
        return self.media[key]

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        try:
            try:
                body = await request.json()
            except ValueError as e:
                raise ErcDataError(REQUEST, f"not JSON ({str(e).splitlines()[0]})") from None
            table = request_table(body)
            check_conversation(table, REQUEST, self.loaded, media=self.media_for(table))
        except ErcDataError as e:  # the caller's mistake: 400 and the one line, and no other request held up
            return JSONResponse({"error": str(e)}, status_code=400)
        answer, batch = await self.predict_batch(table)
        if isinstance(answer, ErcDataError):
            return JSONResponse({"error": str(answer)}, status_code=400)
        return JSONResponse({"predictions": answer}, headers={BATCH_HEADER: str(batch)})

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # set from the options in __init__
    async def predict_batch(self, tables: list[pd.DataFrame]) -> list:
        answers = await asyncio.to_thread(self.predict_many, tables)  # the event loop keeps taking requests
        return [(answer, len(tables)) for answer in answers]

    def predict_many(self, tables: list[pd.DataFrame]) -> list:
        """Tables of the same columns predicted in one pass (mixing them would change what a cell means: text
        encoded for one request, a missing `text_features` cell for another). A pass that fails on a request's
        data (a corrupt audio file is found only when read) is done again one request at a time, so that only
        that request is answered with the error."""
        groups = {}
        for i, table in enumerate(tables):
            groups.setdefault(tuple(sorted(map(str, table.columns))), []).append(i)
        answers = [None] * len(tables)
        for members in groups.values():
            media = self.media_for(tables[members[0]])
            try:
                together = predict_together([tables[i] for i in members], self.loaded, encoder=self.encoder,
                                            media=media)
            except ErcDataError as e:
                together = [e] if len(members) == 1 else [self.predict_many([tables[i]])[0] for i in members]
            for i, answer in zip(members, together):
                answers[i] = answer
            if media is not None:
                media.notes.clear()  # `erc predict`'s notes for stderr: nobody reads them here
        return answers


def check_port(host: str, port: int) -> None:
    """The proxy's address free, said in one line before Ray starts (else its proxy fails over and over)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ErcDataError("--host", f"{host!r} is not an address of this machine ({e.strerror})") from None
    family, *_, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as e:
            raise ErcDataError("--port", f"{host}:{port} cannot be listened on ({e.strerror}): give another "
                                         f"--port, or stop what holds it") from None


def start(model: str, *, tracking_uri: str | None = None, replicas: int = 1, host: str = "127.0.0.1",
          port: int = 8000, max_batch_size: int = 8, batch_wait_ms: float = 10.0,
          cpus_per_replica: float = 1.0) -> str:
    """Deploy `model` (a run id, a registered name[/version | @alias], models:/...) on Ray Serve and return its URL
    once every replica is up. The model is looked up in the store before Ray starts."""
    import mlflow

    from erc import tracking
    from erc.models.checkpoint import model_location
    from erc.training.cluster import init_ray

    for name, value, least in (("--replicas", replicas, 1), ("--max-batch-size", max_batch_size, 1),
                               ("--batch-wait-ms", batch_wait_ms, 0)):
        if value < least:
            raise ErcDataError(name, f"{value} is below {least}")
    if cpus_per_replica <= 0:
        raise ErcDataError("--cpus-per-replica", f"{cpus_per_replica} must be above 0")
    uri = tracking_uri or tracking.tracking_uri()  # resolved here: a replica's working directory is not ours
    model_location(mlflow.MlflowClient(uri), model)
    check_port(host, port)
    init_ray()
    logging.getLogger("ray.serve").setLevel(LOG_LEVEL)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": LOG_LEVEL})
    deployment = ErcModel.options(
        num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
        max_ongoing_requests=2 * max_batch_size)  # room for the next batch to gather while one is predicted
    serve.run(deployment.bind(model, uri, max_batch_size, batch_wait_ms / 1000), name=APP, route_prefix="/",
              logging_config={"log_level": LOG_LEVEL})
    wait_listening(host, port)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def wait_listening(host: str, port: int, seconds: float = 120.0) -> None:
    """Until the proxy accepts connections: `serve.run` returns once the replicas are up, and the proxy actor may
    bind its port a moment later on a busy machine, so "answers at" is said only when it does."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection((address, port), timeout=2):
                return
        except OSError as e:
            if time.monotonic() > deadline:
                raise ErcDataError(f"{host}:{port}", f"Ray Serve's proxy is not listening after {seconds:.0f} s ({e})") from None
            time.sleep(0.2)


def stop() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


def _interrupt(*_):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="erc serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an MLflow run id, a registered model name[/version | @alias], or models:/...")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the model, each in its own process")
    parser.add_argument("--host", default="127.0.0.1",
                        help="the address the HTTP proxy listens on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="the HTTP proxy's port (default 8000)")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="the most conversations a replica predicts in one pass (default 8)")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0,
                        help="how long a replica waits after a request for others to join its batch (default 10)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0,
                        help="Ray CPUs per replica; also its torch threads (default 1)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)")
    args = parser.parse_args(argv)
    try:
        url = start(args.model, tracking_uri=args.tracking_uri, replicas=args.replicas, host=args.host,
                    port=args.port, max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                    cpus_per_replica=args.cpus_per_replica)
    except ErcDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # SIGTERM as Ctrl-C: the deployment and Ray are stopped either way, not left running without their driver.
    # Set once Ray has started: its own handler (set by ray.init) aborts the process.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"erc serve: {args.model} at {url} ({args.replicas} replica{'s' if args.replicas > 1 else ''}, "
              f"batches of up to {args.max_batch_size}); Ctrl-C stops it", file=sys.stderr, flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0
