"""Where should a new class's head channel start? The demo's novel pancreas, zero start vs p = 0.01 (CPU).

WORKDIR is a finished default demo (nnUNetv2_fseft_demo --workdir WORKDIR): its foundation (MultiTalentTrainer_demo)
and its target (PhantomScannerB: liver, a class the foundation knows, and pancreas, a class it never saw) with the
K = 1 and K = 5 folds, whose val set is the demo's 6 query cases. The published table used a work dir of the
demo's 32³ phantoms of the time (pancreas ~70 voxels); today's demo writes 24³ at 2 mm. Every cell trains one fold
with the demo's adaptation schedule of the time (3 x 40 iterations, no mirroring) and -pretrained_weights the
foundation, and is scored by nnU-Net's final validation on the query cases. Two starts for the fresh head
channels, paired (same seed, same supports, augmentation in-process):
  zero   weights and bias zero: the pancreas starts tied with background (p = 0.5 where the liver is absent)
  prior  weights zero, bias logit(0.01): the pancreas starts at p = 0.01 (the FSEFT trainers' start)
Decoder + LoRA at seeds 0 and 1, full fine-tuning at seed 0; two cells at a time, one torch thread each.

  python benchmarks/new_class_start.py WORKDIR [--results DIR]

The one hippocampus pair in docs/results.md ran by hand: benchmarks/results/new_class_start_NOTES.md.

Writes RESULTS/new_class_start_cpu.{md,csv}; a cell whose validation/summary.json exists is not trained again.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_env import HERE, provenance

TARGET, FOUNDATION = "Dataset520_PhantomScannerB", "Dataset510_PhantomFoundation"
CELLS = [(trainer, k, seed, start)
         for trainer, seeds in (("FSEFTDecoderLoRATrainer", (0, 1)), ("FSEFTFullFTTrainer", (0,)))
         for seed in seeds for k in (1, 5) for start in ("zero", "prior")]
STEM = "new_class_start_cpu"


def environment(work: Path, seed: int) -> dict:
    from nnunetv2_fseft.demo.workdir import Workdir, nnunet_env
    env = {**os.environ, **nnunet_env(Workdir(work))}
    env.update(nnUNet_extTrainer=os.pathsep.join([env["nnUNet_extTrainer"], str(HERE / "ext")]),
               nnUNet_fseft_seed=str(seed), FSEFT_DEMO_TORCH_THREADS="1")
    return env


def run_cell(work: Path, folds: dict, cell: tuple) -> dict:
    trainer, k, seed, start = cell
    name = f"{trainer}_demo_{start}"
    # one results folder per seed: nnU-Net's folder names carry trainer, plans and configuration only
    results = work / "new_class_start" / f"seed{seed}"
    fold = results / TARGET / f"{name}__nnUNetPlans__3d_fullres" / f"fold_{folds[k]}"
    summary = fold / "validation" / "summary.json"
    if not summary.is_file():
        checkpoint = (work / "nnUNet_results" / FOUNDATION / "MultiTalentTrainer_demo__nnUNetPlans__3d_fullres"
                      / "fold_0" / "checkpoint_final.pth")
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), TARGET, "3d_fullres", str(folds[k]), "-tr", name,
               "-p", "nnUNetPlans", "-device", "cpu", "-pretrained_weights", str(checkpoint)]
        env = dict(environment(work, seed), nnUNet_results=str(results))
        t0 = time.time()
        fold.mkdir(parents=True, exist_ok=True)
        with open(fold.parent / f"train_fold{folds[k]}.log", "w") as log:
            r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if r.returncode:
            sys.exit(f"failed: {' '.join(cmd)} (see {log.name})")
        (fold / "wall_time_s.txt").write_text(f"{time.time() - t0:.1f}\n")  # kept for a later re-publish
    timing = fold / "wall_time_s.txt"
    wall = float(timing.read_text()) if timing.is_file() else None
    labels = json.loads((work / "nnUNet_raw" / TARGET / "dataset.json").read_text())["labels"]
    mean = json.loads(summary.read_text())["mean"]
    dice = {organ: mean[str(value)]["Dice"] for organ, value in labels.items() if organ != "background"}
    row = {"trainer": trainer, "k": k, "seed": seed, "start": start, **dice, "wall_s": wall}
    print(json.dumps(row), flush=True)
    return row


def publish(results: Path, rows: list, command: str) -> None:
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{STEM}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["trainer", "k", "seed", "start", "liver", "pancreas", "wall_s"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "wall_s": "" if r["wall_s"] is None else round(r["wall_s"])})
    by = {(r["trainer"], r["k"], r["seed"], r["start"]): r for r in rows}
    lines = ["# A new class's head start: zero (tied with background) vs p = 0.01", "",
             *provenance(command, "the demo's phantoms; paired cells, see the script's docstring."),
             "| trainer | K | seed | pancreas: zero | pancreas: p = 0.01 | liver: zero | liver: p = 0.01 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for trainer, k, seed, start in CELLS:
        if start != "zero":
            continue
        z, p = by[(trainer, k, seed, "zero")], by[(trainer, k, seed, "prior")]
        lines.append(f"| {trainer} | {k} | {seed} | {z['pancreas']:.3f} | {p['pancreas']:.3f} | {z['liver']:.3f} | "
                     f"{p['liver']:.3f} |")
    (results / f"{STEM}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--results", type=Path, default=HERE / "results")
    a = p.parse_args()
    work = a.workdir.resolve()
    splits = json.loads((work / "steps" / "target.json").read_text())
    folds = {f["k"]: f["fold"] for f in splits["folds"]}
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda c: run_cell(work, folds, c), CELLS))
    publish(a.results, rows, "python benchmarks/new_class_start.py " + " ".join(sys.argv[1:]))
    print((a.results / f"{STEM}.md").read_text())


if __name__ == "__main__":
    main()
