"""The GPU check: every registered model at its config's defaults (the papers' widths) through the training step.

    python benchmarks/gpu.py                  # on a GPU: prints a table, writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --dry-run        # the same code on CPU, tiny widths, a few steps (seconds)
    bash benchmarks/gpu_check.sh              # what a lent device machine runs (results under $OUT)

Per model, on IEMOCAP- and MELD-shaped inputs (data/prepared + data/features when present, else a generated
dataset of the same shapes: the params' feature sets and their dims, the training split's dialogue lengths (by
decile) and class counts), three ways of stepping:
- `deepspeed_bf16`: erc's GPU path (`train.use_gpu=true`, backend auto): a DeepSpeed engine, bf16, ZeRO 2;
- `ddp_fp32`: the DDP stepper in fp32 (one worker: the bare model, no DDP wrapper);
- `ddp_bf16_compile`: the DDP stepper under bf16 autocast with the model `torch.compile`d (a model that does
  not compile is marked so, with the error's first line).

The step is the real loop's: `erc.training.loop.train_epoch` with the stepper `erc.training.distributed.stepper`
builds, run over epochs until `--steps` optimizer steps or `--case-seconds`. It runs in this process, not in a
one-worker Ray Train group: the step function is the one the Ray worker runs, while a worker group's start (tens of
seconds) would not fit a short device call and Ray is not on the device image. Ray Train's worker context (rank 0
of 1, this GPU), which the DeepSpeed stepper reads, is stood in for, and a one-process group is set up for it.

Measured per (model, dataset, way): parameters, training utterances/s, peak GPU memory
(torch.cuda.max_memory_allocated), GPU utilisation sampled by NVML while timing (when pynvml or nvidia-smi is
there), FLOPs per utterance counted by torch.utils.flop_counter.FlopCounterMode on the model's real forward and
backward of the first batches (fp32, cuDNN off so GRUs count as the matrix products they are), and MFU: utterances/s
x FLOPs per utterance over the device's dense bf16 peak, looked up from its name (PEAK_BF16_TFLOPS; a device not
in the table is reported `unknown`, never guessed). The whole run keeps to `--budget` seconds: cases that would
not fit are skipped and listed. The ways run one after another over all models, so a short budget loses compile
cases first. Stage 1 (LoRA on a text encoder) is not run here: it needs Ray Train, the encoder's weights and
MELD's text, none of which is on a bare device machine.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.data import canonical  # noqa: E402
from erc.io import write_json  # noqa: E402
from erc.models import MODELS, build_model  # noqa: E402
from erc.params import load_params  # noqa: E402
from erc.training import distributed  # noqa: E402
from erc.training.config import TrainConfig  # noqa: E402
from erc.training.loop import seed_everything, train_epoch  # noqa: E402
from erc.training.task import load_task  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; the first pattern that matches
# torch.cuda.get_device_name() wins, so the more specific ones come first.
PEAK_BF16_TFLOPS = [
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b.*\bNVL\b", 835.0),
    (r"\bH100\b", 989.0),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH200\b.*\bNVL\b", 835.0),
    (r"\bH200\b", 989.0),  # SXM ("NVIDIA H200"); 788 measured on one here (.library/device/KINDS.md)
    (r"\bA100\b", 312.0),
    (r"\bL40S\b", 362.0),
    (r"\bL4\b", 121.0),
    (r"\bA10G\b", 70.0),  # AWS's part: NVIDIA publishes no sheet; the commonly quoted figure
    (r"\bA10\b", 125.0),
    (r"\bRTX 4090\b", 165.0),
]

# The training split's shape where data/prepared is absent (read from data/prepared on 2026-12; `prepared` mode
# reads the real files): classes, MELD's second (sentiment) task, training dialogues, their lengths by decile.
SHAPES = {
    "iemocap": {"classes": 6, "sentiment_classes": 0, "dialogues": 100,
                "deciles": [8, 26.9, 33.8, 39.4, 43, 47, 51.4, 54, 61, 69, 110]},
    "meld": {"classes": 7, "sentiment_classes": 3, "dialogues": 1038,
             "deciles": [1, 2, 4, 6, 7, 9, 11, 13, 15, 18, 24]},
}
FEATURE_DIMS = {"minilm": 384, "acoustic8": 8, "prosody8": 8}  # the params' feature sets, when not on disk
WAYS = ("deepspeed_bf16", "ddp_fp32", "ddp_bf16_compile")



def peak_bf16_tflops(device_name: str) -> float | str:
    """The dense bf16 peak of a device by its reported name; "unknown" for one not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return tflops
    return "unknown"


def generated_prepared(dataset: str, directory: Path, inputs: dict, *, dialogues: int | None = None,
                       seed: int = 0) -> Path:
    """A prepared dataset of `dataset`'s shape (SHAPES, FEATURE_DIMS), random features and labels, written with
    erc.data.canonical so that load_task reads it as it reads the real one. Two short valid and test dialogues."""
    shape, rng = SHAPES[dataset], np.random.default_rng(seed)
    n = dialogues or shape["dialogues"]
    lengths = np.maximum(1, np.rint(np.interp(rng.uniform(0, 10, n), np.arange(11), shape["deciles"]))).astype(int)
    records = []
    for d, (split, length) in enumerate([("train", int(x)) for x in lengths] + [("valid", 3)] * 2 + [("test", 3)] * 2):
        for turn in range(length):
            c = (d + turn) % shape["classes"]  # every class in the training split
            s = (d + turn) % shape["sentiment_classes"] if shape["sentiment_classes"] else -1
            records.append({"dialogue_id": f"d{d}", "turn": turn, "utterance_id": f"d{d}_u{turn}",
                            "speaker": "AB"[int(rng.integers(2))], "split": split, "emotion_id": c, "emotion": f"e{c}",
                            "sentiment_id": s, "sentiment": f"s{s}" if s >= 0 else ""})
    table = canonical.make_table(records)
    features = {name: canonical.FeatureSet(name, modality, rng.normal(size=(len(table), FEATURE_DIMS[name]))
                                           .astype(np.float32), ["generated"])
                for modality, name in inputs.items()}
    meta = {"dataset": f"generated-{dataset}", "target": "emotion", "sources": {}, "has_sentiment_score": False,
            "emotion_labels": [f"e{c}" for c in range(shape["classes"])],
            "sentiment_labels": [f"s{c}" for c in range(shape["sentiment_classes"])]}
    canonical.save(canonical.Prepared(table, meta, features), directory)
    return directory


def load_dataset(dataset: str, params: dict, data: str, scratch: Path, dry_run: bool):
    """(task, where it came from): the prepared data when `data` allows and it is there, else generated."""
    inputs = params["inputs"][dataset]
    prepared, features = ROOT / params["data_dir"] / "prepared" / dataset, ROOT / params["data_dir"] / "features" / dataset
    real = data != "generated" and (prepared / "meta.json").exists() and all(
        (features / f"{n}.npy").exists() or (prepared / "features" / f"{n}.npy").exists() for n in inputs.values())
    if data == "prepared" and not real:
        raise SystemExit(f"{prepared}: no prepared {dataset} with features {sorted(inputs.values())} (--data prepared)")
    if not real:
        prepared, features = generated_prepared(dataset, scratch / dataset, inputs, dialogues=12 if dry_run else None), None
    cfg = TrainConfig(dataset=dataset, prepared=str(prepared), inputs=inputs,
                      feature_dirs=[str(features)] if features else [], batch_size=params["train"]["batch_size"])
    return load_task(cfg, splits=("train",)), "prepared" if real else "generated"


def count_flops(model: torch.nn.Module, data, batch_size: int, device: torch.device, batches: int = 4) -> float:
    """FLOPs per utterance of one training forward and backward, counted on the first `batches` batches (in file
    order: the same count every call). fp32, cuDNN and oneDNN off so recurrent layers run as countable matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    model = model.to(device).train()
    flops = utterances = 0
    with torch.backends.cudnn.flags(enabled=False), torch.backends.mkldnn.flags(enabled=False):
        for indices in data.batch_indices(batch_size)[:batches]:
            batch = data.collate(indices).to(device)
            with FlopCounterMode(display=False) as counter:
                model(batch).loss.backward()
            flops += counter.get_total_flops()
            utterances += batch.num_utterances
    model.zero_grad(set_to_none=True)
    return flops / max(utterances, 1)


class Utilisation:
    """GPU utilisation (%) sampled every 0.1 s in a thread while timing: NVML, else nvidia-smi, else unavailable."""

    def __init__(self, index: int = 0):
        self.samples, self.source, self._stop = [], "unavailable", threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read, self.source = lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu, "nvml"
        except Exception:  # no pynvml, or no NVIDIA driver
            if subprocess.run(["sh", "-c", "command -v nvidia-smi"], capture_output=True, check=False).returncode == 0:
                self._read, self.source = lambda: int(subprocess.run(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"--id={index}"],
                    capture_output=True, text=True, timeout=5, check=True).stdout.split()[0]), "nvidia-smi"

    def __enter__(self):
        if self.source != "unavailable":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            with contextlib.suppress(Exception):
                self.samples.append(self._read())

    def __exit__(self, *exc):
        self._stop.set()
        if self.source != "unavailable":
            self._thread.join()

    def summary(self):
        if not self.samples:
            return "unavailable" if self.source == "unavailable" else f"no samples ({self.source})"
        return {"mean": float(np.mean(self.samples)), "max": float(np.max(self.samples)), "samples": len(self.samples),
                "source": self.source}


@contextlib.contextmanager
def ray_worker_context(device: torch.device):
    """What the DeepSpeed stepper reads from Ray Train's worker context, for rank 0 of 1 on `device`: the real
    functions patched where Ray is installed, stand-in modules where it is not (a bare device machine)."""
    from unittest import mock

    context = types.SimpleNamespace(get_world_rank=lambda: 0, get_world_size=lambda: 1, get_local_rank=lambda: 0,
                                    get_local_world_size=lambda: 1)
    try:
        import ray.train
        import ray.train.torch
    except ImportError:
        stand_in = {name: types.ModuleType(name) for name in ("ray", "ray.train", "ray.train.torch")}
        stand_in["ray"].train, stand_in["ray.train"].torch = stand_in["ray.train"], stand_in["ray.train.torch"]
        stand_in["ray.train"].get_context, stand_in["ray.train.torch"].get_device = lambda: context, lambda: device
        with mock.patch.dict(sys.modules, stand_in):
            yield
        return
    with mock.patch.object(ray.train, "get_context", lambda: context), \
            mock.patch.object(ray.train.torch, "get_device", lambda: device):
        yield


def one_process_group(device: torch.device) -> None:
    """The process group a Ray Train worker has before the DeepSpeed engine is made (world 1), once per process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def make_stepper(way: str, cfg: TrainConfig, model: torch.nn.Module, device: torch.device, compile_backend: str):
    if way == "deepspeed_bf16":
        one_process_group(device)
        with ray_worker_context(device):
            return distributed.stepper(cfg, model, 1, device)
    stepper = distributed.stepper(cfg, model, 1, device)
    if way == "ddp_bf16_compile":
        stepper.model = torch.compile(stepper.model, backend=compile_backend)
    return stepper


def way_config(way: str, dataset: str, task_cfg: dict, model: str, model_config: dict, use_gpu: bool) -> TrainConfig:
    """The run's TrainConfig for one way: use_gpu as params' `train.use_gpu`, one worker."""
    backend = {"deepspeed_bf16": "deepspeed"}.get(way, "ddp")
    precision = {"ddp_fp32": "fp32", "ddp_bf16_compile": "bf16"}.get(way, "auto")  # DeepSpeed: bf16 where a GPU is
    return TrainConfig(**task_cfg, dataset=dataset, model=model, model_config=model_config, num_workers=1,
                       use_gpu=use_gpu, backend=backend, precision=precision, zero_stage=2)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(way: str, name: str, dataset: str, task, model_config: dict, args, device: torch.device,
            flops_cache: dict) -> dict:
    cfg = way_config(way, dataset, {"prepared": "", "inputs": {}, "batch_size": args.batch_size}, name, model_config,
                     device.type == "cuda")
    train = task.splits["train"]
    seed_everything(0)
    model = build_model(name, task.spec, model_config)
    params = sum(p.numel() for p in model.parameters())
    if (name, dataset) not in flops_cache:
        flops_cache[name, dataset] = count_flops(model, train, cfg.batch_size, device, args.flop_batches)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    stepper = make_stepper(way, cfg, model, device, args.compile_backend)
    warm = train.subset(range(min(len(train), cfg.batch_size * args.warmup_steps)))
    try:
        train_epoch(stepper, warm, cfg, 0, 0, 1)  # kernels picked, compiled graphs made, allocator grown
    except Exception as e:
        if way != "ddp_bf16_compile":
            raise
        return {"status": f"does not compile: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}",
                "params": params}
    synchronize(device)
    steps = utterances = epoch = 0
    with Utilisation(device.index or 0) if device.type == "cuda" else contextlib.nullcontext() as util:
        start = time.perf_counter()
        while steps < args.steps and time.perf_counter() - start < args.case_seconds:
            epoch += 1
            done = train_epoch(stepper, train, cfg, epoch, 0, 1)
            steps, utterances = steps + done["steps"], utterances + done["utterances"]
        synchronize(device)
        seconds = time.perf_counter() - start
    utt_s = utterances / seconds
    flops = flops_cache[name, dataset]
    out = {"status": "ok", "params": params, "precision": stepper.precision, "steps": steps, "seconds": seconds,
           "utterances_per_s": utt_s, "flops_per_utterance": flops, "achieved_tflops": utt_s * flops / 1e12}
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["gpu_utilisation"] = util.summary()
        peak = peak_bf16_tflops(torch.cuda.get_device_name(device))
        out["mfu"] = utt_s * flops / (peak * 1e12) if isinstance(peak, float) else "n/a (unknown peak)"
    else:
        out.update(peak_gpu_mb="n/a (cpu)", gpu_utilisation="n/a (cpu)", mfu="n/a (cpu)")
    engine = getattr(stepper, "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    return out


def cell(value, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "n/a"


def table(results: list[dict]) -> str:
    lines = ["| model | dataset | way | params | utt/s | steps | peak GPU MB | GPU util % | GFLOP/utt | MFU |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['dataset']} | {r['way']} | "
                         f"{cell(r.get('params', 0) / 1e6, '.2f')}M | {r['status']} ||||||")
            continue
        util = r["gpu_utilisation"]
        lines.append(f"| {r['model']} | {r['dataset']} | {r['way']} ({r['precision']}) | {r['params'] / 1e6:.2f}M | "
                     f"{r['utterances_per_s']:.0f} | {r['steps']} | {cell(r['peak_gpu_mb'], '.0f')} | "
                     f"{cell(util.get('mean') if isinstance(util, dict) else None, '.0f')} | "
                     f"{r['flops_per_utterance'] / 1e9:.4f} | "
                     f"{format(r['mfu'], '.2%') if isinstance(r['mfu'], float) else r['mfu']} |")
    return "\n".join(lines)


STAGE1 = "not run: needs Ray Train, the encoder's weights and MELD's prepared text (none on a bare device machine)"


def write_report(out: Path, results: list, skipped: list, *, device_name: str, peak, args, data: dict,
                 seconds: float) -> dict:
    """gpu.json and its table gpu.md, rewritten after every case: a check stopped by its time limit keeps its figures."""
    report = {"device": device_name, "peak_bf16_tflops": peak, "dry_run": args.dry_run, "torch": torch.__version__,
              "cuda": torch.version.cuda, "data": data, "batch_size": args.batch_size, "ways": args.ways,
              "seconds": seconds, "results": results, "skipped": skipped, "stage1": STAGE1}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    out.with_suffix(".md").write_text(f"device: {device_name}\n\n{table(results)}\n")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny widths, a few steps")
    parser.add_argument("--models", nargs="*", help="default: every registered model")
    parser.add_argument("--datasets", nargs="*", default=["iemocap", "meld"])
    parser.add_argument("--ways", nargs="*", default=list(WAYS), choices=WAYS)
    parser.add_argument("--data", choices=["auto", "prepared", "generated"], default="auto",
                        help="auto: data/prepared when there, else generated (--dry-run: generated)")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps timed per case (at most)")
    parser.add_argument("--case-seconds", type=float, default=6.0, help="timing per case (at most)")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--flop-batches", type=int, default=4)
    parser.add_argument("--budget", type=float, default=400.0, help="seconds for the whole run; later cases skipped")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/gpu.json (--dry-run: gpu_dry_run.json)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    if args.dry_run:
        args.steps, args.case_seconds, args.warmup_steps, args.flop_batches = 3, 5.0, 1, 1
        args.batch_size, args.compile_backend = 4, "eager"  # eager: Dynamo's tracing without minutes of codegen
        args.data = "generated" if args.data == "auto" else args.data
        device = torch.device("cpu")
        torch.manual_seed(0)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --dry-run on CPU")
        args.batch_size = None
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bf16_tflops(device_name) if device.type == "cuda" else "n/a (cpu)"
    out = args.out or ROOT / "benchmarks/results" / ("gpu_dry_run.json" if args.dry_run else "gpu.json")
    print(f"device: {device_name}; dense bf16 peak: {peak}{' TFLOP/s' if isinstance(peak, float) else ''}; "
          f"torch {torch.__version__}", flush=True)
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    params = load_params(ROOT / "params.yaml")
    args.batch_size = args.batch_size or params["train"]["batch_size"]
    names = args.models or sorted(MODELS)
    tiny = {}
    if args.dry_run:  # the model contract's tiny widths, kept in one place
        from tests.test_model_contract import TINY as tiny
    results, skipped, sources, flops_cache = [], [], {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        tasks = {}
        for dataset in args.datasets:
            tasks[dataset], sources[dataset] = load_dataset(dataset, params, args.data, Path(scratch), args.dry_run)
            t = tasks[dataset]
            print(f"{dataset}: {sources[dataset]}, {len(t.splits['train'])} training dialogues, "
                  f"{t.splits['train'].num_utterances} utterances, inputs {t.spec.input_dims}", flush=True)
        for way in args.ways:
            for name in names:
                for dataset in args.datasets:
                    row = {"model": name, "dataset": dataset, "way": way}
                    if args.dry_run and way == "ddp_bf16_compile" and dataset != args.datasets[0]:
                        continue  # the compile path is exercised on one dataset: Dynamo's tracing is the dry run's bulk
                    left = args.budget - (time.perf_counter() - began)
                    if left < args.case_seconds + 20:
                        skipped.append(f"{name} {dataset} {way}: {left:.0f} s of the budget left")
                        continue
                    config, case_began = tiny.get(name, {}) if args.dry_run else {}, time.perf_counter()
                    try:
                        row.update(measure(way, name, dataset, tasks[dataset], config, args, device, flops_cache))
                    except Exception as e:  # one case's failure is a result, not the end of the check
                        import traceback

                        traceback.print_exc()
                        row.update(status=f"failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
                                   if str(e).strip() else f"failed: {type(e).__name__}")
                    row["case_s"] = round(time.perf_counter() - case_began, 1)
                    results.append(row)
                    print(table([row]).splitlines()[-1], flush=True)
                    write_report(out, results, skipped, device_name=device_name, peak=peak, args=args, data=sources,
                                 seconds=time.perf_counter() - began)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    print(f"\ndevice: {device_name}\n" + table(results))
    report = write_report(out, results, skipped, device_name=device_name, peak=peak, args=args, data=sources,
                          seconds=time.perf_counter() - began)
    for line in skipped:
        print(f"skipped (budget): {line}")
    print(f"stage 1: {STAGE1}\nwrote {out} and its table {out.with_suffix('.md').name}")
    return report


if __name__ == "__main__":
    main()
