"""A model folder from elsewhere (TotalSegmentator-style): its checkpoint names a trainer class that is not
installed here. PlainConv (nnU-Net's default plans) and ResEnc (the ResEnc M preset) folders adapt through
prepare_target + an FSEFT trainer with -pretrained_weights, map head channels by class name, and predict."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.networks import build_plain_network
from nnunetv2_fseft.planning import plan_with_preset, prepare_target
from nnunetv2_fseft.synthetic import write_phantom_dataset

CPU = torch.device("cpu")
FOREIGN_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring_NotInstalled"
TARGET = "Dataset982_ForeignTarget"


def _foreign_folder(root: Path, plans_name: str) -> Path:
    """Dataset981's model folder as another group would ship it: plans.json, dataset.json, fold_0's checkpoint in
    nnU-Net's layout, written by a trainer class this machine does not have."""
    pre = root / "pre" / "Dataset981_ForeignFound"
    plans = json.loads((pre / f"{plans_name}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    folder = root / "shipped" / f"{FOREIGN_TRAINER}__{plans_name}__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json"):
        shutil.copy(pre / name, folder / name)
    (folder / "plans.json").write_text(json.dumps(plans))
    torch.manual_seed(0)
    network = build_plain_network(plans, "3d_fullres", dataset_json, deep_supervision=True)
    torch.save({"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 4000,
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                              "device": torch.device("cpu")},
                "trainer_name": FOREIGN_TRAINER, "inference_allowed_mirroring_axes": None},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


@pytest.fixture(scope="module")
def world(nnunet_env):
    raw = nnunet_env / "raw"
    write_phantom_dataset(raw, 981, "ForeignFound", ["liver", "spleen", "kidney_left"], 4, shape=(24, 24, 24), seed=0)
    write_phantom_dataset(raw, 982, "ForeignTarget", ["spleen", "pancreas"], 5, shape=(24, 24, 24), seed=1)
    plan_with_preset(981, "tiny", num_processes=1)
    plan_with_preset(981, "tiny_resenc", num_processes=1)
    images = nnunet_env / "foreign_images"
    images.mkdir()
    shutil.copy(raw / TARGET / "imagesTr" / "foreigntarget_000_0000.nii.gz", images)
    return {"root": nnunet_env, "images": images}


@pytest.mark.parametrize("plans_name, network", [("nnUNetPlans", "PlainConvUNet"),
                                                 ("nnUNetResEncUNetMPlans", "ResidualEncoderUNet")])
def test_folder_naming_an_uninstalled_trainer_adapts_and_predicts(world, plans_name, network):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import run_training
    folder = _foreign_folder(world["root"], plans_name)
    lines = []
    prepare_target(982, folder, num_processes=1, log=lines.append)
    assert f"foundation: nnU-Net model {folder} ({network}, trained as 3d_fullres): its plans are used for " \
           f"{TARGET}" in lines
    run_training("982", "3d_fullres", 0, "FSEFTLoRATrainer_testnoval", plans_name, device=CPU,
                 pretrained_weights=str(folder / "fold_0" / "checkpoint_final.pth"))
    model = world["root"] / "res" / TARGET / f"FSEFTLoRATrainer_testnoval__{plans_name}__3d_fullres"
    log = next((model / "fold_0").glob("training_log_*.txt")).read_text()
    assert "head: target 'spleen' <- foundation channel 2 ('spleen')" in log
    assert "head: new classes start fresh: pancreas" in log
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    out = world["root"] / "foreign_pred" / plans_name
    out.mkdir(parents=True)
    predictor.predict_from_files_sequential(str(world["images"]), str(out))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "foreigntarget_000.nii.gz")))
    assert labels.shape == (24, 24, 24) and set(np.unique(labels)) <= {0, 1, 2}
