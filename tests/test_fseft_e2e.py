"""Issue 2 end to end on tiny phantoms: stock pre-training -> every FSEFT trainer with -pretrained_weights ->
prediction -> merged / adapter export -> stock prediction gives the same labels."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.checkpoints import read_adapter, weights_sha256
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.export import apply_adapter, export_model
from nnunetv2_fseft.files import sha256
from nnunetv2_fseft.peft import METHODS
from nnunetv2_fseft.planning import prepare_target
from phantom_world import foundation_and_target, model_folder as _model_folder

FSEFT = ["FSEFTFullFTTrainer", "FSEFTFTLastTrainer", "FSEFTDecoderTrainer", "FSEFTLinearProbeTrainer",
         "FSEFTSpatialAdapterTrainer", "FSEFTBitFitTrainer", "FSEFTAffineNormTrainer", "FSEFTCNNAdapterTrainer",
         "FSEFTAdaptFormerTrainer", "FSEFTLoRATrainer", "FSEFTDecoderLoRATrainer", "FSEFTDecoderBitFitTrainer",
         "FSEFTDecoderAdaptFormerTrainer", "FSEFTDecoderAffineNormTrainer"]
UNMERGEABLE = {"FSEFTSpatialAdapterTrainer", "FSEFTAdaptFormerTrainer", "FSEFTDecoderAdaptFormerTrainer"}
CPU = torch.device("cpu")
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def world(nnunet_env):
    from nnunetv2.run.run_training import run_training
    raw = nnunet_env / "raw"
    foundation = foundation_and_target(nnunet_env, 901, 902)
    prepare_target(902, foundation, num_processes=1)
    for trainer in FSEFT:
        run_training("902", "3d_fullres", 0, f"{trainer}_testnoval", device=CPU,
                     pretrained_weights=str(foundation / "fold_0" / "checkpoint_final.pth"))
    images = nnunet_env / "images"
    images.mkdir()
    for case in ("target_000", "target_001"):
        shutil.copy(raw / "Dataset902_Target" / "imagesTr" / f"{case}_0000.nii.gz", images)
    return {"root": nnunet_env, "foundation": foundation, "images": images}


def _predict(model_folder, out):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), (0,))
    Path(out).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(model_folder.parent / "_in"), str(out))
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(Path(out).glob("*.nii.gz"))}


def _labels(world, model_folder, name):
    inputs = model_folder.parent / "_in"
    if not inputs.exists():
        shutil.copytree(world["images"], inputs)
    return _predict(model_folder, world["root"] / "pred" / name)


@pytest.mark.parametrize("trainer", FSEFT)
def test_trainer_writes_checkpoint_and_adapter_and_keeps_frozen_weights(world, trainer):
    fold = _model_folder(world["root"], "Dataset902_Target", f"{trainer}_testnoval") / "fold_0"
    config, tensors = read_adapter(fold)
    assert config["trainer_name"] == f"{trainer}_testnoval" and config["method"] in METHODS
    foundation_file = world["foundation"] / "fold_0" / "checkpoint_final.pth"
    assert config["foundation"]["weights_sha256"] == weights_sha256(foundation_file)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    weights = checkpoint["network_weights"]
    assert set(tensors) <= set(weights) and all(torch.equal(tensors[k], weights[k]) for k in tensors)
    foundation = torch.load(world["foundation"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                            weights_only=False)["network_weights"]
    key = "encoder.stages.0.0.convs.0.conv.weight"
    adapted_key = key if key in weights else key.replace(".conv.weight", ".conv.base_layer.weight")
    encoder_trains = config["method"] == "full"
    assert torch.equal(weights[adapted_key], foundation[key]) != encoder_trains
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "head: target 'spleen' <- foundation channel 2 ('spleen')" in log
    assert "new classes start fresh: pancreas" in log


@pytest.mark.parametrize("trainer", FSEFT)
def test_merged_export_predicts_the_same_labels_with_stock_nnunet(world, trainer):
    model = _model_folder(world["root"], "Dataset902_Target", f"{trainer}_testnoval")
    out = world["root"] / "exports" / f"{trainer}_merged"
    if trainer in UNMERGEABLE:
        with pytest.raises(FSEFTError, match="cannot be merged"):
            export_model(model, out, merge=True)
        assert not out.exists()
        return
    export_model(model, out, merge=True)
    merged = torch.load(out / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert merged["trainer_name"] == "nnUNetTrainer"
    adapted = _labels(world, model, f"{trainer}_adapted")
    stock = _labels(world, out, f"{trainer}_stock")
    assert adapted.keys() == stock.keys() and all(np.array_equal(adapted[k], stock[k]) for k in adapted)


@pytest.mark.parametrize("trainer", ["FSEFTLoRATrainer", "FSEFTSpatialAdapterTrainer"])
def test_adapter_export_is_small_and_apply_rebuilds_the_model(world, trainer):
    model = _model_folder(world["root"], "Dataset902_Target", f"{trainer}_testnoval")
    adapter = world["root"] / "exports" / f"{trainer}_adapter"
    export_model(model, adapter, merge=False)
    assert not list(adapter.rglob("*.pth"))
    size = (adapter / "fold_0" / "adapter.safetensors").stat().st_size
    assert size < (model / "fold_0" / "checkpoint_final.pth").stat().st_size
    rebuilt = world["root"] / "exports" / f"{trainer}_rebuilt"
    apply_adapter(adapter, world["foundation"] / "fold_0" / "checkpoint_final.pth", rebuilt)
    original = _labels(world, model, f"{trainer}_orig")
    again = _labels(world, rebuilt, f"{trainer}_rebuilt")
    assert all(np.array_equal(original[k], again[k]) for k in original)
    with pytest.raises(FSEFTError, match="exists"):
        export_model(model, adapter, merge=False)


def test_adapter_takes_a_copy_of_its_foundation_and_refuses_other_weights(world, tmp_path):
    """A foundation re-saved with another log or without its optimizer state is the same foundation (same
    network-weights digest); one changed weight makes it another."""
    adapter = world["root"] / "exports" / "lora_adapter_other"
    export_model(_model_folder(world["root"], "Dataset902_Target", "FSEFTLoRATrainer_testnoval"), adapter, merge=False)
    original = world["foundation"] / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(original, weights_only=False)
    copy = tmp_path / "copy.pth"
    torch.save(dict(checkpoint, current_epoch=99, optimizer_state=None), copy)
    assert sha256(copy) != sha256(original)
    rebuilt = [torch.load(apply_adapter(adapter, f, tmp_path / name) / "fold_0" / "checkpoint_final.pth",
                          weights_only=False)["network_weights"] for f, name in [(original, "a"), (copy, "b")]]
    assert all(torch.equal(rebuilt[0][k], rebuilt[1][k]) for k in rebuilt[0])
    key = next(iter(checkpoint["network_weights"]))
    checkpoint["network_weights"][key] = checkpoint["network_weights"][key] + 1e-6
    torch.save(checkpoint, tmp_path / "other.pth")
    with pytest.raises(FSEFTError, match="another foundation .network-weights sha256"):
        apply_adapter(adapter, tmp_path / "other.pth", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_resume_with_c_loads_the_adapted_checkpoint(world):
    from nnunetv2.run.run_training import run_training
    run_training("902", "3d_fullres", 0, "FSEFTLoRATrainer_testnoval", continue_training=True, device=CPU)
    fold = _model_folder(world["root"], "Dataset902_Target", "FSEFTLoRATrainer_testnoval") / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and not list(fold.glob("*.tmp*"))


def _cli(args, **env):
    full_env = dict(os.environ, **env)
    for k in [k for k, v in env.items() if v is None]:
        full_env.pop(k)
    return subprocess.run([str(BIN / args[0])] + args[1:], env=full_env, capture_output=True, text=True)


def test_nnunet_commands_find_train_predict_and_stock_predicts_the_merged_export(world):
    """Through nnU-Net's own console scripts: found by nnUNetv2_train and nnUNetv2_predict, merged export
    predicted by stock nnU-Net without the plugin's trainers and without nnUNet_extTrainer."""
    root, trainer = world["root"], "FSEFTDecoderLoRATrainer_test"
    weights = str(world["foundation"] / "fold_0" / "checkpoint_final.pth")
    r = _cli(["nnUNetv2_train", "902", "3d_fullres", "0", "-tr", trainer, "-device", "cpu",
              "-pretrained_weights", weights])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out_plugin, out_stock = root / "cli_plugin", root / "cli_stock"
    r = _cli(["nnUNetv2_predict", "-i", str(world["images"]), "-o", str(out_plugin), "-d", "902", "-c", "3d_fullres",
              "-tr", trainer, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"])
    assert r.returncode == 0, r.stderr[-2000:]
    merged = root / "cli_merged"
    r = _cli(["nnUNetv2_fseft_export", str(_model_folder(root, "Dataset902_Target", trainer)), str(merged), "--merge"])
    assert r.returncode == 0, r.stderr
    r = _cli(["nnUNetv2_predict_from_modelfolder", "-i", str(world["images"]), "-o", str(out_stock), "-m", str(merged),
              "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], nnUNet_extTrainer=None)
    assert r.returncode == 0, r.stderr[-2000:]
    for case in ("target_000.nii.gz", "target_001.nii.gz"):
        a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(d / case))) for d in (out_plugin, out_stock))
        assert np.array_equal(a, b)


def test_bad_pretrained_weights_give_one_line(world, tmp_path):
    bogus = tmp_path / "not_a_checkpoint.pth"
    bogus.write_text("hello")
    r = _cli(["nnUNetv2_train", "902", "3d_fullres", "0", "-tr", "FSEFTLoRATrainer_test", "-device", "cpu",
              "-pretrained_weights", str(bogus)])
    assert r.returncode != 0
    assert "nnunetv2_fseft: error:" in r.stderr and "not a readable PyTorch checkpoint" in r.stderr
    assert "Traceback" not in r.stderr


def test_resume_of_a_checkpoint_with_other_optimiser_groups_is_one_line(world):
    """A checkpoint written before the head got its own learning rate holds one AdamW group where the trainer now
    builds two: --c says so in one line instead of torch's ValueError."""
    from nnunetv2.run.run_training import run_training
    source = _model_folder(world["root"], "Dataset902_Target", "FSEFTFullFTTrainer_testnoval")
    old = source.parent / source.name.replace("_testnoval__", "_test__")
    shutil.copytree(source, old)
    checkpoint_file = old / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    groups = checkpoint["optimizer_state"]["param_groups"]
    assert len(groups) == 2  # body and head
    groups[0]["params"] = groups[0]["params"] + groups[1]["params"]
    checkpoint["optimizer_state"]["param_groups"] = groups[:1]
    torch.save(checkpoint, checkpoint_file)
    with pytest.raises(SystemExit, match="other parameter groups.*train the fold again without --c"):
        run_training("902", "3d_fullres", 0, "FSEFTFullFTTrainer_test", continue_training=True, device=CPU)
