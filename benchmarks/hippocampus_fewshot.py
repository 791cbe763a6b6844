"""Issue 4, protocol 2 on real data: novel class. Posterior-only foundation (hippocampus_common) -> Anterior,
K-shot supports from the non-query cases, scored on the 50 fixed query cases, through nnUNetv2_fseft_benchmark.

  python benchmarks/hippocampus_fewshot.py WORKDIR [--k 1 5 10] [--seeds 3] [--methods ...] [--output DIR]

WORKDIR may be the one of hippocampus_schedule.py (the foundation is shared). The target is a separate
dataset (106) so that these folds never mix with the schedule measurement's.
"""
import argparse
import json
from pathlib import Path

from hippocampus_common import SOURCE, SPLIT, posterior_foundation, setup_env

METHODS = ["scratch", "FSEFTLinearProbeTrainer", "FSEFTSpatialAdapterTrainer", "FSEFTBitFitTrainer",
           "FSEFTLoRATrainer", "FSEFTDecoderTrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--output", default=None, help="default: WORKDIR/results_novel")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    setup_env(work)
    foundation = posterior_foundation(work)
    from nnunetv2_fseft.benchmark.config import load_config
    from nnunetv2_fseft.benchmark.runner import run_benchmark
    from nnunetv2_fseft.data.convert import relabel_dataset
    if not (work / "raw" / "Dataset106_HippoAnteriorFS").is_dir():
        relabel_dataset(SOURCE, 106, "HippoAnteriorFS", {"anterior": ["Anterior"]})
    (work / "query.json").write_text(json.dumps(SPLIT["query"]))
    config = {"dataset": 106, "foundation": str(foundation), "methods": a.methods, "k": a.k, "seeds": a.seeds,
              "query": str(work / "query.json"), "device": "cpu",
              "output": a.output or str(work / "results_novel")}
    config_file = work / "hippocampus_novel.json"
    config_file.write_text(json.dumps(config, indent=2))
    result = run_benchmark(load_config(config_file))
    print(result["markdown"].read_text())


if __name__ == "__main__":
    main()
