"""`erc predict` on inputs a new user gives it (issue 34): peak resident memory, bytes printed, wall time.

    python benchmarks/predict_memory.py                                  # every case, erc-mosi-baseline-tuned@best
    python benchmarks/predict_memory.py --cases 10_long 2000_long        # some of them
    python benchmarks/predict_memory.py --model erc-meld-sdt/3 --tracking-uri sqlite:///elsewhere.db

Each case is a conversation generated in a temporary folder and given to `erc predict` as a user would, in its
own process, printing its table to a pipe that is only counted: `10_long` (10 utterances, one of them 1 MB of
text), `2000_long` (2,000 utterances, one of them 1 MB: the input that took 8.65 GB and printed 2.0 GB before),
`100k_short` (100,000 short utterances in dialogues of --turns turns; 0 turns: one dialogue). The peak RSS is the
child's own (os.wait4), the wall time includes Python's start and the model's load. Run it alone on the machine:
other jobs slow every figure. Figures go to benchmarks/results/predict_memory.json.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from erc.io import write_json  # noqa: E402

WORDS = ("well", "I", "can't", "believe", "you", "did", "that", "okay", "fine", "thanks", "really", "what", "no", "yes")
LONG = "and then the meeting went on for hours while everyone talked about the budget again. " * 12_000  # ~1 MB
CASES = {"10_long": (10, True), "2000_long": (2_000, True), "100k_short": (100_000, False)}


def conversation(path: Path, rows: int, long: bool, turns: int) -> Path:
    """`rows` utterances (speaker, text[, dialogue_id]); with `long`, the middle one is 1 MB of text."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["dialogue_id", "speaker", "text"] if turns else ["speaker", "text"])
        for i in range(rows):
            text = LONG if long and i == rows // 2 else " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 9))
            row = ["A" if i % 2 == 0 else "B", text]
            writer.writerow([f"d{i // turns}", *row] if turns else row)
    return path


def measure(command: list[str]) -> dict:
    """Run `command` with stdout to a pipe that is counted (not kept): bytes printed, peak RSS, wall, stderr's tail."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, cwd=ROOT,
                                env={**os.environ, "COLUMNS": "120"})
        printed = 0
        while block := proc.stdout.read(1 << 20):
            printed += len(block)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip().splitlines()
    return {"returncode": os.waitstatus_to_exitcode(status), "peak_rss_gb": usage.ru_maxrss / 1024 ** 2,
            "printed_bytes": printed, "wall_s": wall, "stderr_tail": stderr[-3:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="erc-mosi-baseline-tuned@best")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / 'mlflow.db'}")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--turns", type=int, default=20, help="utterances per dialogue in 100k_short (0: one dialogue)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_memory.json"))
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            rows, long = CASES[case]
            path = conversation(Path(tmp) / f"{case}.csv", rows, long, args.turns if case == "100k_short" else 0)
            command = [sys.executable, "-m", "erc.cli", "predict", str(path), "--model", args.model,
                       "--tracking-uri", args.tracking_uri]
            results[case] = {"rows": rows, "input_bytes": path.stat().st_size, **measure(command)}
            r = results[case]
            print(f"{case}: rc {r['returncode']}, {r['peak_rss_gb']:.2f} GB, {r['printed_bytes']:,} bytes, "
                  f"{r['wall_s']:.1f} s", file=sys.stderr, flush=True)
    print(f"\n{'input':<12} {'rows':>8} {'input':>9} {'peak RSS':>9} {'printed':>10} {'per row':>8} {'wall':>7}")
    for case, r in results.items():
        print(f"{case:<12} {r['rows']:>8,} {r['input_bytes'] / 1e6:>7.1f}MB {r['peak_rss_gb']:>7.2f}GB "
              f"{r['printed_bytes'] / 1e3:>8.0f}KB {r['printed_bytes'] / r['rows']:>7.0f}B {r['wall_s']:>6.1f}s"
              + ("" if r["returncode"] == 0 else f"  FAILED ({r['returncode']}): {' | '.join(r['stderr_tail'])}"))
    write_json(args.out, {"model": args.model, "tracking_uri": args.tracking_uri, "turns": args.turns,
                          "loadavg": os.getloadavg(), "cases": results})
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
