"""Measure the default FSEFT schedule on real data (hippocampus, novel class, K=5, tiny plans, CPU).

Foundation: stock nnU-Net on split 'B' with Posterior labels only (1,000 iterations). Target: Anterior only;
K=5 supports drawn by nnunetv2_fseft_fewshot_splits from the non-query cases; scored by nnU-Net's own final
validation on the 50 fixed query cases of benchmarks/hippocampus_split.json, which no training sees.

  python benchmarks/hippocampus_schedule.py WORKDIR [--trainers ...]
"""
import argparse
import json
import sys
from pathlib import Path

from hippocampus_common import SOURCE, SPLIT, posterior_foundation, run, setup_env

TRAINERS = ["FSEFTLinearProbeTrainer", "FSEFTLoRATrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--trainers", nargs="+", default=TRAINERS + ["nnUNetTrainer_20x50"])
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    setup_env(work)
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import prepare_target
    log = work / "log.txt"
    bin_ = Path(sys.executable).parent
    found = posterior_foundation(work)
    if not (work / "pre" / "Dataset105_HippoAnterior" / "fewshot_splits.json").is_file():
        relabel_dataset(SOURCE, 105, "HippoAnterior", {"anterior": ["Anterior"]}, overwrite=True)
        prepare_target(105, found, overwrite=True)
        query = work / "query.json"
        query.write_text(json.dumps(SPLIT["query"]))
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
