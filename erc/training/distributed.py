"""How one training step is spread over Ray Train workers: DDP over gloo/NCCL, or a DeepSpeed engine.

Both steppers offer the same five things to the epoch loop in `erc.training.loop`: `module` (the bare model),
`autocast()`, `backward(loss, sync)`, `step()`, and `save(directory)` / `load(directory)` of the state
a restarted run needs. The DeepSpeed config is generated from `TrainConfig`, never kept as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

DEEPSPEED_TAG = "state"  # the one DeepSpeed checkpoint inside each Ray checkpoint


def backend(cfg) -> str:
    """`auto`: DeepSpeed on GPU workers; DDP on CPU, and plain torch in Ray Train's local mode (0 workers)."""
    if cfg.backend == "auto":
        return "deepspeed" if cfg.use_gpu and cfg.num_workers else "ddp"
    if cfg.backend == "deepspeed" and not cfg.num_workers:
        raise ValueError("train.backend deepspeed needs train.num_workers >= 1 (0 runs in this process, plain torch)")
    return cfg.backend


def precision(cfg, device) -> str:
    """`auto`: bf16 where the run asked for GPUs and its worker has one, else fp32 (CPU bf16 kernels are slower than
    fp32 on most machines): by the device, never by the flag alone; and not by the device alone either, since local
    mode takes a GPU where torch sees one whatever the flag, and default params stay fp32 there as they were."""
    if cfg.precision == "auto":
        return "bf16" if cfg.use_gpu and torch.device(device).type == "cuda" else "fp32"
    return cfg.precision


def deepspeed_config(cfg, world: int, device="cpu") -> dict:
    """The DeepSpeed config for this run. Batches here are dialogues; DeepSpeed's batch fields only have to be
    consistent (train_batch_size = micro x accumulation x world), since erc feeds the engine itself. `device`: the
    worker's, which decides precision `auto`."""
    micro = max(1, cfg.batch_size // (world * cfg.grad_accum_steps))
    config = {
        "train_batch_size": micro * cfg.grad_accum_steps * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.grad_clip or 0.0,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed's CPU Adam (compiled on first use) replaces the torch optimizer when offloading.
        # DeepSpeed's Adam is AdamW unless told otherwise (adam_w_mode defaults to True)
        config["optimizer"] = {"type": "Adam", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                          "adam_w_mode": cfg.optimizer == "adamw"}}
    mode = precision(cfg, device)
    if mode == "bf16":
        config["bf16"] = {"enabled": True}
    elif mode == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def gather(obj) -> list:
    """`obj` from every worker, in rank order (just `[obj]` outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def make_optimizer(cfg, parameters, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay), or Adam with the decay as an L2 term of the gradient (the official code of
    SDT and of most ERC papers). `fused`: one kernel over all the parameters instead of a few small ops per tensor
    (the same update up to float rounding; 5x faster on CPU for the models here, whose ~250 tensors are small)."""
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(parameters, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


class DDPStepper:
    """Plain torch: one worker's model on its device, or several under Ray's `prepare_model` (DDP); Adam(W)."""

    def __init__(self, cfg, model: torch.nn.Module, world: int, device: torch.device):
        self.cfg, self.world = cfg, world
        self.precision = precision(cfg, device)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16}.get(self.precision, "unsupported")
        if self.dtype == "unsupported":
            raise ValueError(f"precision {self.precision!r} needs the deepspeed backend (loss scaling)")
        self.device = device
        if world > 1:
            import ray.train.torch

            # Some experts get no gradient on some batches (a missing modality, an unrouted expert).
            self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
        else:  # also outside Ray Train: a Tune trial runs the loop in its own process
            self.model = model.to(device)
        self.module = self.model.module if hasattr(self.model, "module") else self.model
        self.optimizer = make_optimizer(cfg, self.model.parameters(), fused=True)
        self.input_dtype = None  # weights stay fp32; bf16 runs under autocast

    def __call__(self, batch):
        return self.model(batch)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss, sync: bool) -> None:
        no_sync = self.model.no_sync if (not sync and hasattr(self.model, "no_sync")) else contextlib.nullcontext
        with no_sync():
            loss.backward()

    def step(self) -> None:
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, directory: Path, rank: int) -> None:
        if rank == 0:
            torch.save({"optimizer": self.optimizer.state_dict()}, directory / "optimizer.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "optimizer.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])


class DeepSpeedStepper:
    """A DeepSpeed engine (ZeRO stage, precision, accumulation and clipping from `deepspeed_config`)."""

    def __init__(self, cfg, model: torch.nn.Module, world: int):
        if not cfg.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        # DeepSpeed reads the launcher's variables; Ray has set up the process group and MASTER_* already.
        os.environ.update(RANK=str(context.get_world_rank()), WORLD_SIZE=str(world),
                          LOCAL_RANK=str(context.get_local_rank()),
                          LOCAL_WORLD_SIZE=str(context.get_local_world_size()))
        self.cfg = cfg
        device = ray.train.torch.get_device()  # the worker's GPU where Ray gave it one (use_gpu), else the CPU
        self.config = deepspeed_config(cfg, world, device)
        optimizer = None
        if "optimizer" not in self.config:
            # A torch optimizer avoids compiling DeepSpeed's fused Adam (about a minute on CPU).
            optimizer = make_optimizer(cfg, model.parameters())
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config,
                                               dist_init_required=False)
        self.module = self.engine.module
        self.device = self.engine.device
        self.precision = precision(cfg, device)
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.accumulation = cfg.grad_accum_steps

    def __call__(self, batch):
        return self.engine(batch)

    def autocast(self):
        return contextlib.nullcontext()  # the engine holds the weights in the chosen precision

    def backward(self, loss, sync: bool) -> None:
        # The engine divides by the accumulation steps itself; erc's loss weights already sum to the mean.
        self.engine.backward(loss * self.accumulation)
        # The engine counts micro-batches and only updates at the accumulation boundary (`sync`).
        self.engine.step()

    def step(self) -> None:
        pass  # done by `backward` at the boundary

    def save(self, directory: Path, rank: int) -> None:
        # Every rank writes its ZeRO partition; Ray gathers all ranks' files into one checkpoint directory.
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, directory: Path) -> None:
        self.engine.load_checkpoint(str(directory / "deepspeed"), tag=DEEPSPEED_TAG)


def stepper(cfg, model: torch.nn.Module, world: int, device: torch.device):
    return DeepSpeedStepper(cfg, model, world) if backend(cfg) == "deepspeed" else DDPStepper(cfg, model, world, device)


def describe(cfg, world: int) -> dict:
    """What the run's MLflow params record about distribution, from the driver (the worker adds `in_use`)."""
    return {"backend": backend(cfg), "world_size": world}


def in_use(stepper) -> dict:
    """What a worker's stepper does on the device it has (precision `auto` resolved), for the run's params: written
    by the worker, since only it knows its device."""
    info = {"precision": stepper.precision}
    if backend(stepper.cfg) == "deepspeed":
        info["deepspeed_config"] = json.dumps(stepper.config, sort_keys=True)
    return info
