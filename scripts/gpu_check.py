"""The GPU readiness check (docs/benchmarks.md, "GPU check"): correctness tests on CUDA, then the speed figures,
printed as one table. Needs one CUDA GPU, the repository and pip packages only (no dataset, no network).

    bash scripts/gpu_check.sh          # on a GPU machine: about 6 minutes
    bash scripts/gpu_check.sh --dry    # the same steps at toy sizes on the CPU (what the test suite runs)
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    command: list[str]
    pattern: str            # the output line that holds the figure
    goal: str = ""
    env: dict[str, str] | None = None


def steps(dry: bool) -> list[Step]:
    py = sys.executable
    device = "cpu" if dry else "cuda"
    train = ["--model", "resnet8", "--batch", "16", "--steps", "2", "--warmup", "1", "--images", "64",
             "--workers", "1"] if dry else ["--model", "resnet56", "--batch", "256", "--steps", "60", "--warmup", "10"]
    collect = ["--model", "resnet20", "--num-images", "16", "--batch-size", "8", "--repeats", "1"] if dry else \
        ["--model", "resnet56", "--num-images", "512", "--batch-size", "128", "--repeats", "3"]
    jobs = ["--jobs", "1", "2", "--dry"] if dry else ["--jobs", "1", "2", "4", "8"]
    return [
        Step("CUDA tests (tests/test_cuda.py)", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                 "tests/test_cuda.py"],
             r"\d+ passed.*", env={"QSFM_TEST_DEVICE": device}),
        Step("training img/s, device path vs DataLoader+PIL (bf16, channels_last)",
             [py, "scripts/bench_train.py", "--device", device, "--amp", "bf16", *train],
             r"device / torchvision:.*", goal=">= 3x"),
        Step("same, torch.compile", [py, "scripts/bench_train.py", "--device", device, "--amp", "bf16",
                                     "--compile", *train], r"device / torchvision:.*", goal=">= 3x"),
        Step("collect + score vs bare forward (qsfm, ssim)",
             [py, "scripts/bench_collect.py", "--device", device, *collect], r"ratio .*", goal="<= 3x on GPU"),
        Step("aggregate fine-tuning img/s, N jobs sharing one GPU",
             [py, "scripts/bench_jobs_per_gpu.py", "--device", device, *jobs], r"aggregate: .*"),
    ]


def run(step: Step) -> tuple[str, str, float]:
    start = time.perf_counter()
    proc = subprocess.run(step.command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(step.env or {})})
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    found = re.findall(step.pattern, output)
    if proc.returncode != 0 or not found:
        tail = " | ".join(output.strip().splitlines()[-3:])
        return "FAILED", f"exit {proc.returncode}: {tail[-300:]}", seconds
    return "ok", " / ".join(f.strip() for f in found), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="toy sizes on the CPU")
    args = parser.parse_args()
    if not args.dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; accepted: a machine with one CUDA GPU, or --dry on the CPU",
                  file=sys.stderr)
            return 2
    rows = []
    for step in steps(args.dry):
        status, figure, seconds = run(step)
        rows.append((step.name, status, figure, step.goal, seconds))
        print(f"[{status}] {step.name} ({seconds:.0f} s)", flush=True)
    print("\n| step | status | measured | goal | s |\n|---|---|---|---|---|")
    for name, status, figure, goal, seconds in rows:
        print(f"| {name} | {status} | {figure} | {goal} | {seconds:.0f} |")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
