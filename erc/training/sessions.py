"""What the epoch loop needs from whoever runs it: its rank and world, its device, a checkpoint to restore, and
where to report. A train stage's worker group is Ray Train's (`RayTrainSession`); a single-worker search trial
runs the loop in its own process (`TuneSession`).
"""

from __future__ import annotations

from pathlib import Path

import torch


class RayTrainSession:
    """What the loop needs from Ray Train: rank, the checkpoint to restore, and reporting a checkpoint.

    A train-stage run (`evaluate_test`) reports only its checkpoints (its metrics go to MLflow directly) and ends
    each seed with the one look at test. A search's multi-worker trial reports every epoch to Tune instead.
    """

    checkpoints = True

    def __init__(self, evaluate_test: bool = True):
        import ray
        import ray.train
        import ray.train.torch

        self._train = ray.train
        self.evaluate_test = evaluate_test
        self.report_every_epoch = not evaluate_test
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        if ray.is_initialized():
            self.device = ray.train.torch.get_device()
            self.node = ray.get_runtime_context().get_node_id()
        else:  # Ray Train's local mode (num_workers 0): this process, no cluster
            self.device = torch.device(f"cuda:{context.get_local_rank()}" if torch.cuda.is_available() else "cpu")
            self.node = "local"

    def restored(self):
        return self._train.get_checkpoint()

    def report(self, metrics: dict, directory: Path | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(str(directory)) if directory is not None else None
        self._train.report(metrics, checkpoint=checkpoint)

class TuneSession:
    """A single-worker Tune trial runs the same loop in its own process, with no nested worker group: every
    epoch's metrics go to Tune (ASHA decides on them); no checkpoints (an interrupted trial starts again) and no
    test (a search scores on validation only)."""

    checkpoints = evaluate_test = False
    report_every_epoch = True
    rank, world = 0, 1

    def __init__(self, use_gpu: bool = False):
        import ray

        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.node = ray.get_runtime_context().get_node_id()

    def restored(self):
        return None

    def report(self, metrics: dict, directory: Path | None) -> None:
        from ray import tune

        tune.report(metrics)
