"""One line per run on the terminal while a stage trains: epoch k of n, validation wF1, best so far, time left.

The workers already log every epoch's metrics to the run in MLflow; the driver reads them back from there, so
progress needs no channel of its own and shows the same numbers the MLflow UI does. On a terminal each run is
a live bar; elsewhere (a log file, CI, `ray job logs`) a run prints a line when a new epoch is in and a minute
has passed since its last line (or its first epoch), and a line when it ends: a run under a minute gives one
line, a long one a line a minute.
"""

from __future__ import annotations

import sys
import threading
import time

POLL_SECONDS = 1.0
LOG_EVERY_SECONDS = 60.0  # not on a terminal: the least time between two lines of one running run


class RunProgress:
    def __init__(self, client, runs, stream=None, log_every: float = LOG_EVERY_SECONDS):
        self.client, self.runs = client, list(runs)
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.log_every = log_every
        self.logged: dict[str, tuple[float, int]] = {}  # run id: (when, epoch) of its last line, not live
        self.done: set[str] = set()
        self.bars = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        try:
            self.update()  # the final state of every run
        except Exception:  # never hide the error that ended the stage behind one of the store's
            pass
        for bar in self.bars.values():
            bar.close()

    def _poll(self):
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.update()
            except Exception:  # a busy store: the next poll will do
                pass

    def update(self) -> None:
        for position, cfg in enumerate(self.runs):
            if cfg.run_id in self.done:
                continue
            run = self.client.get_run(cfg.run_id)
            metrics = run.data.metrics
            if "epoch" not in metrics:
                continue
            line = describe(cfg, metrics, run.info.status)
            if self.live:
                self._bar(cfg, position).set_description_str(line, refresh=True)
            if run.info.status != "RUNNING":
                self.done.add(cfg.run_id)
                if not self.live:
                    print(line, file=self.stream, flush=True)
            elif not self.live:
                # a run's clock starts at its first epoch, so a seed that starts late is not printed at once
                when, epoch = self.logged.setdefault(cfg.run_id, (time.time(), metrics["epoch"]))
                if metrics["epoch"] > epoch and time.time() - when >= self.log_every:
                    self.logged[cfg.run_id] = (time.time(), metrics["epoch"])
                    print(line, file=self.stream, flush=True)

    def _bar(self, cfg, position: int):
        if cfg.run_id not in self.bars:
            from tqdm import tqdm

            self.bars[cfg.run_id] = tqdm(total=0, position=position, bar_format="{desc}", file=self.stream,
                                         leave=True)
        return self.bars[cfg.run_id]


def describe(cfg, metrics: dict, status: str) -> str:
    """`mosi/baseline/seed0  epoch 7/30  val wF1 71.2  best 73.0 (epoch 4)  ~12 s left` (or how it ended); under the
    paper protocol `epoch test wF1` (at the end, the last epoch's beside the best epoch's)."""
    epoch = int(metrics["epoch"]) + 1
    name = f"{cfg.dataset}/{cfg.model}/seed{cfg.seed}"
    watched = "epoch_test" if cfg.protocol == "paper" else "val"  # the paper protocol scores test every epoch
    best = metrics.get(f"best_{watched}_wf1", float("nan"))
    line = (f"{name}  epoch {epoch}/{cfg.epochs}  {watched.replace('_', ' ')} wF1 "
            f"{metrics.get(f'{watched}_wf1', float('nan')):.2f}  best {best:.2f}")
    if status == "RUNNING":
        per_epoch = metrics.get("train_seconds", 0.0) * 1.15  # validation adds roughly this much
        return f"{line}  ~{per_epoch * (cfg.epochs - epoch):.0f} s left at most"
    if "last_test_wf1" in metrics:  # the paper protocol: the line has the last epoch's and the best (selected) test
        return f"{line} (epoch {int(metrics['selected_epoch'])})  {status.lower()}"
    if "test_wf1" in metrics:
        line += (f" (epoch {int(metrics['selected_epoch'])})  test wF1 {metrics['test_wf1']:.2f}"
                 + (f"  Acc-2 {metrics['test_acc2']:.2f}" if "test_acc2" in metrics else ""))
    return f"{line}  {status.lower()}"
