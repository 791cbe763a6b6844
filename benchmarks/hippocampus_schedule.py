"""Measure the default FSEFT schedule on real data (hippocampus, novel class, K=5, tiny plans, CPU).

Foundation: stock nnU-Net on split 'B' with Posterior labels only (1,000 iterations). Target: Anterior only;
K=5 supports drawn by nnunetv2_fseft_fewshot_splits from the non-query cases; scored by nnU-Net's own final
validation on the 50 fixed query cases of benchmarks/hippocampus_split.json, which no training sees.

  python benchmarks/hippocampus_schedule.py WORKDIR [--trainers ...]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "shared" / "data" / "hippocampus" / "Dataset004_Hippocampus"
TRAINERS = ["FSEFTLinearProbeTrainer", "FSEFTLoRATrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer"]


def run(cmd, log):
    t = time.time()
    with open(log, "a") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)} (see {log})")
    return time.time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--trainers", nargs="+", default=TRAINERS + ["nnUNetTrainer_20x50"])
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    for d in ("raw", "pre", "res"):
        (work / d).mkdir(parents=True, exist_ok=True)
    from nnunetv2_fseft.cli.ext_path import trainers_folder
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"), nnUNet_compile="0", nnUNet_def_n_proc="1",
                      nnUNet_n_proc_DA=os.environ.get("nnUNet_n_proc_DA", "2"),  # nnU-Net would start 12 on 2 cores
                      nnUNet_extTrainer=os.pathsep.join([trainers_folder(), str(HERE / "ext")]))
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import plan_with_preset, prepare_target
    split = json.loads((HERE / "hippocampus_split.json").read_text())
    log = work / "log.txt"
    bin_ = Path(sys.executable).parent
    found = work / "res" / "Dataset104_HippoPosterior" / "nnUNetTrainer_20x50__nnUNetPlans__3d_fullres"
    if not (found / "fold_0" / "checkpoint_final.pth").is_file():
        relabel_dataset(SOURCE, 104, "HippoPosterior", {"posterior": ["Posterior"]}, overwrite=True)
        relabel_dataset(SOURCE, 105, "HippoAnterior", {"anterior": ["Anterior"]}, overwrite=True)
        plan_with_preset(104, "tiny", overwrite=True)
        splits = [{"train": split["B"], "val": split["A"][:5]}]  # validation never touches the query
        (work / "pre" / "Dataset104_HippoPosterior" / "splits_final.json").write_text(json.dumps(splits))
        t = run([str(bin_ / "nnUNetv2_train"), "104", "3d_fullres", "0", "-tr", "nnUNetTrainer_20x50",
                 "-device", "cpu"], log)
        print(f"foundation trained in {t:.0f} s", flush=True)
        prepare_target(105, found, overwrite=True)
        query = work / "query.json"
        query.write_text(json.dumps(split["query"]))
        write_fewshot_splits(105, ks=[5], seeds=[0], query_file=str(query), overwrite=True)
    rows = []
    for trainer in a.trainers:
        fold = work / "res" / "Dataset105_HippoAnterior" / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"
        t = None
        if not (fold / "validation" / "summary.json").is_file():
            cmd = [str(bin_ / "nnUNetv2_train"), "105", "3d_fullres", "0", "-tr", trainer, "-device", "cpu"]
            if trainer.startswith("FSEFT"):
                cmd += ["-pretrained_weights", str(found / "fold_0" / "checkpoint_final.pth")]
            t = run(cmd, log)
        dice = json.loads((fold / "validation" / "summary.json").read_text())["mean"]["1"]["Dice"]
        rows.append((trainer, dice, t))
        print(f"{trainer}: Dice {dice:.3f} on 50 query cases" + (f", {t:.0f} s" if t else ""), flush=True)
    out = ["| trainer (K=5, 1,000 iterations) | Anterior Dice (50 query cases) | wall time |", "|---|---:|---:|"]
    out += [f"| {r[0]} | {r[1]:.3f} | {'' if r[2] is None else f'{r[2]:.0f} s'} |" for r in rows]
    print("\n".join(out))
    (work / "results.md").write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
