"""MultiTalentTrainer: dataset.json handling, balanced sampling, masked pseudo-Dice, and a tiny end-to-end run
through nnU-Net's own commands (plan, train, predict) on two partially labelled phantom datasets (CPU)."""
import json
import math
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
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from foundation_files import tiny_architecture
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.names import foreground_label_names
from nnunetv2_fseft.synthetic import write_phantom_dataset
from nnunetv2_fseft.training.multitalent import (MultiTalentTrainer, annotated_channels_by_case,
                                                 annotated_only_summary, as_sigmoid_regions, check_channel_order)

BIN = Path(sys.executable).parent
UNIFIED = {"background": 0, "liver": 1, "spleen": 2, "kidney_left": 3}
SOURCES = {"PartA": (["liver", "spleen"], 5, 0), "PartB": (["liver", "kidney_left"], 3, 1)}  # classes, cases, seed
DATASET_ID, FULL_ID = 993, 994
slow = pytest.mark.skipif(os.environ.get("FSEFT_SLOW_TESTS") != "1",
                          reason="plans a dataset and trains with nnU-Net (about 3 min on 2 idle cores, 11 min on "
                                 "busy ones); set FSEFT_SLOW_TESTS=1")


# ---------------------------------------------------------------- dataset.json helpers

def test_integer_labels_become_one_sigmoid_region_per_class():
    dj = as_sigmoid_regions({"labels": {"background": 0, "spleen": 2, "liver": 1, "ignore": 3}})
    assert dj["labels"] == {"background": 0, "liver": [1, 1], "spleen": [2, 2], "ignore": 3}
    assert dj["regions_class_order"] == [1, 2]
    lm = LabelManager(dj["labels"], dj["regions_class_order"])
    assert lm.has_regions and lm.num_segmentation_heads == 2 and lm.ignore_label == 3
    assert check_channel_order(dj) == foreground_label_names(dj) == ["liver", "spleen"]
    assert as_sigmoid_regions(dj) == dj  # idempotent: checkpoints and results folders hold the converted form


def test_existing_regions_are_kept():
    # what nnUNetv2_fseft_assemble writes for a tumour inside the liver
    dj = {"labels": {"background": 0, "liver": [1, 2], "liver tumor": 2, "spleen": 3}, "regions_class_order": [1, 2, 3]}
    assert as_sigmoid_regions(dj) == dj
    assert check_channel_order(dj) == ["liver", "liver tumor", "spleen"]


def test_labels_listed_out_of_value_order_are_refused():
    dj = {"labels": {"background": 0, "spleen": [3], "liver": [1, 2]}, "regions_class_order": [3, 1]}
    with pytest.raises(FSEFTError, match="increasing value order"):
        check_channel_order(dj)


def test_annotated_channels_by_case():
    dj = {"labels": {"background": 0, "Liver": 1, "spleen": 2},
          "fseft_cases": {"a": {"dataset": "A", "annotated": ["liver"]}, "b": {"dataset": "B", "annotated": ["Spleen"]}}}
    assert annotated_channels_by_case(dj, ["Liver", "spleen"]) == {"a": [0], "b": [1]}
    dj["fseft_cases"]["c"] = {"dataset": "C", "annotated": ["pancreas"]}
    with pytest.raises(FSEFTError, match="pancreas"):
        annotated_channels_by_case(dj, ["Liver", "spleen"])


def test_bad_fseft_cases_stop_the_trainer_with_one_line():
    dj = {"labels": {"background": 0, "liver": 1}, "fseft_cases": {"a": {"annotated": ["pancreas"]}}}
    with pytest.raises(SystemExit, match="nnunetv2_fseft: error: .*pancreas"):
        MultiTalentTrainer({}, "3d_fullres", 0, dj, torch.device("cpu"))


def test_annotated_only_summary_skips_unannotated_classes():
    metrics = lambda *d: {f"({k}, {k})": {"Dice": v} for k, v in zip((1, 2), d)}  # noqa: E731
    summary = {"metric_per_case": [{"reference_file": "/x/a_0.nii.gz", "metrics": metrics(0.8, 0.0)},
                                   {"reference_file": "/x/b_0.nii.gz", "metrics": metrics(0.6, 0.9)}]}
    result = annotated_only_summary(summary, ["(1, 1)", "(2, 2)"], ["liver", "spleen"], {"a_0": [0]}, ".nii.gz")
    assert result["classes"] == {"liver": {"Dice": 0.7, "n_cases": 2}, "spleen": {"Dice": 0.9, "n_cases": 1}}
    assert result["foreground_mean_Dice"] == pytest.approx(0.8)


# ---------------------------------------------------------------- a planned, partially labelled dataset

def _assemble(raw: Path) -> Path:
    """PartA (5 cases, liver + spleen) and PartB (3 cases, liver + kidney_left) relabelled into one label space."""
    out = raw / f"Dataset{DATASET_ID}_MTPhantom"
    (out / "imagesTr").mkdir(parents=True)
    (out / "labelsTr").mkdir()
    cases = {}
    for i, (name, (classes, n, seed)) in enumerate(SOURCES.items()):
        src = write_phantom_dataset(raw, 900 + i, name, classes, n, seed=seed)
        to_unified = np.array([0] + [UNIFIED[c] for c in classes], np.uint8)
        for label_file in sorted((src / "labelsTr").glob("*.nii.gz")):
            case = label_file.name[:-len(".nii.gz")]
            shutil.copy(src / "imagesTr" / f"{case}_0000.nii.gz", out / "imagesTr")
            image = sitk.ReadImage(str(label_file))
            relabelled = sitk.GetImageFromArray(to_unified[sitk.GetArrayFromImage(image)])
            relabelled.CopyInformation(image)
            sitk.WriteImage(relabelled, str(out / "labelsTr" / label_file.name))
            cases[case] = {"dataset": name, "annotated": classes}
        shutil.rmtree(src)
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": UNIFIED, "numTraining": len(cases), "file_ending": ".nii.gz",
        "fseft_cases": cases}, indent=2))
    return out


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    env = dict(os.environ)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (root / var).mkdir()
        env[var] = str(root / var)
    ext = subprocess.run([str(BIN / "nnUNetv2_fseft_ext_path")], capture_output=True, text=True, check=True)
    env.update(nnUNet_extTrainer=os.pathsep.join([ext.stdout.strip(), str(Path(__file__).resolve().parent / "ext")]),
               nnUNet_n_proc_DA="0", nnUNet_compile="0", nnUNet_def_n_proc="1")  # tests/ext: MultiTalentTrainer_tiny
    _assemble(root / "nnUNet_raw")
    write_phantom_dataset(root / "nnUNet_raw", FULL_ID, "Full", list(UNIFIED)[1:], 2, seed=7)  # to predict
    # not with nnUNet_n_proc_DA=0: nnU-Net 2.8.1's planner calls torch.set_num_threads(get_allowed_n_proc_DA())
    plan_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    r = subprocess.run([str(BIN / "nnUNetv2_fseft_plan"), "-d", str(DATASET_ID), "--preset", "tiny"],
                       env=plan_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return root, env


@slow
def test_trainer_balances_sources_and_masks_unannotated_classes(planned, monkeypatch):
    """In process, fold 'all': sampling ∝ 1/sqrt(n), per-sample masks from the batch keys, masked pseudo-Dice."""
    root, env = planned
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile"):
        monkeypatch.setenv(var, env[var])
    pre = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_MTPhantom"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    trainer = MultiTalentTrainer(plans, "3d_fullres", "all", json.loads((pre / "dataset.json").read_text()),
                                 torch.device("cpu"))
    assert trainer.label_manager.has_regions and trainer.label_manager.num_segmentation_heads == 3
    trainer.initialize()
    train_loader, val_loader = trainer.get_dataloaders()

    loader = train_loader.data_loader
    p = dict(zip(loader.indices, loader.sampling_probabilities))
    assert p["parta_000"] / p["partb_000"] == pytest.approx(np.sqrt(3) / np.sqrt(5))
    assert sum(p.values()) == pytest.approx(1.0)

    batch = next(train_loader)
    assert np.isfinite(trainer.train_step(batch)["loss"])

    batch = next(val_loader)
    batch["keys"] = np.array(["parta_000", "parta_001"])  # both from PartA: kidney_left is not annotated
    trainer.network.eval()
    with torch.no_grad():
        out = trainer.validation_step(batch)
    assert out["tp_hard"][2] == out["fp_hard"][2] == out["fn_hard"][2] == 0
    assert out["tp_hard"][0] + out["fn_hard"][0] > 0  # liver is annotated and present
    trainer.on_validation_epoch_end([out])
    dice = trainer.logger.get_value("dice_per_class_or_region", step=-1)
    assert np.isnan(dice[2]) and not np.isnan(dice[0])
    assert np.isfinite(trainer.logger.get_value("mean_fg_dice", step=-1))


@slow
def test_train_and_predict_with_nnunet_commands(planned):
    """nnUNetv2_train/-predict find the trainer via nnUNet_extTrainer and run on partial labels; outputs are one
    sigmoid per class of either source, painted into one label map; the checkpoint names its classes.

    Four epochs of ten iterations learn the large liver (labelled by both sources) but not reliably the small
    spleen and kidney, so this test does not assert that those are found (see test_partial_label_loss.py for
    that, on a toy problem)."""
    root, env = planned
    train = subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0",
                            "-tr", "MultiTalentTrainer_tiny", "-device", "cpu"],
                           env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    assert "Mean Validation Dice over annotated classes only" in train.stdout

    model = root / "nnUNet_results" / f"Dataset{DATASET_ID}_MTPhantom" / "MultiTalentTrainer_tiny__nnUNetPlans__3d_fullres"
    results_json = json.loads((model / "dataset.json").read_text())
    assert results_json["labels"] == {"background": 0, "liver": [1, 1], "spleen": [2, 2], "kidney_left": [3, 3]}
    assert results_json["regions_class_order"] == [1, 2, 3] and "fseft_cases" in results_json

    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "MultiTalentTrainer_tiny"
    assert foreground_label_names(checkpoint["init_args"]["dataset_json"]) == ["liver", "spleen", "kidney_left"]
    heads = [k for k in checkpoint["network_weights"] if k.startswith("decoder.seg_layers.") and k.endswith(".weight")]
    assert all(checkpoint["network_weights"][k].shape[0] == 3 for k in heads)  # one channel per class, no background

    summary = json.loads((model / "fold_0" / "validation" / "summary_annotated.json").read_text())
    assert set(summary["classes"]) == {"liver", "spleen", "kidney_left"}

    full = root / "nnUNet_raw" / f"Dataset{FULL_ID:03d}_Full"
    out = root / "predicted"
    predict = subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(full / "imagesTr"), "-o", str(out),
                              "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr", "MultiTalentTrainer_tiny",
                              "-device", "cpu", "--disable_tta", "--save_probabilities", "-npp", "1", "-nps", "1"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert predict.returncode == 0, predict.stdout[-3000:] + predict.stderr[-3000:]
    for case in ("full_000", "full_001"):
        probabilities = np.load(out / f"{case}.npz")["probabilities"]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(full / "labelsTr" / f"{case}.nii.gz")))
        assert probabilities.shape == (3, *seg.shape)  # liver, spleen, kidney_left: independent sigmoids
        painted = np.zeros(seg.shape, np.uint8)
        for channel, value in enumerate(results_json["regions_class_order"]):
            painted[probabilities[channel] > 0.5] = value  # later classes win where sigmoids overlap
        assert np.array_equal(seg, painted)
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
        liver = truth == 1
        assert probabilities[0][liver].mean() > probabilities[0][~liver].mean() + 0.1  # something was learned


class _Interrupted(Exception):
    pass


class MultiTalentTrainer_resumetest(MultiTalentTrainer):
    """Two short epochs, checkpoint_latest.pth after each; interrupted after the first unless told otherwise."""
    interrupt = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 2, 3, 1
        self.save_every = 1

    def on_epoch_end(self):
        super().on_epoch_end()
        if self.interrupt and self.current_epoch == 1:  # after epoch 0's checkpoints
            raise _Interrupted()

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass


@slow
def test_resume_with_c_keeps_class_masks_sampling_and_optimizer(planned, monkeypatch):
    """What nnUNetv2_train ... -tr MultiTalentTrainer --c does after an interruption: nnU-Net builds the trainer
    again from the preprocessed dataset.json, loads checkpoint_latest.pth and trains on. The per-case class masks,
    the sigmoid regions, the balanced sampling and the SGD momentum all carry over."""
    from nnunetv2_fseft.losses.partial_label import PartialLabelDCBCELoss
    root, env = planned
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile"):
        monkeypatch.setenv(var, env[var])
    pre = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_MTPhantom"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())

    def trainer(resume):  # as nnunetv2.run.run_training builds it (--c travels in the plans)
        return MultiTalentTrainer_resumetest(dict(plans, continue_training=resume), "3d_fullres", 0, dataset_json,
                                             torch.device("cpu"))

    first = trainer(False)
    with pytest.raises(_Interrupted):
        first.run_training()
    latest = Path(first.output_folder) / "checkpoint_latest.pth"
    saved = torch.load(latest, map_location="cpu", weights_only=False)

    resumed = trainer(True)
    resumed.interrupt = False
    resumed.load_checkpoint(str(latest))  # nnU-Net's maybe_load_checkpoint
    assert resumed.current_epoch == 1
    assert resumed.annotated_by_case == first.annotated_by_case
    assert resumed.annotated_by_case["parta_000"] == [0, 1] and resumed.annotated_by_case["partb_000"] == [0, 2]
    assert resumed.my_init_kwargs["dataset_json"] == first.my_init_kwargs["dataset_json"]
    assert resumed.label_manager.has_regions and resumed.channel_names == ["liver", "spleen", "kidney_left"]
    assert isinstance(getattr(resumed.loss, "loss", resumed.loss), PartialLabelDCBCELoss)
    momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
    expected = [s["momentum_buffer"] for s in saved["optimizer_state"]["state"].values()]
    assert momentum and all(torch.equal(a, b) for a, b in zip(momentum, expected))
    for k, v in resumed.network.state_dict().items():
        assert torch.equal(v, saved["network_weights"][k]), k

    resumed.run_training()
    assert resumed.dataloader_train.data_loader.sampling_probabilities is not None  # still ∝ 1/sqrt(n)
    final = torch.load(Path(resumed.output_folder) / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 2 and len(final["logging"]["train_losses"]) == 2
    assert final["init_args"]["dataset_json"]["labels"]["liver"] == [1, 1]


def test_fresh_sigmoid_heads_start_near_the_prior_not_at_one_half():
    """Before any training a MultiTalent network says p ~ head_prior (0.01) for every class, where nnU-Net's zero-bias
    heads say 0.5 everywhere: the start that let the demo's foundation learn small organs (docs/multitalent.md)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager({"dataset_name": "Dataset999_X", "plans_name": "tinyPlans", "configurations": {
        "3d_fullres": {"architecture": tiny_architecture("PlainConvUNet"), "patch_size": [16, 16, 16]}}})
    configuration = plans.get_configuration("3d_fullres")
    torch.manual_seed(0)
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        ours = MultiTalentTrainer.build_network_architecture(plans, configuration, 1, 3, False)
        stock = nnUNetTrainer.build_network_architecture(plans, configuration, 1, 3, False)
        assert torch.sigmoid(ours(image)).mean() < 0.05
        assert abs(torch.sigmoid(stock(image)).mean() - 0.5) < 0.1
    assert all(torch.allclose(h.bias, torch.full_like(h.bias, math.log(0.01 / 0.99))) for h in ours.decoder.seg_layers)
