"""Learning from unlabelled scans (hippocampus, novel class, decoder + LoRA, 1,000 iterations, CPU).

Foundation: hippocampus_common.posterior_foundation (stock nnU-Net, tiny preset, Posterior only, split 'B').
Target: Anterior only (dataset 114, prepared with the foundation's plans); supports from nnunetv2_fseft's few-shot
splits of the 150 non-query cases (K = 1 and 5, seeds 0-2: the folds and supports of
hippocampus_foundations.py). Unlabelled pool: the split-A images that are not supports of the cell (their labels are
never read). Scored on the 50 query cases of hippocampus_split.json, which nothing trains or tunes on: Dice of
Anterior and predicted / true volume, both computed by `score` below from the written segmentations.

Methods (each a cell per K and seed):
  baseline      nnUNetv2_train ... -tr FSEFTDecoderLoRATrainer on the supports alone
  atlas         nnUNetv2_fseft_pseudolabel --atlas: the supports' labels registered onto each query image, no training
  registration  nnUNetv2_fseft_pseudolabel --labels registration -tr FSEFTDecoderLoRATrainer (supports + pool)
  self          nnUNetv2_fseft_pseudolabel --labels model -m <the baseline's model> -tr FSEFTDecoderLoRATrainer
  both          nnUNetv2_fseft_pseudolabel --labels both -m <the baseline's model> -tr FSEFTDecoderLoRATrainer
The defaults (margin 1 voxel, confidence 0.9, one round, majority vote) were fixed before any query number was seen.

  python benchmarks/hippocampus_pseudo.py WORKDIR --cells 1:0:baseline 1:0:atlas ...   (no --cells: tables only)

Resumable: a finished cell is not run again. Tables: RESULTS/hippocampus_pseudo_cpu.{md,csv}, rewritten after
every cell.
"""
import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import bench_env
from hippocampus_common import HERE, SOURCE, SPLIT, posterior_foundation, setup_env

TARGET_ID, TARGET = 114, "HippoAnteriorFromModel"
KS, SEEDS = (1, 5), (0, 1, 2)
TRAINER = "FSEFTDecoderLoRATrainer"
METHODS = ("baseline", "atlas", "registration", "self", "both")
PSEUDO_ID = {"registration": 130, "self": 140, "both": 150}  # + fold: one dataset per cell
STEM = "hippocampus_pseudo_cpu"


def bin_cmd(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def prepare(work: Path, foundation: Path) -> dict:
    """The target with K = 1, 5 x seeds 0-2 folds (the same splits as hippocampus_foundations.py)."""
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import prepare_target
    record = work / "pseudo_target.json"
    if record.is_file():
        return json.loads(record.read_text())
    if not (work / "pre" / f"Dataset{TARGET_ID:03d}_{TARGET}" / "nnUNetPlans.json").is_file():
        relabel_dataset(SOURCE, TARGET_ID, TARGET, {"anterior": ["Anterior"]}, overwrite=True)
        prepare_target(TARGET_ID, foundation, num_processes=1, overwrite=True)
    query = work / "query.json"
    query.write_text(json.dumps(SPLIT["query"]))
    table = write_fewshot_splits(TARGET_ID, ks=list(KS), seeds=list(SEEDS), query_file=str(query))
    folds = {f"{f['k']}:{f['seed']}": {"fold": f["fold"], "supports": f["train"]} for f in table["folds"]}
    record.write_text(json.dumps(folds, indent=2))
    return folds


def image_folder(folder: Path, cases) -> Path:
    """A folder of links to the source images of `cases` (nnU-Net naming), as a user's imagesTs would be."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        link = folder / f"{case}_0000.nii.gz"
        if not link.exists():
            link.symlink_to(SOURCE / "imagesTr" / f"{case}_0000.nii.gz")
    return folder


def score(predictions: Path) -> dict:
    """Mean Dice of Anterior over the query cases and the summed predicted / true Anterior volume."""
    import numpy as np
    import SimpleITK as sitk
    dices, predicted, true = [], 0, 0
    for case in SPLIT["query"]:
        p = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions / f"{case}.nii.gz"))) == 1
        g = sitk.GetArrayFromImage(sitk.ReadImage(str(SOURCE / "labelsTr" / f"{case}.nii.gz"))) == 1
        dices.append(2 * (p & g).sum() / max(p.sum() + g.sum(), 1))
        predicted, true = predicted + p.sum(), true + g.sum()
    return {"dice": float(np.mean(dices)), "volume_ratio": float(predicted / true)}


def timed(cmd, log: Path, env=None) -> dict:
    t = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode:
        raise RuntimeError(f"failed: {' '.join(cmd)} (see {log})")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # largest child so far, MB
    return {"wall_s": round(time.time() - t), "peak_rss_mb_so_far": round(peak)}


def baseline_folder(work: Path, fold: int) -> Path:
    return work / "res" / f"Dataset{TARGET_ID:03d}_{TARGET}" / f"{TRAINER}__nnUNetPlans__3d_fullres" / f"fold_{fold}"


def run_cell(work: Path, folds: dict, weights: Path, k: int, seed: int, method: str, log: Path) -> dict:
    cell = folds[f"{k}:{seed}"]
    fold, supports = cell["fold"], cell["supports"]
    env = dict(os.environ, nnUNet_fseft_seed=str(seed))  # the same new head / adapter start in every method
    query_images = image_folder(work / "query_images", SPLIT["query"])
    out = {"k": k, "seed": seed, "method": method, "supports": " ".join(supports)}
    if method == "baseline":
        folder = baseline_folder(work, fold)
        train = [bin_cmd("nnUNetv2_train"), str(TARGET_ID), "3d_fullres", str(fold), "-tr", TRAINER, "-device", "cpu"]
        if not (folder / "checkpoint_final.pth").is_file():
            out.update(timed(train + ["-pretrained_weights", str(weights)], log, env))
        elif not (folder / "validation" / "summary.json").is_file():  # trained, stopped during validation
            out.update(timed(train + ["--val"], log, env))
        return {**out, **score(folder / "validation")}
    if method == "atlas":
        dest = work / "atlas" / f"k{k}_s{seed}"
        t = time.time()
        timed([bin_cmd("nnUNetv2_fseft_pseudolabel"), "--atlas", "-d", str(TARGET_ID), "-f", str(fold),
               "-i", str(query_images), "-o", str(dest), "--overwrite"], log)
        out["wall_s"] = round(time.time() - t)
        out["registration_s_per_pair"] = round((time.time() - t) / (len(SPLIT["query"]) * k), 2)
        return {**out, **score(dest)}
    pool = image_folder(work / "pools" / f"k{k}_s{seed}", [c for c in SPLIT["A"] if c not in supports])
    out_id = PSEUDO_ID[method] + fold
    name = f"HippoPseudo{method.capitalize()}"
    folder = work / "res" / f"Dataset{out_id:03d}_{name}" / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    if not (folder / "checkpoint_final.pth").is_file():
        cmd = [bin_cmd("nnUNetv2_fseft_pseudolabel"), "-d", str(TARGET_ID), "-f", str(fold), "-i", str(pool),
               "-o", str(out_id), "-n", name, "--labels", {"self": "model"}.get(method, method), "-tr", TRAINER,
               "-pretrained_weights", str(weights), "-np", "1", "--overwrite"]
        if method in ("self", "both"):
            cmd += ["-m", str(baseline_folder(work, fold).parent)]
        out.update(timed(cmd, log, env))
    out["pool"] = len(SPLIT["A"]) - len(set(supports) & set(SPLIT["A"]))
    return {**out, **score(folder / "validation")}


COLUMNS = ["k", "seed", "method", "dice", "volume_ratio", "wall_s", "registration_s_per_pair", "peak_rss_mb_so_far",
           "pool", "supports", "note"]


def publish(results: Path, rows: list, commands: list) -> None:
    results.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["k"], r["seed"], METHODS.index(r["method"])))
    with open(results / f"{STEM}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    cells = {(r["k"], r["seed"], r["method"]): r for r in rows}
    lines = ["| K | seed | support(s) | " + " | ".join(METHODS) + " |", "|---:|---:|---|" + "---:|" * len(METHODS)]
    for k in KS:
        for seed in SEEDS:
            if not any((k, seed, m) in cells for m in METHODS):
                continue
            supports = next(r["supports"] for m, r in ((m, cells.get((k, seed, m))) for m in METHODS) if r)
            row = []
            for m in METHODS:
                r = cells.get((k, seed, m))
                row.append("not run" if r is None else f"{r['dice']:.3f} ({r['volume_ratio']:.2f}x)")
            lines.append(f"| {k} | {seed} | {supports if k == 1 else f'{k} cases'} | " + " | ".join(row) + " |")
        runs = {m: [cells[(k, s, m)] for s in SEEDS if (k, s, m) in cells] for m in METHODS}
        if all(len(v) in (0, len(SEEDS)) for v in runs.values()) and any(runs.values()):  # every seed or none
            row = [f"{sum(r['dice'] for r in v) / len(v):.3f} ({sum(r['volume_ratio'] for r in v) / len(v):.2f}x)"
                   if v else "not run" for v in runs.values()]
            lines.append(f"| {k} | mean | seeds {SEEDS[0]}-{SEEDS[-1]} | " + " | ".join(row) + " |")
    details = ("protocol: novel class (Posterior-only foundation adapted to Anterior), FSEFTDecoderLoRATrainer, 1,000 "
               "iterations, supports from the few-shot splits of the non-query cases, unlabelled pool = split-A images "
               "that are not supports; each cell: Dice of Anterior on the 50 query cases (mean over cases) and, in "
               "brackets, predicted / true Anterior volume summed over them. Defaults fixed before any query number: "
               "registration affine (moments, Mattes MI, 2 levels), trust margin 1 voxel, model confidence 0.9, 1 round.")
    body = ["# Hippocampus, novel class: learning from unlabelled scans", "",
            *bench_env.provenance(" ; ".join(commands), details),
            *lines, "", "Per-cell wall time, registration seconds per pair and peak RSS: the .csv (a self or both cell's wall time "
            "excludes the supports-only model it starts from, the baseline cell's).", ""]
    (results / f"{STEM}.md").write_text("\n".join(body))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--cells", nargs="+", default=[], help="K:SEED:METHOD, run in this order")
    p.add_argument("--results", default=str(HERE / "results"))
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    setup_env(work)
    command = "python benchmarks/hippocampus_pseudo.py " + " ".join(argv if argv is not None else sys.argv[1:])
    foundation = posterior_foundation(work)
    folds = prepare(work, foundation)
    weights = foundation / "fold_0" / "checkpoint_final.pth"
    store, runs = work / "pseudo_rows.json", work / "pseudo_commands.json"
    rows = json.loads(store.read_text()) if store.is_file() else {}
    commands = json.loads(runs.read_text()) if runs.is_file() else []
    if a.cells:  # every run that added cells: the table names them all
        commands.append(command)
        runs.write_text(json.dumps(commands, indent=2))
    for spec in a.cells:
        k, seed, method = spec.split(":")
        key = f"{k}:{seed}:{method}"
        if key in rows:
            continue
        print(f"cell {key} ...", flush=True)
        try:
            rows[key] = run_cell(work, folds, weights, int(k), int(seed), method, work / "pseudo_log.txt")
        except Exception as e:  # keep going: the next cells may not depend on this one
            print(f"  {key} failed: {e}", flush=True)
            continue
        print(f"  {key}: Dice {rows[key]['dice']:.3f}, volume {rows[key]['volume_ratio']:.2f}x", flush=True)
        store.write_text(json.dumps(rows, indent=2))
        publish(Path(a.results), list(rows.values()), commands)
    if rows:
        publish(Path(a.results), list(rows.values()), commands)
        print((Path(a.results) / f"{STEM}.md").read_text())


if __name__ == "__main__":
    main()
