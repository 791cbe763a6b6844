"""Issue 8's experiments on the abdominal benchmark (real anatomy, synthetic intensities), CPU preset abdomen_cpu.

  python benchmarks/abdomen_data.py WORKDIR                  # once: the datasets (needs torchio)
  python benchmarks/abdomen.py WORKDIR --experiment 1        # partial-label pre-training
  python benchmarks/abdomen.py WORKDIR --experiment 2 [--k 1 5] [--seeds 3] [--methods ...]
  python benchmarks/abdomen.py WORKDIR --experiment 3 [--k 1 5] [--seeds 3] [--methods ...]
  python benchmarks/abdomen.py WORKDIR --experiment 3 --report ...   # tables from the finished cells only

1: MultiTalent on the three partial datasets (810) vs naive merge (stock nnU-Net on 810: unannotated = background)
   vs upper bound (stock nnU-Net on 811: all 8 organs). Same budget (ext/abdomen_trainers.py). Each predicts the 7
   query subjects in domain A (812, never trained on); nnU-Net's evaluation scores every organ.
2: known organs across the domain shift: target 820 (domain B, 8 organs), foundation = experiment 1's MultiTalent
   model; zero-shot, from scratch and the FSEFT methods at K = 1, 5 x 3 seeds through nnUNetv2_fseft_benchmark.
3: novel organs: target 821 (domain B; pancreas, gallbladder, oesophagus, adrenals), same foundation; the FSEFT
   methods, from scratch, and TI on/off for three of them.
Scores come from the 7 query subjects only; supports are drawn from the other 5 (with 5 supports, K=5 uses all five
for every seed: seeds then differ in initialisation, augmentation and in which subject K=1 uses).
Everything resumes: finished models and cells are kept, and a later sitting can add K or seeds (their folds are
appended to the few-shot splits, so a trained fold keeps its (K, seed)).
Results go to --results (default benchmarks/results): abdomen_exp<N>_cpu.csv, .md (mean +- std over seeds) and .png.
"""
import argparse
import csv
import json
import os
import sys
from pathlib import Path

import bench_env
from abdomen_common import (DATA_RECORD, FULL, HERE, KNOWN_B, NOVEL_B, PRESET, QUERY_A, SPLIT, SPLIT_FILE, TAG,
                            assembled_folder_name, setup_env)

# pre-training seeded, augmentation in the training process: the same models again after the work folder is lost
# (not after a resumed interruption); every plugin trainer seeds from nnUNet_fseft_seed (training/schedule.py)
PRETRAIN_ENV = {"nnUNet_fseft_seed": "0", "nnUNet_n_proc_DA": "0"}
PRETRAIN = {"multitalent": (assembled_folder_name(), "MultiTalentTrainer_abd"),
            "naive": (assembled_folder_name(), "nnUNetTrainer_abd"),
            "upper": (FULL.folder_name, "nnUNetTrainer_abd")}
ADAPT = ["FSEFTLinearProbeTrainer_abd", "FSEFTSpatialAdapterTrainer_abd", "FSEFTBitFitTrainer_abd",
         "FSEFTLoRATrainer_abd", "FSEFTDecoderTrainer_abd", "FSEFTDecoderLoRATrainer_abd", "FSEFTFullFTTrainer_abd"]
TI = ["FSEFTLinearProbeTITrainer_abd", "FSEFTLoRATITrainer_abd", "FSEFTDecoderLoRATITrainer_abd"]
METHODS = {2: ["zeroshot", "scratch"] + ADAPT, 3: ["scratch"] + ADAPT + TI}
TARGETS = {2: KNOWN_B, 3: NOVEL_B}
CONFIGURATION = "3d_fullres"


def die(message: str):
    sys.exit(f"abdomen: error: {message}")


def require_data(work: Path) -> dict:
    record_file = work / DATA_RECORD
    if not record_file.is_file():
        die(f"{record_file} not found: write the datasets first with python benchmarks/abdomen_data.py {work}")
    record = json.loads(record_file.read_text())
    import hashlib
    if record.get("split_sha256") != hashlib.sha256(SPLIT_FILE.read_bytes()).hexdigest():
        die(f"the datasets in {work} were written with another {SPLIT_FILE.name}; rebuild them with "
            f"python benchmarks/abdomen_data.py {work} --overwrite")
    return record


def plans_name() -> str:
    from nnunetv2_fseft.planning import load_preset
    return load_preset(PRESET)["plans_name"]


def model_folder(work: Path, dataset: str, trainer: str) -> Path:
    return work / "res" / dataset / f"{trainer}__{plans_name()}__{CONFIGURATION}"


def plan_pretraining(work: Path, dataset: str) -> None:
    """The preset's plans, and one fold that trains on every case (validation = pseudo-Dice on two of them: the
    query subjects never enter any training)."""
    from nnunetv2_fseft.planning import plan_with_preset
    pre = work / "pre" / dataset
    if (pre / f"{plans_name()}.json").is_file() and (pre / "splits_final.json").is_file():
        return
    plan_with_preset(int(dataset[7:10]), PRESET, num_processes=1, overwrite=True)
    cases = sorted(p.name[:-len(".nii.gz")] for p in (work / "raw" / dataset / "labelsTr").glob("*.nii.gz"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases[:2]}]))


def train(work: Path, dataset: str, trainer: str, device: str, env: dict = None) -> float:
    """nnUNetv2_train on fold 0 (resumed with --c after an interruption); seconds spent, 0 if already done. `env`
    adds to the environment."""
    import subprocess
    import time
    folder = model_folder(work, dataset, trainer) / "fold_0"
    if (folder / "checkpoint_final.pth").is_file():
        return 0.0
    cmd = [str(Path(sys.executable).parent / "nnUNetv2_train"), dataset[7:10], CONFIGURATION, "0", "-tr", trainer,
           "-p", plans_name(), "-device", device]
    if any(folder.glob("checkpoint_*.pth")):
        cmd.append("--c")
    log = work / "logs" / f"{dataset}_{trainer}.log"
    log.parent.mkdir(exist_ok=True)
    print(f"training {trainer} on {dataset} (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}).returncode:
            die(f"{' '.join(cmd)} failed; see the end of {log}")
    return time.time() - t0


def foundation(work: Path, device: str) -> Path:
    """Experiment 1's MultiTalent model: the foundation of experiments 2 and 3 (trained here if missing)."""
    dataset, trainer = PRETRAIN["multitalent"]
    plan_pretraining(work, dataset)
    train(work, dataset, trainer, device, PRETRAIN_ENV)
    return model_folder(work, dataset, trainer)


# ------------------------------------------------------------------------------------------------- experiment 1

def label_values(dataset_json: dict) -> dict:
    """class name -> the label value a predicted map uses for it (a region's first value)."""
    return {k: (v[0] if isinstance(v, list) else v) for k, v in dataset_json["labels"].items() if k != "background"}


def is_sigmoid(model: Path) -> bool:
    """MultiTalent's models are region-based: one sigmoid per class, which nnU-Net turns into a label map."""
    labels = json.loads((model / "dataset.json").read_text())["labels"]
    return any(isinstance(v, list) for v in labels.values())


def predict_and_score(work: Path, model: Path, name: str, device: str) -> tuple:
    """The query subjects (domain A) predicted by `model`, mapped by class name onto 812's labels, scored per organ
    by nnU-Net's evaluation. Organs the model does not output score 0 (never predicted).
    Returns (Dice of the label map, Dice of each sigmoid > 0.5 or None). The label map is what nnUNetv2_predict
    writes; where sigmoids overlap nnU-Net keeps the later class, so a sigmoid model is also scored per class as
    MultiTalent evaluates it."""
    import SimpleITK as sitk
    import numpy as np
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    raw = work / "raw" / QUERY_A.folder_name
    out = work / "exp1" / "predictions" / name
    out.mkdir(parents=True, exist_ok=True)
    sigmoid = is_sigmoid(model)
    todo = [s for s in QUERY_A.subjects
            if not (out / f"{s}.nii.gz").is_file() or (sigmoid and not (out / f"{s}.npz").is_file())]
    if todo:
        predictor = nnUNetPredictor(use_mirroring=False, device=torch.device(device),
                                    perform_everything_on_device=device != "cpu", allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), (0,))
        predictor.predict_from_files([[str(raw / "imagesTr" / f"{s}_0000.nii.gz")] for s in todo],
                                     [str(out / s) for s in todo], save_probabilities=sigmoid,
                                     num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    model_labels = label_values(json.loads((model / "dataset.json").read_text()))
    truth_labels = label_values(json.loads((raw / "dataset.json").read_text()))
    mapped = out.parent / f"{name}_query_labels"
    mapped.mkdir(exist_ok=True)
    for s in QUERY_A.subjects:
        image = sitk.ReadImage(str(out / f"{s}.nii.gz"))
        a = sitk.GetArrayFromImage(image)
        b = np.zeros_like(a)
        for organ, value in model_labels.items():
            if organ in truth_labels:
                b[a == value] = truth_labels[organ]
        result = sitk.GetImageFromArray(b)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(mapped / f"{s}.nii.gz"))
    summary = compute_metrics_on_folder(str(raw / "labelsTr"), str(mapped), str(mapped / "summary.json"),
                                        SimpleITKIO(), ".nii.gz", sorted(truth_labels.values()), num_processes=1,
                                        chill=True)
    organ_of = {v: k for k, v in truth_labels.items()}
    dice = {organ_of[int(k)]: v["Dice"] for k, v in summary["mean"].items()}
    return dice, (sigmoid_dice(out, raw / "labelsTr", model_labels, truth_labels) if sigmoid else None)


def sigmoid_dice(predictions: Path, truth_folder: Path, model_labels: dict, truth_labels: dict) -> dict:
    """Mean Dice over the query subjects of each class's own sigmoid > 0.5 (overlaps allowed), from the
    probabilities nnU-Net saved (channel i = the model's i-th class, in the original image's grid)."""
    import SimpleITK as sitk
    import numpy as np
    scores = {organ: [] for organ in model_labels if organ in truth_labels}
    for s in QUERY_A.subjects:
        probabilities = np.load(predictions / f"{s}.npz")["probabilities"]
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(truth_folder / f"{s}.nii.gz")))
        for channel, organ in enumerate(model_labels):
            if organ in scores:
                p, t = probabilities[channel] > 0.5, truth == truth_labels[organ]
                scores[organ].append(2 * (p & t).sum() / max(1, p.sum() + t.sum()))
    return {organ: float(np.mean(v)) for organ, v in scores.items()}


def experiment1(work: Path, results: Path, command: str, device: str) -> None:
    records = []
    for name, (dataset, trainer) in PRETRAIN.items():
        record_file = work / "exp1" / f"{name}.json"
        model = model_folder(work, dataset, trainer)
        old = json.loads(record_file.read_text()) if record_file.is_file() else None
        if old and "dice_per_class_sigmoid" in old:  # None for a softmax model
            records.append(old)
            continue
        if old:  # recorded before the per-class sigmoid scoring existed: score again, keep its training time
            seconds = old["train_seconds"] or 0.0
        else:
            plan_pretraining(work, dataset)
            seconds = train(work, dataset, trainer, device, PRETRAIN_ENV)
        dice, per_sigmoid = predict_and_score(work, model, name, device)
        records.append({"model": name, "trainer": trainer, "dataset": dataset, "dice_per_class": dice,
                        "dice": sum(dice.values()) / len(dice), "train_seconds": round(seconds, 1) or None,
                        "dice_per_class_sigmoid": per_sigmoid})
        record_file.parent.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(records[-1], indent=2))
        print(name, {k: round(v, 3) for k, v in dice.items()}, flush=True)
    write_experiment1(results, records, command)


def scored_rows(records: list) -> list:
    """One row per model scored on its label map, plus one per sigmoid model scored class by class."""
    rows = []
    for r in records:
        rows.append(dict(r, scoring="label map"))
        if r.get("dice_per_class_sigmoid"):
            per = r["dice_per_class_sigmoid"]
            rows.append(dict(r, scoring="each sigmoid > 0.5", dice_per_class=per, dice=sum(per.values()) / len(per)))
    return rows


def write_experiment1(results: Path, records: list, command: str) -> None:
    organs = list(QUERY_A.organs)
    rows = scored_rows(records)
    results.mkdir(parents=True, exist_ok=True)
    with open(results / "abdomen_exp1_cpu.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "trainer", "dataset", "scoring", "dice"] + [f"dice_{o}" for o in organs]
                   + ["train_seconds"])
        for r in rows:
            w.writerow([r["model"], r["trainer"], r["dataset"], r["scoring"], r["dice"]]
                       + [r["dice_per_class"].get(o) for o in organs] + [r["train_seconds"]])
    title = f"Abdominal benchmark, experiment 1: partial-label pre-training ({TAG})"
    lines = [f"# {title}", "", *header(command),
             "Dice per organ on the 7 query subjects in domain A (dataset 812, never trained on), one run each.", "",
             "Label map: what nnUNetv2_predict writes (where sigmoids overlap, nnU-Net keeps the later class). "
             "Each sigmoid > 0.5: MultiTalent's own per-class evaluation, overlaps allowed.", "",
             "| model | trainer | scoring | mean | " + " | ".join(organs) + " | train time |",
             "|---|---|---|---:|" + "---:|" * len(organs) + "---:|"]
    for r in rows:
        seconds = r.get("train_seconds")
        lines.append(f"| {r['model']} | {r['trainer']} | {r['scoring']} | {r['dice']:.3f} | "
                     + " | ".join(f"{r['dice_per_class'].get(o, float('nan')):.3f}" for o in organs)
                     + f" | {'' if not seconds else f'{seconds / 60:.0f} min'} |")
    earlier = [f"- {r['model']}: {r['measured']}" for r in records if r.get("measured")]  # restored records
    if earlier:
        lines += ["", "Rows measured in an earlier run (training times then were under a heavier load):", *earlier]
    (results / "abdomen_exp1_cpu.md").write_text("\n".join(lines) + "\n")
    plot_experiment1(results / "abdomen_exp1_cpu.png", rows, organs, title)


SCORING_SUFFIX = {"each sigmoid > 0.5": ", each sigmoid"}


def plot_experiment1(path: Path, records: list, organs: list, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(1, len(records))
    for i, r in enumerate(records):
        ax.bar(np.arange(len(organs)) + i * width, [r["dice_per_class"].get(o, 0) for o in organs], width,
               label=f"{r['model']}{SCORING_SUFFIX.get(r.get('scoring'), '')} (mean {r['dice']:.2f})")
    ax.set_xticks(np.arange(len(organs)) + width * (len(records) - 1) / 2)
    ax.set_xticklabels([o.replace("_", " ") for o in organs], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Dice on the query subjects")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- experiments 2, 3

def fewshot(work: Path, n: int, args, results: Path, command: str) -> None:
    from nnunetv2_fseft.benchmark.config import load_config
    from nnunetv2_fseft.benchmark.runner import check_methods, finished_cells, run_benchmark
    from nnunetv2_fseft.errors import FSEFTError
    target = TARGETS[n]
    query = work / "abdomen_query.json"
    query.write_text(json.dumps(SPLIT["target"]["query"]))
    dataset, trainer = PRETRAIN["multitalent"]
    config = {"dataset": target.id, "foundation": str(model_folder(work, dataset, trainer)),
              "methods": args.methods or METHODS[n], "k": args.k, "seeds": args.seeds, "query": str(query),
              "device": args.device, "scratch_trainer": "FSEFTScratchTrainer_abd", "output": str(work / f"exp{n}")}
    config_file = work / f"abdomen_exp{n}.json"
    config_file.write_text(json.dumps(config, indent=2))
    try:
        config = load_config(config_file)
        check_methods(config)  # a mistyped method fails now, not after hours of pre-training
        if args.report:
            return publish(results, n, finished_cells(config), target, command, foundation_line(config.foundation))
        line = foundation_line(foundation(work, args.device))
        print(line, flush=True)
        # published after every cell, so an interrupted sitting leaves its tables
        result = run_benchmark(config, on_cell=lambda records: publish(results, n, records, target, command, line))
    except FSEFTError as e:
        die(str(e))
    publish(results, n, result["records"], target, command, line)


def foundation_line(model: Path) -> str:
    """Which foundation the cells adapt: cells of two foundations must not share a table, and a rebuilt foundation
    is the same one only if its weights are bitwise equal (the file's own hash changes with its log)."""
    from nnunetv2_fseft.checkpoints import weights_sha256
    checkpoint = Path(model) / "fold_0" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        return f"Foundation: {checkpoint} not found."
    return f"Foundation: {checkpoint.parent.parent.name}, network-weights sha256 {weights_sha256(checkpoint)}."


def publish(results: Path, n: int, records: list, target, command: str, which_foundation: str) -> None:
    """The harness's tables, titled with what the data are, under results/abdomen_exp<n>_cpu.*"""
    what = {2: "known organs across the domain shift (A -> B)", 3: "novel organs in domain B"}[n]
    bench_env.publish_fewshot(results / f"abdomen_exp{n}_cpu", records,
                              f"Abdominal benchmark, experiment {n}: {what} ({TAG})",
                              [*header(command), f"Target {target.folder_name}: {target.role}.", "",
                               which_foundation, ""])


def header(command: str) -> list:
    return bench_env.provenance(command, f"preset `{PRESET}` (plans/{PRESET}.json), schedules in "
                                "benchmarks/ext/abdomen_trainers.py. Data: benchmarks/abdomen_split.json, "
                                "benchmarks/abdomen_priors.json.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--experiment", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--k", type=int, nargs="+", default=[1, 5])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None, help="experiments 2-3; default: METHODS[experiment]")
    p.add_argument("--results", default=str(HERE / "results"), help="where the tables go (default benchmarks/results)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="nnU-Net's -device (default cpu)")
    p.add_argument("--report", action="store_true",
                   help="experiments 2-3: only rewrite the tables from the finished cells of these methods, K "
                        "and seeds")
    args = p.parse_args(argv)
    work = Path(args.workdir).resolve()
    if max(args.k) > len(SPLIT["target"]["supports"]):
        die(f"--k {max(args.k)} exceeds the {len(SPLIT['target']['supports'])} supports of {SPLIT_FILE.name}")
    require_data(work)
    setup_env(work)
    # a --report table names the command that runs its cells
    command = "python benchmarks/abdomen.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                         if a != "--report")
    if args.experiment == 1:
        experiment1(work, Path(args.results), command, args.device)
    else:
        fewshot(work, args.experiment, args, Path(args.results), command)
    print(f"results: {Path(args.results) / f'abdomen_exp{args.experiment}_cpu.md'}")


if __name__ == "__main__":
    main()
