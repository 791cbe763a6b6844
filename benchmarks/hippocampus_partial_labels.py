"""Issue 3's evidence: partial-label pre-training on real data (hippocampus, tiny plans, CPU).

Dataset A = the 75 'A' cases of hippocampus_split.json with only Anterior annotated; B = the 75 'B' cases with
only Posterior annotated. Three models, same budget (--epochs x 50 iterations; 20 or 40) and SGD 1e-2:
  (1) MultiTalentTrainer_<E>x50 on A+B assembled by nnUNetv2_fseft_assemble (loss masked to annotated classes)
  (2) naive merge: stock nnUNetTrainer_<E>x50 on the same assembled data (an unannotated class = background)
  (3) upper bound: stock nnUNetTrainer_<E>x50 on the same 150 cases with both classes annotated
Each predicts the 50 query cases (nnU-Net's predictor, no mirroring for all three) and nnU-Net's evaluation
scores them against the full labels.

  python benchmarks/hippocampus_partial_labels.py WORKDIR [--epochs 20|40]
"""
import argparse
import json
import sys
from pathlib import Path

from hippocampus_common import SOURCE, SPLIT, run, setup_env

TRAINERS = {"multitalent": "MultiTalentTrainer_{}x50", "naive": "nnUNetTrainer_{}x50", "upper": "nnUNetTrainer_{}x50"}


def build_datasets(work: Path) -> None:
    from nnunetv2_fseft.data.assemble import assemble_datasets
    from nnunetv2_fseft.data.convert import relabel_dataset
    from nnunetv2_fseft.planning import plan_with_preset
    if (work / "pre" / "Dataset113_HippoPartialAB" / "splits_final.json").is_file():
        return
    relabel_dataset(SOURCE, 110, "HippoFullAB", {"Anterior": ["Anterior"], "Posterior": ["Posterior"]}, overwrite=True)
    relabel_dataset(SOURCE, 111, "HippoAnteriorOnly", {"Anterior": ["Anterior"]}, overwrite=True)
    relabel_dataset(SOURCE, 112, "HippoPosteriorOnly", {"Posterior": ["Posterior"]}, overwrite=True)
    assemble_datasets([111, 112], 113, "HippoPartialAB", overwrite=True)
    cases = json.loads((work / "raw" / "Dataset113_HippoPartialAB" / "dataset.json").read_text())["fseft_cases"]
    keep = {"Dataset111_HippoAnteriorOnly": set(SPLIT["A"]), "Dataset112_HippoPosteriorOnly": set(SPLIT["B"])}
    train = sorted(c for c, info in cases.items() if c.split("_", 1)[1] in keep[info["dataset"]])
    assert len(train) == 150, len(train)
    for dataset_id, name, cases_ in ((110, "Dataset110_HippoFullAB", SPLIT["A"] + SPLIT["B"]),
                                     (113, "Dataset113_HippoPartialAB", train)):
        plan_with_preset(dataset_id, "tiny", overwrite=True)
        # validation (pseudo-Dice only) on 5 training cases: the query cases never enter any training run
        (work / "pre" / name / "splits_final.json").write_text(json.dumps([{"train": cases_, "val": cases_[:5]}]))


def predict_and_score(model: Path, out: Path) -> dict:
    """Label maps for the query cases, scored per class against the full (both-class) labels."""
    import SimpleITK as sitk
    import numpy as np
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    out.mkdir(parents=True, exist_ok=True)
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    todo = [c for c in SPLIT["query"] if not (out / f"{c}.nii.gz").is_file()]
    if todo:
        predictor.predict_from_files([[str(SOURCE / "imagesTr" / f"{c}_0000.nii.gz")] for c in todo],
                                     [str(out / c) for c in todo], num_processes_preprocessing=1,
                                     num_processes_segmentation_export=1)
    # the model's label values -> the source's (by class name), so every model is scored the same way
    names = {k: v for k, v in json.loads((model / "dataset.json").read_text())["labels"].items() if k != "background"}
    source = json.loads((SOURCE / "dataset.json").read_text())["labels"]
    mapped = out.parent / f"{out.name}_source_labels"
    mapped.mkdir(exist_ok=True)
    for c in SPLIT["query"]:
        image = sitk.ReadImage(str(out / f"{c}.nii.gz"))
        a = sitk.GetArrayFromImage(image)
        b = np.zeros_like(a)
        for name, value in names.items():
            value = value[0] if isinstance(value, list) else value
            b[a == value] = source[name]
        result = sitk.GetImageFromArray(b)
        result.CopyInformation(image)
        sitk.WriteImage(result, str(mapped / f"{c}.nii.gz"))
    summary = compute_metrics_on_folder(str(SOURCE / "labelsTr"), str(mapped), str(mapped / "summary.json"),
                                        SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1, chill=True)
    inverse = {v: k for k, v in source.items()}
    return {inverse[int(k)]: v["Dice"] for k, v in summary["mean"].items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir")
    p.add_argument("--epochs", type=int, choices=(20, 40), default=20, help="epochs of 50 iterations")
    a = p.parse_args()
    work = Path(a.workdir).resolve()
    setup_env(work)
    build_datasets(work)
    rows = []
    for label, trainer in TRAINERS.items():
        trainer = trainer.format(a.epochs)
        dataset = "Dataset110_HippoFullAB" if label == "upper" else "Dataset113_HippoPartialAB"
        model = work / "res" / dataset / f"{trainer}__nnUNetPlans__3d_fullres"
        seconds = None
        if not (model / "fold_0" / "checkpoint_final.pth").is_file():
            seconds = run([str(Path(sys.executable).parent / "nnUNetv2_train"), dataset[7:10], "3d_fullres", "0",
                           "-tr", trainer, "-device", "cpu"], work / "log.txt")
        dice = predict_and_score(model, work / "query_predictions" / f"{label}_{a.epochs}x50")
        rows.append((label, trainer, dice, seconds))
        print(label, trainer, dice, flush=True)
    lines = ["| model | trainer | Anterior Dice | Posterior Dice | mean | train time |", "|---|---|---:|---:|---:|---:|"]
    for label, trainer, dice, seconds in rows:
        lines.append(f"| {label} | {trainer} | {dice['Anterior']:.3f} | {dice['Posterior']:.3f} | "
                     f"{(dice['Anterior'] + dice['Posterior']) / 2:.3f} | {'' if seconds is None else f'{seconds:.0f} s'} |")
    print("\n".join(lines))
    (work / f"results_partial_labels_{a.epochs}x50.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
