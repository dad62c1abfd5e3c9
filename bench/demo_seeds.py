"""`make demo` over several seeds on a fresh clone, and an older commit's demo in the same sitting for the ratio.

    python bench/demo_seeds.py --seeds 1 2 3 4 5 --baseline 5e847f0

Clones this checkout's HEAD (and `--baseline`'s commit) into `--work`, runs `make setup` in each first (not
timed: the demo is timed with `.venv` present), then per seed `rm -rf saved_models/demo; make demo DEMO_SEED=N`,
timing the whole command. The baseline runs its own `make demo` once (commits before DEMO_SEED use their default
seed). Per run: wall time, make's own timing line, test accuracy and ROC-AUC, fine-tuning epochs run, and every
export format's figures with whether it passed. Nothing else should run on the machine meanwhile. Writes
bench/results/demo_seeds.json and prints the table and the ratio of the mean wall time to the baseline's.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from classifier.run import Run  # noqa: E402  (the run folder's owner: no file name of it is spelled here)

RESULTS = ROOT / "bench" / "results" / "demo_seeds.json"
MAKE_LINE = re.compile(r"make demo: training (\d+) s, export (\d+) s, total (\d+) s")


def clone(commit: str, folder: Path) -> Path:
    """A fresh clone of this checkout at `commit`, with its .venv made (not timed)."""
    if folder.exists():
        shutil.rmtree(folder)
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "--quiet", commit], check=True)
    # The shared folder beside the checkout (datasets of some benchmarks) is found as ../shared from the clone.
    shared = folder.parent / "shared"
    if not shared.exists() and (ROOT.parent / "shared").exists():
        shared.symlink_to(ROOT.parent / "shared")
    subprocess.run(["make", "setup"], cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return folder


def run_demo(folder: Path, seed: int | None, log: Path) -> dict:
    """One timed `make demo` in `folder`; its figures read from the run folder it wrote."""
    shutil.rmtree(folder / "saved_models" / "demo", ignore_errors=True)
    command = ["make", "demo"] + ([f"DEMO_SEED={seed}"] if seed is not None else [])
    started = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=folder, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    text = log.read_text(errors="replace")
    timing = MAKE_LINE.search(text)
    row = {
        "seed": seed,
        "command": " ".join(command),
        "exit": code,
        "wall_seconds": round(wall, 1),
        "make_line": dict(zip(("training", "export", "total"), map(int, timing.groups()), strict=True))
        if timing
        else None,
        "log": str(log),
    }
    run = Run(folder / "saved_models" / "demo")
    if run.is_finished():
        test = run.read_metrics()["test"]
        row["test"] = {key: test.get(key) for key in ("accuracy", "auc", "balanced_accuracy")}
    if run.history_path.exists():
        with run.history_path.open() as handle:
            phases = [entry.get("phase") for entry in csv.DictReader(handle)]
        row["finetune_epochs_run"] = phases.count("2")
    if run.export_report_path.exists():
        report = json.loads(run.export_report_path.read_text())
        row["export_passed"] = not report.get("failures")
        row["formats"] = report.get("formats")
    return row


def describe(row: dict) -> str:
    test = row.get("test") or {}
    formats = row.get("formats") or {}
    int8 = formats.get("int8") or {}
    interval = int8.get("accuracy_drop_ci95")
    drop = (
        f"{100 * int8['accuracy_drop']:+.2f} [{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]" if interval else "-"
    )
    return (
        f"{str(row['seed']):>6s} {row['wall_seconds'] / 60:7.2f} min  exit {row['exit']}  "
        f"accuracy {test.get('accuracy', float('nan')):.3f}  AUC {test.get('auc') or float('nan'):.3f}  "
        f"fine-tuning epochs {row.get('finetune_epochs_run', '-')}  int8 drop {drop}  "
        f"every format passed: {'yes' if row.get('export_passed') else 'NO'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=[1, 2, 3, 4, 5], help="none: baseline only")
    parser.add_argument("--baseline", help="an older commit whose `make demo` is timed in the same sitting")
    parser.add_argument("--work", default="/tmp/demo-seeds", help="folder for the clones")
    parser.add_argument("--machine", default=platform.processor() or platform.machine(), help="for the record")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.seeds:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
        folder = clone("HEAD", work / "head")
        runs = []
        for seed in args.seeds:
            runs.append(run_demo(folder, seed, work / f"demo-seed{seed}.log"))
            print(describe(runs[-1]), flush=True)
        result = {
            "machine": args.machine,
            "date": date.today().isoformat(),
            "commit": head.stdout.strip(),
            "how": "python bench/demo_seeds.py: one fresh clone, `make setup` first (not timed), then per seed: "
            "rm -rf saved_models/demo; make demo DEMO_SEED=N",
            "runs": runs,
        }
    elif RESULTS.exists():  # --seeds with no seed: add a baseline to the seeds measured before
        result = json.loads(RESULTS.read_text())
        runs = result["runs"]
    else:
        raise SystemExit(f"no seeds given and no {RESULTS} to add a baseline to")
    if args.baseline:
        baseline = clone(args.baseline, work / "baseline")
        result["baseline"] = {"commit": args.baseline, **run_demo(baseline, None, work / "demo-baseline.log")}
        print(f"baseline {args.baseline}: " + describe(result["baseline"]), flush=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    walls = [row["wall_seconds"] for row in runs]
    accuracies = [row["test"]["accuracy"] for row in runs if row.get("test")]
    passed = sum(bool(row.get("export_passed")) and row["exit"] == 0 for row in runs)
    print(f"\n{len(runs)} demos: {passed} passed every format; wall {statistics.mean(walls) / 60:.2f} min mean")
    if len(accuracies) > 1:
        print(f"test accuracy {statistics.mean(accuracies):.3f} ± {statistics.stdev(accuracies):.3f}")
    if args.baseline:
        ratio = statistics.mean(walls) / result["baseline"]["wall_seconds"]
        print(f"mean wall time / baseline {args.baseline}'s: {ratio:.2f}x")
    return 0 if passed == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
