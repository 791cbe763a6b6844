"""nnUNetv2_fseft_prepare_target from an nnssl checkpoint, as a user runs it: nnU-Net fingerprints and plans the
target, 3d_fullres takes the checkpoint's network, normalization and spacing and a patch that fits that network,
then FSEFT trains from the checkpoint and the merged export predicts the same labels with stock nnU-Net."""
import importlib
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from foundation_files import tiny_architecture, tiny_network, write_checkpoint
from nnunetv2_fseft.export import export_model
from nnunetv2_fseft.foundation_plans import MemoryEstimate, fit_patch, total_stride
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.foundations.architectures import RESENC_L
from nnunetv2_fseft.synthetic import write_phantom_dataset
from phantom_world import model_folder

CPU = torch.device("cpu")
CITATION = {"type": "paper", "name": "Tiny SSL", "apa_citations": ["Roe, R. (2026). Tiny self-supervised encoders."]}
ERROR = "nnunetv2_fseft: error: "


def _two_channel(raw, source: str, name: str):
    """The dataset again with a second channel (T2: the image inverted), channels named T1 and T2."""
    dst = raw / name
    shutil.copytree(raw / source, dst)
    for image in sorted((dst / "imagesTr").glob("*_0000.nii.gz")):
        t1 = sitk.ReadImage(str(image))
        t2 = sitk.GetImageFromArray(-sitk.GetArrayFromImage(t1))
        t2.CopyInformation(t1)
        sitk.WriteImage(t2, str(image).replace("_0000.nii.gz", "_0001.nii.gz"))
    dataset_json = json.loads((dst / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "T1", "1": "T2"}
    (dst / "dataset.json").write_text(json.dumps(dataset_json))


@pytest.fixture(scope="module")
def ssl(nnunet_env):
    """A tiny ResEnc nnssl checkpoint (2 mm, 16^3 recommended patch), a 1-channel target and a 2-channel one."""
    raw = nnunet_env / "raw"
    write_phantom_dataset(raw, 931, "SslPlan", ["spleen", "pancreas"], 4, shape=(24, 24, 24), seed=3)
    _two_channel(raw, "Dataset931_SslPlan", "Dataset932_SslPlanTwo")
    architecture = tiny_architecture("ResidualEncoderUNet")
    checkpoint = write_checkpoint(nnunet_env / "tiny_ssl.pth", network_weights=tiny_network(architecture).state_dict(),
                                  architecture=architecture, spacing=[2.0, 2.0, 2.0],
                                  normalization_schemes=["ZScoreNormalization"], patch_size=[16, 16, 16],
                                  citations=[CITATION])
    return {"root": nnunet_env, "checkpoint": checkpoint, "architecture": architecture}


def _main(argv, capsys) -> list:
    from nnunetv2_fseft.cli.prepare_target import main
    capsys.readouterr()
    main([str(a) for a in argv])
    return capsys.readouterr().out.splitlines()


def _plans(ssl, dataset: str, name: str) -> dict:
    return json.loads((ssl["root"] / "pre" / dataset / f"{name}.json").read_text())


def test_nnssl_checkpoint_plans_its_network_spacing_normalization_and_a_fitting_patch(ssl, capsys):
    out = _main(["-d", 931, "-m", ssl["checkpoint"], "-np", 1], capsys)
    checkpoint = ssl["checkpoint"]
    assert f"foundation: nnssl checkpoint {checkpoint} (ResidualEncoderUNet, encoder + stem: decoder and head " \
           "start fresh)" in out
    assert "cite: paper Tiny SSL: Roe, R. (2026). Tiny self-supervised encoders." in out
    assert "spacing: [2.0, 2.0, 2.0] (the checkpoint's, like_pretrained)" in out
    # 24 voxels at 1.5 mm are 18 at 2 mm: rounded up to the stride (4) is 20, capped at the recommended 16
    assert any(line.startswith("3d_fullres: patch [16, 16, 16] (fits the data (median [18, 18, 18]) and 8 GB; a "
                               "multiple of the network's total stride [4, 4, 4]), batch 2, normalization "
                               "ZScoreNormalization") for line in out), out
    assert "preprocessed Dataset931_SslPlan for 3d_fullres with plans nnsslPlans" in out
    assert out[-1] == f"next: nnUNetv2_train 931 3d_fullres FOLD -p nnsslPlans -tr FSEFTDecoderLoRATrainer " \
                      f"-pretrained_weights {checkpoint}"
    plans = _plans(ssl, "Dataset931_SslPlan", "nnsslPlans")
    assert list(plans["configurations"]) == ["3d_fullres"]
    config = plans["configurations"]["3d_fullres"]
    assert config["architecture"] == read_foundation(checkpoint).architecture == ssl["architecture"]
    assert config["spacing"] == [2.0, 2.0, 2.0] and config["patch_size"] == [16, 16, 16] and config["batch_size"] == 2
    assert config["normalization_schemes"] == ["ZScoreNormalization"]  # the checkpoint's, not nnU-Net's CT choice
    info = plans["pretrain_info"]
    assert info["source"] == "nnssl" and info["citations"] == [CITATION] and info["parts"] == "encoder"
    assert info["weights_sha256"] == read_foundation(checkpoint).weights_sha256
    assert len(list((ssl["root"] / "pre" / "Dataset931_SslPlan" / "nnsslPlans_3d_fullres").glob("*.b2nd"))) == 8


def test_adapting_the_nnssl_checkpoint_trains_predicts_and_merges_exactly(ssl, capsys):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.run.run_training import run_training
    if not (ssl["root"] / "pre" / "Dataset931_SslPlan" / "nnsslPlans.json").is_file():
        _main(["-d", 931, "-m", ssl["checkpoint"], "-np", 1], capsys)
    run_training("931", "3d_fullres", "all", "FSEFTDecoderLoRATrainer_testnoval", plans_identifier="nnsslPlans",
                 device=CPU, pretrained_weights=str(ssl["checkpoint"]))
    trained = ssl["root"] / "res" / "Dataset931_SslPlan" / "FSEFTDecoderLoRATrainer_testnoval__nnsslPlans__3d_fullres"
    merged = ssl["root"] / "ssl_plan_merged"
    export_model(trained, merged, merge=True)
    images = ssl["root"] / "ssl_plan_images"
    images.mkdir()
    shutil.copy(ssl["root"] / "raw" / "Dataset931_SslPlan" / "imagesTr" / "sslplan_000_0000.nii.gz", images)
    labels = []
    for model in (trained, merged):
        predictor = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model), ("all",))
        out = ssl["root"] / "ssl_plan_pred" / model.name
        out.mkdir(parents=True)
        predictor.predict_from_files_sequential(str(images), str(out))
        labels.append(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "sslplan_000.nii.gz"))))
    assert labels[0].shape == (24, 24, 24) and np.array_equal(labels[0], labels[1])


def test_two_channel_target_says_which_rule_maps_the_stem_and_takes_dataset_spacing_and_a_given_patch(ssl, capsys):
    out = _main(["-d", 932, "-m", ssl["checkpoint"], "-np", 1, "--spacing", "dataset", "--patch-size", 8, 8, 8,
                 "-p", "nnsslPlansTwo"], capsys)
    assert ("channels differ (target 2: T1, T2; foundation 1: not named): input channels: the foundation's one channel "
            "repeated over the target's 2 ('T1', 'T2') and divided by 2 (nnssl's rule); the stem trains in every "
            "method") in out
    assert "spacing: the dataset's own (nnU-Net's choice)" in out
    config = _plans(ssl, "Dataset932_SslPlanTwo", "nnsslPlansTwo")["configurations"]["3d_fullres"]
    assert config["spacing"] == [1.5, 1.5, 1.5] and config["patch_size"] == [8, 8, 8]
    assert config["normalization_schemes"] == ["ZScoreNormalization"] * 2 and config["use_mask_for_norm"] == [False] * 2
    assert config["data_identifier"] == "nnsslPlansTwo_3d_fullres"


@pytest.mark.parametrize("args, message", [
    (["-c", "2d"], r"an nnssl checkpoint is a 3D network: only 3d_fullres applies \(got -c 2d\)"),
    (["--patch-size", 10, 12, 12], r"--patch-size 10 12 12: axis 0 \(10\) is not a multiple of the network's total "
                                   r"stride 4; use e.g. 8"),
    (["--patch-size", 8, 8], r"--patch-size has 2 values but the network is 3-D; pass 3 values"),
    (["--spacing", "1", "x"], r"--spacing 1 x is not one of like_pretrained, dataset or three numbers"),
    (["--spacing", 1, 1], r"--spacing \[1.0, 1.0\] is not one of like_pretrained, dataset or three positive numbers"),
    (["--cpu", "--patch-size", 8, 8, 8], r"--patch-size and --cpu both set the patch; pass one of them"),
], ids=["2d", "patch stride", "patch dims", "spacing word", "spacing count", "cpu and patch"])
def test_bad_options_give_one_line_and_write_nothing(ssl, capsys, args, message):
    import re
    main = importlib.import_module("nnunetv2_fseft.cli.prepare_target").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in ["-d", 931, "-m", ssl["checkpoint"], "-p", "nnsslRefused"] + args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith(ERROR), err
    assert re.search(message, err[0][len(ERROR):]), err[0]
    assert not (ssl["root"] / "pre" / "Dataset931_SslPlan" / "nnsslRefused.json").exists()


def test_patch_for_resenc_l_is_a_stride_multiple_within_the_memory_target_and_no_larger_than_the_data():
    stride = total_stride(RESENC_L["arch_kwargs"], 3)
    assert stride == [32, 32, 32]
    patches = {}
    for gb in (8, 24):
        memory = MemoryEstimate(RESENC_L, 1, 4, gb)
        patches[gb] = fit_patch([180, 300, 300], stride, lambda p: memory.fits(p, 2), cap=[192, 192, 192])
        assert all(p % 32 == 0 for p in patches[gb]) and memory.fits(patches[gb], 2)
    assert patches[8] == [96, 160, 160]  # nnU-Net's estimate: a ResEnc-L at batch 2 in 8 GB
    assert patches[24] == [192, 192, 192]  # up to the checkpoint's recommended patch
    assert fit_patch([20, 24, 24], stride, lambda p: True) == [32, 32, 32]  # one stride: nnU-Net pads the data
