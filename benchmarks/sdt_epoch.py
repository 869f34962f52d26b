"""SDT seconds per epoch at the paper's widths on MOSI: the implementation of a base commit against the current one.

    python benchmarks/sdt_epoch.py                      # 5 timed epochs each, after one warm-up epoch
    python benchmarks/sdt_epoch.py --epochs 3 --base <commit>
    python benchmarks/sdt_epoch.py --profile after      # torch.profiler table of one epoch (self CPU time)
    python benchmarks/sdt_epoch.py --precision bf16     # "after" under bf16 autocast (train.precision=bf16)

An epoch is one training pass (AdamW, gradient clipping as erc.training.distributed), one validation pass and one test pass
(inference_mode), batch 16 dialogues, hidden 1024, ff 1024, 8 heads, dropout 0.5 (SDTConfig's defaults).
"before" is erc/models/sdt.py and blocks.py as of `--base` (read with `git show`), "after" the working tree. Both
models start from the same weights (the "before" state dict loaded into "after") and see the same batches and seeds.
Their epochs run interleaved step by step (a step: one training batch, or one inference batch), alternating which
goes first, so that load from other processes on the machine hits both alike; an epoch's time is the sum of its
steps. Reported: medians over the epochs of wall-clock and process CPU seconds.
Needs data/prepared/mosi (`dvc repro prepare@mosi`). Figures go to benchmarks/results/sdt_epoch.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402
from erc.models import MODELS, build_model  # noqa: E402
from erc.params import load_params  # noqa: E402
from erc.training.config import configs_from_params  # noqa: E402
from erc.training.task import load_task  # noqa: E402

BASE = "acf2b0bd25e3e5a5a5f991e9b71624033584b249"  # main before the SDT speed-up (issue 9)
PAPER_WIDTHS = {"hidden": 1024, "ff_dim": 1024, "heads": 8, "dropout": 0.5}
BATCH_SIZE = 16


def module_from_git(commit: str, path: str, name: str) -> types.ModuleType:
    """Execute `path` as of `commit` as a fresh module called `name`."""
    source = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{commit[:10]}:{path}"
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


@contextlib.contextmanager
def swapped_module(name: str, module: types.ModuleType):
    saved = sys.modules[name]
    sys.modules[name] = module
    try:
        yield
    finally:
        sys.modules[name] = saved


def sdt_at(commit: str) -> type:
    """The SDT class of `commit`, built on that commit's blocks; the registry keeps the current SDT."""
    blocks = module_from_git(commit, "erc/models/blocks.py", "sdt_base_blocks")
    current = MODELS["sdt"]
    with swapped_module("erc.models.blocks", blocks):
        sdt = module_from_git(commit, "erc/models/sdt.py", "sdt_base")
    MODELS["sdt"] = current
    return sdt.SDT


def load_mosi():
    params = load_params(ROOT / "params.yaml")
    (cfg,) = configs_from_params(params, "mosi", "sdt", seeds=[0])
    cfg.prepared, cfg.feature_dirs = str(ROOT / cfg.prepared), [str(ROOT / d) for d in cfg.feature_dirs]
    return cfg, load_task(cfg, splits=("train", "valid", "test"))


def epoch_batches(task, epoch: int) -> dict[str, list]:
    """The epoch's batches, collated once and shared by both implementations."""
    return {"train": list(task.splits["train"].batches(BATCH_SIZE, shuffle=True, seed=epoch)),
            "valid": list(task.splits["valid"].batches(BATCH_SIZE)),
            "test": list(task.splits["test"].batches(BATCH_SIZE))}


def epoch_steps(model, optimizer, batches: dict[str, list], grad_clip: float, dtype=None) -> list:
    """One epoch as steps: a training step per training batch (forward, backward, clipping, AdamW), then
    inference on each validation and test batch. `dtype` (bf16): forward passes under autocast, as
    train.precision=bf16 runs them (weights and optimizer state stay fp32)."""

    def forward(batch):
        with contextlib.nullcontext() if dtype is None else torch.autocast("cpu", dtype=dtype):
            return model(batch)

    def train(batch):
        model.train()
        forward(batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.inference_mode()
    def infer(batch):
        model.eval()
        forward(batch)

    return ([functools.partial(train, b) for b in batches["train"]]
            + [functools.partial(infer, b) for b in batches["valid"] + batches["test"]])


def timed(step) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step."""
    wall, cpu = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - wall, time.process_time() - cpu


def build_pair(base: str, spec) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    before = sdt_at(base)(sdt_at(base).Config(**PAPER_WIDTHS), spec)
    after = build_model("sdt", spec, PAPER_WIDTHS)
    after.load_state_dict(before.state_dict())
    return {"before": before, "after": after}


def max_output_difference(models: dict, batch) -> float:
    with torch.inference_mode():
        a, b = (m.eval()(batch).logits for m in models.values())
    return (a - b)[batch.mask].abs().max().item()


def profile(steps: list, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds = sum(timed(step)[0] for step in steps)
    print(f"one epoch under the profiler: {seconds:.1f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def interleaved_epoch(steps: dict[str, list], epoch: int) -> dict[str, tuple[float, float]]:
    """Both implementations' epochs, step by step in alternating order, so that load on the machine hits both
    alike; each step seeded by (epoch, step). Returns (wall, CPU) seconds per implementation."""
    totals = {k: [0.0, 0.0] for k in steps}
    for i, pair in enumerate(zip(*steps.values())):
        order = list(zip(steps, pair))
        for k, step in order if i % 2 == 0 else order[::-1]:
            torch.manual_seed(1000 * epoch + i)
            wall, cpu = timed(step)
            totals[k][0] += wall
            totals[k][1] += cpu
    return {k: tuple(v) for k, v in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per implementation")
    parser.add_argument("--base", default=BASE, help="commit whose sdt.py and blocks.py are 'before'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--profile", choices=["before", "after"], help="profile one epoch instead of timing")
    parser.add_argument("--rows", type=int, default=30, help="profiler table rows")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="'after' under bf16 autocast (train.precision=bf16); 'before' stays fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = subprocess.run(["git", "rev-parse", args.base], cwd=ROOT, check=True, capture_output=True,
                          text=True).stdout.strip()

    cfg, task = load_mosi()
    models = build_pair(base, task.spec)
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
                  for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert params["before"] == params["after"], params
    difference = max_output_difference(models, task.splits["test"].collate(range(len(task.splits["test"]))))
    print(f"base {base}; parameters {params['after'] / 1e6:.2f}M each; largest test-logit difference "
          f"after vs before {difference:.2e}")

    if args.profile:
        steps = epoch_steps(models[args.profile], optimizers[args.profile], epoch_batches(task, 0), cfg.grad_clip)
        for step in steps:  # warm-up
            step()
        profile(steps, args.rows)
        return

    after_dtype = torch.bfloat16 if args.precision == "bf16" else None
    wall, cpu = {k: [] for k in models}, {k: [] for k in models}
    for epoch in range(args.epochs + 1):  # epoch 0 warms up
        batches = epoch_batches(task, epoch)
        seconds = interleaved_epoch({k: epoch_steps(m, optimizers[k], batches, cfg.grad_clip,
                                                 dtype=after_dtype if k == "after" else None)
                                     for k, m in models.items()}, epoch)
        for k, (w, c) in seconds.items():
            if epoch:
                wall[k].append(w)
                cpu[k].append(c)
        print(f"epoch {epoch}{' (warm-up)' if not epoch else ''}: "
              + ", ".join(f"{k} {w:.2f} s (CPU {c:.2f} s)" for k, (w, c) in seconds.items()), flush=True)

    median = {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in models}
    ratio = median["after"][0] / median["before"][0]
    cpu_ratio = median["after"][1] / median["before"][1]
    print(f"\n{'':8s} {'s/epoch':>8s} {'CPU s/epoch':>12s} {'parameters':>12s}   (medians of {args.epochs} epochs)")
    for k in models:
        print(f"{k:8s} {median[k][0]:8.2f} {median[k][1]:12.2f} {params[k]:12,d}")
    print(f"{'ratio':8s} {ratio:8.3f} {cpu_ratio:12.3f}   after ({args.precision})/before (fp32), "
          f"{args.threads} threads, base {base[:10]}")
    write_json(ROOT / "benchmarks/results/sdt_epoch.json", {
        "base_commit": base, "threads": args.threads, "after_precision": args.precision, "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "params": params["after"], "max_logit_difference": difference,
        "ratio_after_before": ratio, "cpu_ratio_after_before": cpu_ratio,
        **{f"{k}_s_per_epoch": median[k][0] for k in models}, **{f"{k}_cpu_s_per_epoch": median[k][1] for k in models},
        **{f"{k}_epochs_s": wall[k] for k in models}, **{f"{k}_epochs_cpu_s": cpu[k] for k in models}})


if __name__ == "__main__":
    main()
