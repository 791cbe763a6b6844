"""The configurations a user adapts, end to end on tiny phantoms: nnU-Net's 2d, a hand-made 3d_lowres with its
cascade (3d_cascade_fullres) and nnU-Net's ResEnc M preset (narrowed). Each: a foundation of the same plans ->
prepare_target -c -> FSEFTLoRATrainer with -pretrained_weights -> prediction -> merged export -> stock prediction
gives the same labels. (nnU-Net's default plans at 3d_fullres: tests/test_fseft_e2e.py.)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_fseft.export import export_model
from nnunetv2_fseft.planning import plan_with_preset, prepare_target
from nnunetv2_fseft.synthetic import write_phantom_dataset

CPU = torch.device("cpu")
BIN = Path(sys.executable).parent
FOUND, TARGET = "Dataset971_CfgFound", "Dataset972_CfgTarget"
LORA = "FSEFTLoRATrainer_test"  # with nnU-Net's final validation: 3d_lowres writes the cascade's inputs with it


class CfgPretrainTrainer(nnUNetTrainer):
    """A very short stock pre-training, run in-process: nnU-Net cannot find this class by name, as a foundation
    from elsewhere names a trainer class the user does not have."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, 4, 1


def _pretrain(root: Path, plans_name: str, configuration: str, fold, validate: bool = False) -> Path:
    pre = root / "pre" / FOUND
    plans = dict(json.loads((pre / f"{plans_name}.json").read_text()), continue_training=False)
    trainer = CfgPretrainTrainer(plans, configuration, fold, json.loads((pre / "dataset.json").read_text()), CPU)
    trainer.run_training()
    if validate:  # as nnUNetv2_train does after training
        trainer.perform_actual_validation(False)
    return Path(trainer.output_folder_base)


def _add_lowres_and_cascade(plans_file: Path) -> None:
    """What a user writes by hand when nnU-Net planned no 3d_lowres: half the resolution, the cascade after it."""
    plans = json.loads(plans_file.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres", "data_identifier": f"{plans['plans_name']}_3d_lowres",
        "spacing": [2 * s for s in fullres["spacing"]],
        "median_image_size_in_voxels": [m / 2 for m in fullres["median_image_size_in_voxels"]],
        "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    plans_file.write_text(json.dumps(plans, indent=2))


@pytest.fixture(scope="module")
def world(nnunet_env):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.run.run_training import run_training
    root, raw = nnunet_env, nnunet_env / "raw"
    write_phantom_dataset(raw, 971, "CfgFound", ["liver", "spleen"], 6, shape=(24, 24, 24), seed=0)
    write_phantom_dataset(raw, 972, "CfgTarget", ["spleen", "pancreas"], 6, shape=(24, 24, 24), seed=1,
                          intensity_shift=20)
    plan_with_preset(971, "tiny", configurations=("2d", "3d_fullres"), num_processes=1)
    _add_lowres_and_cascade(root / "pre" / FOUND / "nnUNetPlans.json")
    preprocess([971], plans_identifier="nnUNetPlans", configurations=["3d_lowres"], num_processes=[1])
    plan_with_preset(971, "tiny_resenc", num_processes=1)
    found = {"2d": _pretrain(root, "nnUNetPlans", "2d", 0),
             # fold all: its validation predicts every case, the cascade's input for training
             "3d_lowres": _pretrain(root, "nnUNetPlans", "3d_lowres", "all", validate=True),
             "resenc": _pretrain(root, "nnUNetResEncUNetMPlans", "3d_fullres", 0)}
    found["3d_cascade_fullres"] = _pretrain(root, "nnUNetPlans", "3d_cascade_fullres", 0)
    lines = []
    prepare_target(972, found["2d"], num_processes=1, configurations=["2d", "3d_lowres", "3d_cascade_fullres"],
                   log=lines.append)
    prepare_target(972, found["resenc"], num_processes=1, log=lines.append)
    weights = {k: str(v / ("fold_all" if k == "3d_lowres" else "fold_0") / "checkpoint_final.pth")
               for k, v in found.items()}
    run_training("972", "2d", 0, LORA + "noval", device=CPU, pretrained_weights=weights["2d"])
    run_training("972", "3d_fullres", 0, LORA + "noval", "nnUNetResEncUNetMPlans", device=CPU,
                 pretrained_weights=weights["resenc"])
    run_training("972", "3d_lowres", "all", LORA, device=CPU, pretrained_weights=weights["3d_lowres"])
    run_training("972", "3d_cascade_fullres", 0, LORA, device=CPU,
                 pretrained_weights=weights["3d_cascade_fullres"])
    images = root / "cfg_images"
    images.mkdir()
    shutil.copy(raw / TARGET / "imagesTr" / "cfgtarget_000_0000.nii.gz", images)
    return {"root": root, "lines": lines, "images": images}


def _model(world, trainer: str, plans: str, configuration: str) -> Path:
    return world["root"] / "res" / TARGET / f"{trainer}__{plans}__{configuration}"


def _predict(model: Path, fold, out: Path, images: Path, previous_stage: Path = None) -> tuple:
    """(labels, class probabilities) for the one test image."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (fold,))
    out.mkdir(parents=True)
    predictor.predict_from_files(str(images), str(out), save_probabilities=True, num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1,
                                 folder_with_segs_from_prev_stage=None if previous_stage is None else str(previous_stage))
    return (sitk.GetArrayFromImage(sitk.ReadImage(str(out / "cfgtarget_000.nii.gz"))),
            np.load(out / "cfgtarget_000.npz")["probabilities"])


def _assert_same_prediction(a: tuple, b: tuple) -> None:
    """Same probabilities up to float rounding (a merged W + BA sums in another order than W x + B(A x)), and the
    same label wherever the winning class is not a near-tie, where rounding may decide either way."""
    (labels_a, probs_a), (labels_b, probs_b) = a, b
    assert labels_a.shape == (24, 24, 24)
    difference = np.abs(probs_a - probs_b)
    # rounding is amplified where a voxel's logits sit on a steep part of the softmax: one cascade run differed by
    # 1.4e-3 at a single voxel (the same run passed before and after), so the bound is on nearly every voxel
    assert np.quantile(difference, 0.999) < 1e-3 and difference.max() < 5e-3, \
        f"probabilities differ by up to {difference.max()}"
    top2 = np.sort(probs_a, axis=0)[-2:]
    decided = (top2[1] - top2[0]) > 2e-3
    assert decided.mean() > 0.9 and np.array_equal(labels_a[decided], labels_b[decided])


def _merged_predicts_the_same(world, model: Path, fold, name: str, previous_stage: Path = None) -> None:
    merged = world["root"] / "merged" / name
    export_model(model, merged, merge=True)
    adapted = _predict(model, fold, world["root"] / "pred" / f"{name}_adapted", world["images"], previous_stage)
    stock = _predict(merged, fold, world["root"] / "pred" / f"{name}_stock", world["images"], previous_stage)
    _assert_same_prediction(adapted, stock)


def test_prepare_target_says_what_it_preprocessed_and_what_to_run(world):
    lines = world["lines"]
    assert f"preprocessed {TARGET} for 2d, 3d_lowres, 3d_cascade_fullres with plans nnUNetPlans" in lines
    assert "3d_cascade_fullres trains on the 3d_lowres predictions: train 3d_lowres first (every fold, or fold all)" \
        in lines
    assert "note: the foundation's weights are a 2d network; adapt 3d_lowres, 3d_cascade_fullres from a model folder " \
           "trained as that configuration (same plans)" in lines
    assert any(line.startswith("next: nnUNetv2_train 972 2d FOLD -p nnUNetPlans -tr FSEFTLoRATrainer "
                               "-pretrained_weights ") for line in lines)
    assert f"preprocessed {TARGET} for 3d_fullres with plans nnUNetResEncUNetMPlans" in lines
    assert any(line.startswith("other configurations in these plans: 2d") and "-plans_name nnUNetResEncUNetMPlans "
               "-c 2d" in line for line in lines)


def test_2d_adapts_and_merges_exactly_through_nnunet_commands(world):
    """nnUNetv2_predict with the plugin's trainer, stock nnUNetv2_predict_from_modelfolder on the merged export."""
    model = _model(world, LORA + "noval", "nnUNetPlans", "2d")
    merged = world["root"] / "merged" / "2d"
    r = subprocess.run([str(BIN / "nnUNetv2_fseft_export"), str(model), str(merged), "--merge"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    outs = [world["root"] / "pred" / "2d_cli", world["root"] / "pred" / "2d_cli_stock"]
    common = ["-i", str(world["images"]), "-f", "0", "-device", "cpu", "--disable_tta", "--save_probabilities", "-npp", "1",
              "-nps", "1"]
    commands = [["nnUNetv2_predict", "-o", str(outs[0]), "-d", "972", "-c", "2d", "-tr", LORA + "noval"] + common,
                ["nnUNetv2_predict_from_modelfolder", "-o", str(outs[1]), "-m", str(merged)] + common]
    for command, env in zip(commands, [os.environ, {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}]):
        r = subprocess.run([str(BIN / command[0])] + command[1:], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
    a, b = ((sitk.GetArrayFromImage(sitk.ReadImage(str(o / "cfgtarget_000.nii.gz"))),
             np.load(o / "cfgtarget_000.npz")["probabilities"]) for o in outs)
    _assert_same_prediction(a, b)


def test_resenc_m_preset_adapts_and_merges_exactly(world):
    model = _model(world, LORA + "noval", "nnUNetResEncUNetMPlans", "3d_fullres")
    plans = json.loads((model / "plans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith("ResidualEncoderUNet")
    _merged_predicts_the_same(world, model, 0, "resenc")


def test_lowres_and_its_cascade_adapt_and_merge_exactly(world):
    lowres = _model(world, LORA, "nnUNetPlans", "3d_lowres")
    assert len(list((lowres / "predicted_next_stage" / "3d_cascade_fullres").iterdir())) >= 6
    _merged_predicts_the_same(world, lowres, "all", "lowres")
    previous = world["root"] / "pred" / "lowres_adapted"
    cascade = _model(world, LORA, "nnUNetPlans", "3d_cascade_fullres")
    _merged_predicts_the_same(world, cascade, 0, "cascade", previous_stage=previous)
