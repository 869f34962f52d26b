"""Where a run's seconds go: per phase (`time_<phase>_s` metrics in MLflow; benchmarks/overhead.py reads them), and
imports started early in a thread."""

from __future__ import annotations

import contextlib
import time


def import_in_background(*modules: str) -> None:
    """Start importing `modules` in a thread; a later `import` of them waits for it rather than starting over."""
    import importlib
    import threading

    threading.Thread(target=lambda: [importlib.import_module(m) for m in modules], daemon=True).start()

class Clock:
    """Seconds spent per phase of a run (`time_<phase>_s` metrics in MLflow; benchmarks/overhead.py reads them)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def metrics(self) -> dict[str, float]:
        return {f"time_{k}_s": v for k, v in self.seconds.items()}
