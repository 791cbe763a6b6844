"""Issue 4 on real data, through nnUNetv2_fseft_benchmark; scored on the 50 fixed query cases of
hippocampus_split.json, which no training sees.

  python benchmarks/hippocampus_fewshot.py WORKDIR --protocol novel|shift [--k 1 5 10] [--seeds 3]
                                           [--methods ...] [--short] [--output DIR] [--results DIR] [--report]

novel (protocol 2): Posterior-only foundation -> Anterior (dataset 106); supports from the non-query cases.
shift (protocol 1): foundation on split B with both classes -> the same classes from "scanner B" (dataset 109,
  built from split A + the query cases with hippocampus_common.SHIFT_DOC); supports from split A.
TI on vs off (protocol 3): pass TI trainers in --methods, e.g. FSEFTLinearProbeTITrainer.
--short: every method as `<name>_hip`, 250 iterations (benchmarks/ext/hippocampus_trainers.py), the CPU budget
  of the shift protocol. Without it each method runs its default 1,000 iterations (what a new head on the novel
  class needs: benchmarks/results/hippocampus_schedule_cpu.md).
The tables go to RESULTS/hippocampus_<protocol>_cpu.{md,csv,png} (--short) or
  hippocampus_<protocol>_1000its_cpu.* (default budget), rewritten after every cell from every finished cell of
  that protocol and budget in WORKDIR (a run over one K or a few methods keeps the others in the tables).
  RESULTS is --results, default benchmarks/results; a new WORKDIR (a new foundation) belongs in a new folder,
  or its tables would replace those of the earlier cells.
--report: only rewrite those tables; trains nothing.
A later sitting can add K or seeds: their folds are appended to the few-shot splits, so a trained fold keeps its
(K, seed).
WORKDIR may be the one of hippocampus_schedule.py (the Posterior foundation is shared); the targets are separate
datasets so that these folds never mix with the schedule measurement's.
"""
import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import bench_env
from hippocampus_common import HERE, SOURCE, SPLIT, SHIFT_DOC, both_classes_foundation, posterior_foundation, \
    setup_env, shifted_dataset

BASELINES = ["scratch", "FSEFTnnUNetFTTrainer"]  # from scratch, and nnU-Net's own -pretrained_weights fine-tuning
METHODS = BASELINES + ["FSEFTLinearProbeTrainer", "FSEFTSpatialAdapterTrainer", "FSEFTBitFitTrainer",
                       "FSEFTAffineNormTrainer", "FSEFTCNNAdapterTrainer", "FSEFTLoRATrainer", "FSEFTDecoderTrainer",
                       "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer"]
GRID = {"ks": [1, 5, 10], "seeds": [0, 1, 2]}
PROTOCOL_DOC = {
    "novel": "novel class: a Posterior-only foundation (stock nnU-Net, 75 split-B cases, 1,000 iterations) adapted "
             "to Anterior",
    "shift": f"known classes, shifted domain: a foundation with both classes (stock nnU-Net, 75 split-B cases, "
             f"1,000 iterations) adapted to the same classes from {SHIFT_DOC}",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--protocol", choices=("novel", "shift"), default="novel")
    p.add_argument("--k", type=int, nargs="+", default=GRID["ks"], choices=GRID["ks"])
    p.add_argument("--seeds", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--methods", nargs="+", default=None, help="default: METHODS (+ zeroshot for shift)")
    p.add_argument("--short", action="store_true", help="250 iterations per cell (`<name>_hip` trainers)")
    p.add_argument("--output", default=None, help="default: WORKDIR/results_<protocol>[_short]")
    p.add_argument("--results", default=str(HERE / "results"), help="where the tables go (default benchmarks/results)")
    p.add_argument("--report", action="store_true", help="rewrite the tables from finished cells, train nothing")
    a = p.parse_args(argv)
    work = Path(a.workdir).resolve()
    setup_env(work)
    from nnunetv2_fseft.benchmark.config import load_config
    from nnunetv2_fseft.benchmark.runner import check_methods, finished_cells, run_benchmark
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.errors import FSEFTError
    methods = a.methods or (["zeroshot"] if a.protocol == "shift" else []) + METHODS
    if a.short:
        methods = [short_name(m) for m in methods]
    foundation = foundation_folder(work, a.protocol, train=not a.report)
    config = {"dataset": 106 if a.protocol == "novel" else 109, "foundation": str(foundation),
              "methods": methods, "k": a.k, "seeds": a.seeds, "query": str(work / "query.json"), "device": "cpu",
              "output": a.output or str(work / f"results_{a.protocol}{'_short' if a.short else ''}")}
    if a.short:
        config["scratch_trainer"] = "FSEFTScratchTrainer_hip"
    config_file = work / f"hippocampus_{a.protocol}{'_short' if a.short else ''}.json"
    config_file.write_text(json.dumps(config, indent=2))
    command = "python benchmarks/hippocampus_fewshot.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        config = load_config(config_file)
        check_methods(config)
        grid = dataclasses.replace(config, ks=GRID["ks"], seeds=GRID["seeds"])

        def publish(_records=None):
            found = dataclasses.replace(grid, methods=table_methods(config.output / "cells", a.short))
            publish_tables(Path(a.results), a.protocol, a.short, finished_cells(found), command)
        if a.report:
            return publish()
        make_target(work, a.protocol, relabel_dataset)
        result = run_benchmark(config, on_cell=publish)
    except FSEFTError as e:
        sys.exit(f"hippocampus_fewshot: error: {e}")
    print(result["markdown"].read_text())


def foundation_folder(work: Path, protocol: str, train: bool) -> Path:
    """The protocol's foundation model folder, trained on first use (about 5 min on 2 cores) when `train`."""
    return (posterior_foundation if protocol == "novel" else both_classes_foundation)(work, train)


def make_target(work: Path, protocol: str, relabel_dataset) -> None:
    """The target's raw dataset (once) and the query list; the source is only read."""
    if protocol == "novel":
        if not (work / "raw" / "Dataset106_HippoAnteriorFS").is_dir():
            relabel_dataset(SOURCE, 106, "HippoAnteriorFS", {"anterior": ["Anterior"]})
    else:
        shifted_dataset(SPLIT["A"] + SPLIT["query"], 109, "HippoScannerB")
    (work / "query.json").write_text(json.dumps(SPLIT["query"]))


def short_name(method: str) -> str:
    """The method's 250-iteration trainer (`<name>_hip`); zero-shot and scratch keep their names."""
    return method if method in ("zeroshot", "scratch") or method.endswith("_hip") else method + "_hip"


def table_methods(cells_dir: Path, short: bool) -> list:
    """The methods with a finished cell in cells_dir, in the tables' order: the baselines, then the FSEFT methods
    with each TI twin after its method, then any other trainer."""
    found = {m.group(1) for f in cells_dir.glob("*.json") if (m := re.fullmatch(r"(.+)_k\d+_s\d+\.json", f.name))}
    fseft = [v for m in METHODS if m not in BASELINES for v in (m, m.replace("Trainer", "TITrainer"))]
    order = [short_name(m) if short else m for m in ["zeroshot", *BASELINES, *fseft]]
    return [m for m in order if m in found] + sorted(found - set(order))


def publish_tables(results: Path, protocol: str, short: bool, records: list, command: str) -> None:
    """The harness's tables in `results` (one stem per protocol and budget), with the protocol and machine."""
    iterations, stem = (250, f"hippocampus_{protocol}_cpu") if short else (1000, f"hippocampus_{protocol}_1000its_cpu")
    details = (f"protocol: {PROTOCOL_DOC[protocol]}. Supports: nested K = 1 ⊂ 5 ⊂ 10 per seed; scored by nnU-Net's "
               "evaluation on the 50 query cases of benchmarks/hippocampus_split.json. Schedules: "
               + ("benchmarks/ext/hippocampus_trainers.py." if short else "each trainer's default (README, Trainers).")
               + " The table holds every finished cell of this protocol and budget, from the runs listed in "
               "docs/hippocampus.md.")
    bench_env.publish_fewshot(results / stem, records,
                              f"Hippocampus few-shot, {protocol} protocol (real MR, tiny plans, {iterations:,} "
                              "iterations, CPU)",
                              bench_env.provenance(command, details))


if __name__ == "__main__":
    main()
