"""Why did the demo's foundation miss organs? Controls on the demo's own phantoms (CPU, one torch thread each).

The demo's two phantom datasets (12 cases each: liver + spleen, liver + both kidneys; nnunetv2_fseft.demo.settings)
assembled as the demo does (Dataset510), and the same 24 images with all four organs labelled (Dataset610). Both are
planned with the 'tiny' preset and share one 5-fold split; every variant trains fold 0 for 20 x 40 iterations
(the demo's pre-training schedule) at learning rate 1e-2 without mirroring, seeded 0, and nnU-Net's final validation
scores the 5 held-out cases (MultiTalentTrainer: only the classes each case annotates).

Variants (train one per call, or several at once on a machine with spare cores):
  mt             MultiTalentTrainer, partial labels, sigmoid heads starting at p = 0.5 (nnU-Net's zero bias)
  mt_bias        MultiTalentTrainer, partial labels, heads starting at p = 0.01 (its default, head_prior)
  mt_noda        as mt, without data augmentation (nnUNetTrainerNoDA's transforms)
  mt_full        MultiTalentTrainer, every organ labelled, heads at p = 0.5
  mt_full_bias   MultiTalentTrainer, every organ labelled, heads at p = 0.01
  stock          nnUNetTrainer (softmax), every organ labelled
  stock_regions  nnUNetTrainer with one sigmoid per organ (nnU-Net's region training and loss), every organ labelled

  python benchmarks/multitalent_head_start.py WORKDIR setup
  python benchmarks/multitalent_head_start.py WORKDIR VARIANT      # appends to WORKDIR/results.jsonl
"""
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from bench_env import setup_env

ORGANS = ["liver", "spleen", "kidney_left", "kidney_right"]
EPOCHS, ITERATIONS = 20, 40
VARIANTS = ("mt", "mt_bias", "mt_noda", "mt_full", "mt_full_bias", "stock", "stock_regions")


def setup(work: Path) -> None:
    """Dataset510 (partial labels, assembled) and Dataset610 (same images and case names, every organ labelled)."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2_fseft.data.assemble import assemble_datasets
    from nnunetv2_fseft.demo.settings import SOURCES
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    raw = work / "raw"
    for dataset_id, name, organs, seed, shift in SOURCES:
        write_phantom_dataset(raw, dataset_id, name, list(organs), 12, seed=seed, intensity_shift=shift)
        # the same images (same seed, same draws), every organ labelled
        write_phantom_dataset(raw, dataset_id + 100, name + "Full", ORGANS, 12, seed=seed, intensity_shift=shift)
    partial = assemble_datasets([SOURCES[0][0], SOURCES[1][0]], 510, "PhantomFoundation", overwrite=True)
    full = raw / "Dataset610_PhantomFull"
    if full.exists():
        shutil.rmtree(full)
    shutil.copytree(partial, full)
    dataset_json = json.loads((full / "dataset.json").read_text())
    assert list(dataset_json["labels"]) == ["background", *ORGANS], dataset_json["labels"]
    del dataset_json["fseft_cases"]
    (full / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    for label in (full / "labelsTr").iterdir():
        label.unlink()  # a hard link or copy of the partial label: replaced, never written through
        source_id = SOURCES[0][0] + 100 if "liverspleen" in label.name else SOURCES[1][0] + 100
        source = next(raw.glob(f"Dataset{source_id}_*"))
        name = source.name.split("_", 1)[1].lower()
        shutil.copyfile(source / "labelsTr" / f"{name}_{label.name.split('_')[-1]}", label)
    for dataset in (510, 610):
        plan_with_preset(dataset, "tiny", num_processes=1, overwrite=True)
    ids = sorted(p.name[:-len(".nii.gz")] for p in (partial / "labelsTr").iterdir())
    splits = json.dumps(generate_crossval_split(ids, seed=12345, n_splits=5))
    for dataset in ("Dataset510_PhantomFoundation", "Dataset610_PhantomFull"):
        (work / "pre" / dataset / "splits_final.json").write_text(splits)


def trainer_class(variant: str, work: Path):
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
    base = MultiTalentTrainer if variant.startswith("mt") else nnUNetTrainer
    no_da = variant.endswith("_noda")

    class Control(base):
        # MultiTalentTrainer's heads start at p = head_prior; 0.5 is nnU-Net's zero bias (nnUNetTrainer ignores it)
        head_prior = 0.01 if variant.endswith("_bias") else 0.5

        def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cpu")):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = EPOCHS, ITERATIONS, 2
            self.initial_lr = 1e-2
            self.output_folder_base = str(work / "res" / variant)
            self.output_folder = os.path.join(self.output_folder_base, "fold_0")
            os.makedirs(self.output_folder, exist_ok=True)
            self.log_file = os.path.join(self.output_folder, "training_log.txt")

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
            rotation, dummy_2d, initial_patch_size, _ = base.configure_rotation_dummyDA_mirroring_and_inital_patch_size(self)
            self.inference_allowed_mirroring_axes = None
            return rotation, dummy_2d, (self.configuration_manager.patch_size if no_da else initial_patch_size), None

        if no_da:
            @staticmethod
            def get_training_transforms(patch_size, rotation_for_DA, deep_supervision_scales, mirror_axes,
                                        do_dummy_2d_data_aug, use_mask_for_norm=None, is_cascaded=False,
                                        foreground_labels=None, regions=None, ignore_label=None):
                return nnUNetTrainer.get_validation_transforms(deep_supervision_scales, is_cascaded,
                                                               foreground_labels, regions, ignore_label)
    return Control


def run(work: Path, variant: str) -> dict:
    import random
    import torch
    from nnunetv2_fseft.training.multitalent import as_sigmoid_regions
    torch.set_num_threads(1)
    full = variant.startswith("stock") or "_full" in variant
    pre = work / "pre" / ("Dataset610_PhantomFull" if full else "Dataset510_PhantomFoundation")
    dataset_json = json.loads((pre / "dataset.json").read_text())
    if variant == "stock_regions":
        dataset_json = as_sigmoid_regions(dataset_json)
    plans = dict(json.loads((pre / "nnUNetPlans.json").read_text()), continue_training=False)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = trainer_class(variant, work)(plans, "3d_fullres", 0, dataset_json, torch.device("cpu"))
    t0 = time.time()
    trainer.run_training()
    train_s = time.time() - t0
    trainer.perform_actual_validation(False)
    validation = Path(trainer.output_folder) / "validation"
    if (validation / "summary_annotated.json").is_file():
        classes = json.loads((validation / "summary_annotated.json").read_text())["classes"]
        dice = {k: c["Dice"] for k, c in classes.items()}
    else:  # every validation case annotates every organ
        mean = json.loads((validation / "summary.json").read_text())["mean"]
        dice = {organ: mean[key]["Dice"] for organ, key in zip(ORGANS, mean)}
    result = {"variant": variant, "schedule": f"{EPOCHS}x{ITERATIONS}", "train_s": round(train_s),
              "load_avg": round(os.getloadavg()[0], 1), "held_out_dice": {k: round(v, 3) for k, v in dice.items()}}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in ("setup", *VARIANTS):
        sys.exit(__doc__)
    work_dir = Path(sys.argv[1]).resolve()
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in-process: seeded with the rest
    setup_env(work_dir)
    if sys.argv[2] == "setup":
        setup(work_dir)
    else:
        print(json.dumps(run(work_dir, sys.argv[2])))
