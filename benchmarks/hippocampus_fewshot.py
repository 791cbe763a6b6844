"""Issue 4 on real data, through nnUNetv2_fseft_benchmark; scored on the 50 fixed query cases of
hippocampus_split.json, which no training sees.

  python benchmarks/hippocampus_fewshot.py WORKDIR --protocol novel|shift [--k 1 5 10] [--seeds 3]
                                           [--methods ...] [--output DIR]

novel (protocol 2): Posterior-only foundation -> Anterior (dataset 106); supports from the non-query cases.
shift (protocol 1): foundation on split B with both classes -> the same classes from "scanner B" (dataset 109,
  built from split A + the query cases with hippocampus_common.SHIFT_DOC); supports from split A.
TI on vs off (protocol 3): pass TI trainers in --methods, e.g. FSEFTLinearProbeTITrainer.
WORKDIR may be the one of hippocampus_schedule.py (the Posterior foundation is shared); the targets are separate
datasets so that these folds never mix with the schedule measurement's.
"""
import argparse
import json
from pathlib import Path

from hippocampus_common import SOURCE, SPLIT, both_classes_foundation, posterior_foundation, setup_env, \
    shifted_dataset

METHODS = ["scratch", "FSEFTLinearProbeTrainer", "FSEFTSpatialAdapterTrainer", "FSEFTBitFitTrainer",
           "FSEFTLoRATrainer", "FSEFTDecoderTrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--protocol", choices=("novel", "shift"), default="novel")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None, help="default: METHODS (+ zeroshot for shift)")
    p.add_argument("--output", default=None, help="default: WORKDIR/results_<protocol>")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    setup_env(work)
    from nnunetv2_fseft.benchmark.config import load_config
    from nnunetv2_fseft.benchmark.runner import run_benchmark
    from nnunetv2_fseft.data.convert import relabel_dataset
    if a.protocol == "novel":
        foundation, dataset = posterior_foundation(work), 106
        if not (work / "raw" / "Dataset106_HippoAnteriorFS").is_dir():
            relabel_dataset(SOURCE, 106, "HippoAnteriorFS", {"anterior": ["Anterior"]})
    else:
        foundation, dataset = both_classes_foundation(work), 109
        shifted_dataset(SPLIT["A"] + SPLIT["query"], 109, "HippoScannerB")
    (work / "query.json").write_text(json.dumps(SPLIT["query"]))
    methods = a.methods or (["zeroshot"] if a.protocol == "shift" else []) + METHODS
    config = {"dataset": dataset, "foundation": str(foundation), "methods": methods, "k": a.k,
              "seeds": a.seeds, "query": str(work / "query.json"), "device": "cpu",
              "output": a.output or str(work / f"results_{a.protocol}")}
    config_file = work / f"hippocampus_{a.protocol}.json"
    config_file.write_text(json.dumps(config, indent=2))
    result = run_benchmark(load_config(config_file))
    print(result["markdown"].read_text())


if __name__ == "__main__":
    main()
