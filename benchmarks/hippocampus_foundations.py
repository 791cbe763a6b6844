"""What an encoder-only foundation costs (hippocampus, novel class, K = 1 and 5, seed 0, tiny plans, CPU).

Foundation: hippocampus_common.posterior_foundation (stock nnU-Net, tiny preset, 1,000 iterations, split 'B',
Posterior only). Target: Anterior only; supports drawn by nnunetv2_fseft's few-shot splits (K = 1 and 5,
seed 0) from the non-query cases; scored by nnU-Net's final validation on the 50 fixed query cases of
hippocampus_split.json, which no training sees. Three starts, on the same supports and query cases:
  model    the foundation's model folder (-pretrained_weights fold_0/checkpoint_final.pth): encoder, decoder, head
  encoder  the same network's encoder written as an nnssl-layout checkpoint (what a self-supervised foundation
           gives): encoder and stem load, decoder and head start fresh
  scratch  stock nnU-Net from random initialisation on the same schedule (FSEFTScratchTrainer)
Methods: FSEFTDecoderLoRATrainer and FSEFTFullFTTrainer from 'model' and 'encoder'.

  python benchmarks/hippocampus_foundations.py WORKDIR [--results DIR] [--report]

Resumable: a cell whose validation/summary.json exists is not trained again; a cell that fails is tried again
after RETRY_AFTER_S while other cells remain, and on the next run. The 'encoder' cells need the nnssl writer of
tests/foundation_files.py; without it they are skipped (and listed as missing) and a later run adds them.
The 'encoder' target is prepared from the nnssl checkpoint by nnUNetv2_fseft_prepare_target; where that command
refuses a checkpoint, it is prepared with the model folder's plans (the same network) and the table says so.
Tables: RESULTS/hippocampus_foundations_cpu.{md,csv}, rewritten after every cell.
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench_env
from hippocampus_common import HERE, SOURCE, SPLIT, posterior_foundation, setup_env

KS, SEED = (1, 5), 0
METHODS = ("FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer")
SCRATCH = "FSEFTScratchTrainer"
TARGETS = {"model": (114, "HippoAnteriorFromModel"), "encoder": (115, "HippoAnteriorFromEncoder")}
# (start, trainer, K) by priority, for a CPU that may finish only some: K = 5 first (the protocol's main budget), the
# encoder-only cells before their model-folder twins, full FT on the encoder (the other method that fits an
# encoder-only foundation) before scratch; then K = 1 in the same order. A cell that cannot run yet (no nnssl module)
# is passed over and taken up once it can.
CELLS = [(start, trainer, k) for k in sorted(KS, reverse=True)
         for start, trainer in (("encoder", METHODS[0]), ("model", METHODS[0]), ("encoder", METHODS[1]),
                                ("scratch", SCRATCH), ("model", METHODS[1]))]
STEM = "hippocampus_foundations_cpu"
RETRY_AFTER_S = 600  # a failed cell (e.g. a foundation loader not installed yet) is tried again after this


def nnssl_writer():
    """tests/foundation_files.py's write_checkpoint (the nnssl layout, as the tests write it), or None where this
    checkout lacks it."""
    import importlib
    importlib.invalidate_caches()  # the module may have been added since this run started
    tests = str(HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.append(tests)
    try:
        from foundation_files import write_checkpoint
    except ImportError:
        return None
    return write_checkpoint


def encoder_checkpoint(work: Path, foundation: Path, write_checkpoint) -> Path:
    """The foundation's encoder (stem included) as an nnssl-layout checkpoint; written once."""
    path = work / "foundation_encoder_nnssl.pth"
    if path.is_file():
        return path
    import torch
    weights = torch.load(foundation / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    plans = json.loads((foundation / "plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    write_checkpoint(path, network_weights={k: v for k, v in weights.items() if k.startswith("encoder.")},
                     architecture=config["architecture"], spacing=config["spacing"],
                     normalization_schemes=config["normalization_schemes"], patch_size=config["patch_size"])
    return path


def prepare(work: Path, start: str, foundation_arg: Path, fallback: Path, log: Path) -> dict:
    """The start's target dataset: relabelled, preprocessed from `foundation_arg` (the model folder's plans
    where prepare_target refuses an nnssl checkpoint), with seed 0's K = 1 and 5 few-shot splits.
    Returns {'plans': plans name, 'prepared_from': what prepare_target was given, 'folds': {K: fold}}."""
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import prepare_target
    dataset_id, name = TARGETS[start]
    pre = work / "pre" / f"Dataset{dataset_id:03d}_{name}"
    record = work / f"target_{start}.json"
    if record.is_file():
        return json.loads(record.read_text())
    relabel_dataset(SOURCE, dataset_id, name, {"anterior": ["Anterior"]}, overwrite=True)
    prepared_from, note = foundation_arg, ""
    if foundation_arg.is_dir():
        prepare_target(dataset_id, foundation_arg, num_processes=1, overwrite=True)
    else:
        # the foundation's own patch, so that (a) and (b) train on the same patches
        patch = json.loads((fallback / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_fseft_prepare_target"), "-d", str(dataset_id),
               "-m", str(foundation_arg), "--patch-size", *map(str, patch), "-np", "1", "--overwrite"]
        with open(log, "a") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, text=True)
            f.write(r.stderr)
        if r.returncode:
            note = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit status {r.returncode}"
            print(f"prepare_target refused {foundation_arg.name} ({note}); using {fallback}'s plans", flush=True)
            prepare_target(dataset_id, fallback, num_processes=1, overwrite=True)
            prepared_from = fallback
    plans = [p for p in sorted(pre.glob("*.json")) if "configurations" in json.loads(p.read_text())]
    query = work / "query.json"
    query.write_text(json.dumps(SPLIT["query"]))
    table = write_fewshot_splits(dataset_id, ks=list(KS), seeds=[SEED], query_file=str(query), overwrite=True)
    result = {"plans": plans[0].stem, "prepared_from": str(prepared_from), "refusal": note,
              "folds": {str(f["k"]): f["fold"] for f in table["folds"] if f["seed"] == SEED},
              "supports": {str(f["k"]): f["train"] for f in table["folds"] if f["seed"] == SEED}}
    record.write_text(json.dumps(result, indent=2))
    return result


def fold_dir(work: Path, start: str, trainer: str, target: dict, k: int) -> Path:
    dataset_id, name = TARGETS["model" if start == "scratch" else start]
    return (work / "res" / f"Dataset{dataset_id:03d}_{name}" / f"{trainer}__{target['plans']}__3d_fullres"
            / f"fold_{target['folds'][str(k)]}")


def train(work: Path, start: str, trainer: str, target: dict, k: int, weights, log: Path) -> dict:
    """One cell: nnU-Net's own training and final validation. Returns its row (Dice None where it failed)."""
    fold = fold_dir(work, start, trainer, target, k)
    timing = fold / "wall_time_s.txt"
    if not (fold / "validation" / "summary.json").is_file():
        dataset_id = TARGETS["model" if start == "scratch" else start][0]
        cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), str(dataset_id), "3d_fullres",
               str(target["folds"][str(k)]), "-tr", trainer, "-p", target["plans"], "-device", "cpu"]
        if weights is not None:
            cmd += ["-pretrained_weights", str(weights)]
        print(f"{start} / {trainer} / K={k}: {' '.join(cmd)}", flush=True)
        t = time.time()
        with open(log, "a") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
        if r.returncode:
            print(f"  failed (exit status {r.returncode}; see {log})", flush=True)
            return {"start": start, "trainer": trainer, "k": k, "dice": None, "wall_s": None, "load15": None}
        # the load average over the last 15 minutes: how much the other jobs on the machine slowed this cell
        timing.write_text(f"{time.time() - t:.0f} {os.getloadavg()[2]:.1f}\n")
    dice = json.loads((fold / "validation" / "summary.json").read_text())["mean"]["1"]["Dice"]
    wall, load = (float(x) for x in timing.read_text().split()) if timing.is_file() else (None, None)
    print(f"  {start} / {trainer} / K={k}: Dice {dice:.3f}" + (f", {wall:.0f} s" if wall else ""), flush=True)
    return {"start": start, "trainer": trainer, "k": k, "dice": dice, "wall_s": wall, "load15": load}


def publish(results: Path, rows: list, missing: list, targets: dict, command: str) -> None:
    """RESULTS/STEM.csv (one row per cell) and .md (Dice and wall time per cell, the ratios side by side)."""
    results.mkdir(parents=True, exist_ok=True)
    with open(results / f"{STEM}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["start", "trainer", "k", "seed", "dice_anterior_query50", "wall_s", "load_avg_15min"])
        for r in rows:
            w.writerow([r["start"], r["trainer"], r["k"], SEED, "" if r["dice"] is None else f"{r['dice']:.4f}",
                        "" if r["wall_s"] is None else f"{r['wall_s']:.0f}",
                        "" if r["load15"] is None else f"{r['load15']:.1f}"])
    cell = {(r["start"], r["trainer"], r["k"]): r for r in rows if r["dice"] is not None}

    def dice(start, trainer, k):
        r = cell.get((start, trainer, k))
        return None if r is None else r["dice"]

    def fmt(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    def ratio(a, b):
        return None if a is None or b is None else a / b

    def wall(start, trainer, k):
        r = cell.get((start, trainer, k))
        if r is None or r["wall_s"] is None:
            return "n/a"
        return f"{r['wall_s']:.0f} s" + ("" if r["load15"] is None else f" (load {r['load15']:.0f})")

    lines = ["| method | K | (a) model folder | (b) encoder only (nnssl) | (c) scratch | (b)/(a) | (a)/(c) | (b)/(c) "
             "| wall time (a) / (b) / (c), 15-min load average at the end |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for trainer in METHODS:
        for k in KS:
            a, b, c = dice("model", trainer, k), dice("encoder", trainer, k), dice("scratch", SCRATCH, k)
            lines.append(f"| {trainer} | {k} | {fmt(a)} | {fmt(b)} | {fmt(c)} | {fmt(ratio(b, a), 2)} | "
                         f"{fmt(ratio(a, c), 2)} | {fmt(ratio(b, c), 2)} | {wall('model', trainer, k)} / "
                         f"{wall('encoder', trainer, k)} / {wall('scratch', SCRATCH, k)} |")
    enc = targets.get("encoder")
    if enc is None:
        prepared = "(b) target: not prepared yet."
    elif enc["prepared_from"].endswith(".pth"):
        prepared = ("(b) target: prepared from the nnssl checkpoint by `nnUNetv2_fseft_prepare_target -m CHECKPOINT.pth "
                    "--patch-size` with the foundation's patch.")
    else:
        prepared = ("(b) target: prepared with the model folder's plans (the same network), because "
                    f"`nnUNetv2_fseft_prepare_target -m CHECKPOINT.pth` refused the checkpoint: {enc['refusal']}")
    same = (targets.get("encoder") is None
            or targets["encoder"]["supports"] == targets["model"]["supports"])
    details = ("protocol: novel class, a Posterior-only foundation (stock nnU-Net, tiny preset, 75 split-B cases, "
               "1,000 iterations) adapted to Anterior; (a) -pretrained_weights the model folder's "
               "fold_0/checkpoint_final.pth, (b) the same network's encoder (stem included) written with "
               "tests/foundation_files.py's write_checkpoint (earlier nnunetv2_fseft.foundations.nnssl's) and given "
               "to -pretrained_weights (decoder and head "
               "start fresh), (c) FSEFTScratchTrainer (stock nnU-Net, SGD 1e-2, random init). Every cell: 1,000 "
               f"iterations, seed {SEED}, supports K = 1 and 5 from nnunetv2_fseft's few-shot splits of the non-query "
               "cases" + (" (the same cases for (a), (b) and (c))" if same else " (DIFFERENT for (b): see target_*.json)")
               + "; Dice of Anterior by nnU-Net's final validation on the 50 query cases of "
               "benchmarks/hippocampus_split.json. Wall time: nnUNetv2_train including that validation; the 15-minute load average at each cell's end is in the "
               ".csv.")
    supports = targets.get("model", {}).get("supports", {})
    body = ["# Hippocampus, novel class: adapting from a model folder, an encoder-only checkpoint, or nothing", "",
            *bench_env.provenance(command, details), prepared, "",
            "Supports (seed 0): " + "; ".join(f"K={k}: {' '.join(v)}" for k, v in supports.items()), "",
            *lines, ""]
    if missing:
        body += ["Missing cells: " + "; ".join(missing), ""]
    done = {(r["start"], r["trainer"], r["k"]) for r in rows if r["dice"] is not None}
    named = " ".join(missing)
    not_run = [c for c in CELLS if c not in done and f"{c[1]} K={c[2]}:" not in named]
    if not_run:
        body += ["Not measured (the run was stopped before these): " + "; ".join(f"({'abc'[['model', 'encoder', 'scratch'].index(c[0])]}) "
                                                        f"{c[1]} K={c[2]}" for c in not_run), ""]
    (results / f"{STEM}.md").write_text("\n".join(body))


def report(work: Path, results: Path, command: str) -> None:
    """The tables from the cells finished in WORKDIR (their summary.json and wall_time_s.txt)."""
    targets = {start: json.loads((work / f"target_{start}.json").read_text())
               for start in ("model", "encoder") if (work / f"target_{start}.json").is_file()}
    rows = []
    for start, trainer, k in CELLS:
        target = targets.get("model" if start == "scratch" else start)
        fold = None if target is None else fold_dir(work, start, trainer, target, k)
        if fold is None or not (fold / "validation" / "summary.json").is_file():
            continue
        dice = json.loads((fold / "validation" / "summary.json").read_text())["mean"]["1"]["Dice"]
        timing = fold / "wall_time_s.txt"
        wall, load = (float(x) for x in timing.read_text().split()) if timing.is_file() else (None, None)
        rows.append({"start": start, "trainer": trainer, "k": k, "dice": dice, "wall_s": wall, "load15": load})
    publish(results, rows, [], targets, command)
    print((results / f"{STEM}.md").read_text())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--results", default=str(HERE / "results"), help="where the tables go (default benchmarks/results)")
    p.add_argument("--report", action="store_true", help="only rewrite the tables from finished cells; train nothing")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    setup_env(work)
    args = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--report"]
    command = "python benchmarks/hippocampus_foundations.py " + " ".join(args)
    log = work / "log.txt"
    if a.report:
        return report(work, Path(a.results), command)
    foundation = posterior_foundation(work)
    weights = foundation / "fold_0" / "checkpoint_final.pth"
    targets = {"model": prepare(work, "model", foundation, foundation, log)}
    start_weights = {"model": weights, "scratch": None, "encoder": work / "foundation_encoder_nnssl.pth"}
    rows, failed = {}, {}
    while True:
        missing = []
        for start, trainer, k in CELLS:
            if start == "encoder" and "encoder" not in targets:
                writer = nnssl_writer()
                if writer is None:
                    missing.append(f"(b) {trainer} K={k}: tests/foundation_files.py has no write_checkpoint")
                    continue
                targets["encoder"] = prepare(work, "encoder", encoder_checkpoint(work, foundation, writer),
                                             foundation, log)
            if (start, trainer, k) in rows:
                continue
            if time.time() - failed.get((start, trainer, k), -RETRY_AFTER_S) < RETRY_AFTER_S:
                missing.append(f"({'abc'[['model', 'encoder', 'scratch'].index(start)]}) {trainer} K={k}: "
                               "nnUNetv2_train failed (see the run's log)")
                continue
            break
        else:
            break
        target = targets["model" if start == "scratch" else start]
        row = train(work, start, trainer, target, k, start_weights[start], log)
        if row["dice"] is None:
            failed[start, trainer, k] = time.time()
        else:
            rows[start, trainer, k] = row
        publish(Path(a.results), list(rows.values()), missing, targets, command)
    publish(Path(a.results), list(rows.values()), missing, targets, command)
    print((Path(a.results) / f"{STEM}.md").read_text())


if __name__ == "__main__":
    main()
