"""Issue 6: bad input gives one clear line and exit code != 0 for every plugin command; sources are never
written; writes are atomic; adapter files never execute code. Tiny synthetic files only (no training).

Cases already covered elsewhere are not repeated here (see docs/hardening.md for the full table):
test_convert.py (overlaps, non-binary masks, mask geometry, unknown structures, existing output),
test_assemble.py (synonym conflicts, same id meaning different classes, channels, existing output),
test_fewshot_splits.py (K + query > cases, foreign splits_final.json), test_checkpoints.py (missing and
foreign -pretrained_weights, architecture mismatch, CUDA-saved checkpoint on a CPU-only machine),
test_fseft_e2e.py (adapter of another foundation, nnUNetv2_train -pretrained_weights and --c)."""
import hashlib
import importlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.checkpoints import read_adapter, save_adapter, weights_sha256
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.files import atomic_write, sha256
from nnunetv2_fseft.networks import build_adapted_network, build_plain_network
from nnunetv2_fseft.peft import resolved_options
from nnunetv2_fseft.synthetic import write_phantom_dataset

from foundation_files import load_foundation
from networks import tiny_unet

BIN = Path(sys.executable).parent
ERROR = "nnunetv2_fseft: error: "


def plans(features=(4, 8)) -> dict:
    """A tiny but complete nnU-Net plans.json (PlainConvUNet, 2 stages)."""
    return {
        "dataset_name": "Dataset950_Found", "plans_name": "nnUNetPlans", "image_reader_writer": "SimpleITKIO",
        "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [16, 16, 16],
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
            "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16], "spacing": [1, 1, 1],
            "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], "batch_dice": False,
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
            "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities_kwargs": {},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 2, "features_per_stage": list(features), "conv_op": "torch.nn.modules.conv.Conv3d",
                                "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
                                "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
                                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}


DATASET_JSON = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "numTraining": 4,
                "file_ending": ".nii.gz"}


# ------------------------------------------------------------------------------------------------------------
# fixtures: nnU-Net folders, raw datasets, a foundation checkpoint and an adapter export
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def env(tmp_path, monkeypatch):
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    return tmp_path


def dataset(env, dataset_id=11, name="Good", classes=("liver", "spleen"), n=4) -> Path:
    return write_phantom_dataset(env / "raw", dataset_id, name, list(classes), n, shape=(8, 8, 8), seed=dataset_id)


def edit_json(folder: Path, **changes):
    dj = json.loads((folder / "dataset.json").read_text())
    dj.update(changes)
    (folder / "dataset.json").write_text(json.dumps(dj))


def edit_label(folder: Path, case: str, change):
    path = folder / "labelsTr" / f"{case}.nii.gz"
    image = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(change(array))
    out.CopyInformation(image)
    sitk.WriteImage(out, str(path))


def foundation(path: Path, features=(4, 8), dataset_json=DATASET_JSON) -> Path:
    net = build_plain_network(plans(features), "3d_fullres", dataset_json)
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"dataset_json": dataset_json, "plans": plans(features), "configuration": "3d_fullres"}},
               path)
    return path


def adapter(folder: Path, foundation_file: Path, method="lora", options=None, config_changes=None) -> Path:
    """An adapter export (as nnUNetv2_fseft_export writes it) for the tiny plans."""
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans()))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    network = build_adapted_network(plans(), "3d_fullres", DATASET_JSON, method, options)
    config = {"format": "nnunetv2_fseft.adapter/1", "trainer_name": "FSEFTLoRATrainer", "method": method,
              "options": resolved_options(method, options), "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
              "fold": 0, "labels": DATASET_JSON["labels"],
              "foundation": {"path": str(foundation_file), "sha256": sha256(foundation_file),
                             "weights_sha256": weights_sha256(foundation_file)},
              "inference_allowed_mirroring_axes": [0, 1, 2]}
    config.update(config_changes or {})
    save_adapter(network, folder / "fold_0", config)
    return folder


class Marker:
    """A pickle whose loading creates a folder: proof of code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def cli(command: str, argv, capsys) -> str:
    """Run a console script's main() in-process; assert exit != 0 with one line, no traceback; return it."""
    main = importlib.import_module(f"nnunetv2_fseft.cli.{command}").main
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code not in (0, None), err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(ERROR) and "Traceback" not in err, err
    return lines[0][len(ERROR):]


# ------------------------------------------------------------------------------------------------------------
# bad raw data: every command that reads it
# ------------------------------------------------------------------------------------------------------------

def _no_json(d):
    (d / "dataset.json").unlink()


def _bad_json(d):
    (d / "dataset.json").write_text('{"labels": {"background": 0,}')


def _gap(d):
    edit_json(d, labels={"background": 0, "liver": 1, "spleen": 3})


def _no_background(d):
    edit_json(d, labels={"liver": 1, "spleen": 2})


def _duplicate_value(d):
    edit_json(d, labels={"background": 0, "liver": 1, "spleen": 1})


def _geometry(d):
    path = d / "labelsTr" / f"{d.name[11:].lower()}_001.nii.gz"
    image = sitk.ReadImage(str(path))
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(path))


def _undeclared(d):
    def seven(a):
        a[0, 0, 0] = 7
        return a
    edit_label(d, f"{d.name[11:].lower()}_001", seven)


def _empty_image(d):
    (d / "imagesTr" / f"{d.name[11:].lower()}_001_0000.nii.gz").write_bytes(b"")


def _unreadable_labels(d):
    for label in (d / "labelsTr").iterdir():
        label.write_bytes(b"not an image")


def _num_training(d):
    edit_json(d, numTraining=9)


RAW_COMMANDS = {
    "convert": ["relabel", "-i", 12, "--labels", "liver=liver", "-o", 60, "-n", "Out"],
    "assemble": ["-d", 11, 12, "-o", 61, "-n", "Out"],
    "fewshot_splits": ["-d", 12, "-k", 1, "--query", 1],
    "plan": ["-d", 12, "--preset", "tiny"],
}
BAD_RAW = [  # (bad input, how to make it, commands that must refuse it, expected message)
    ("dataset.json missing", _no_json, ["convert", "assemble", "plan"], r"Dataset012_Bad has no dataset\.json; fix:"),
    ("dataset.json missing", _no_json, ["fewshot_splits"], r"no dataset\.json in .*Dataset012_Bad"),
    ("dataset.json invalid", _bad_json, ["convert", "assemble", "fewshot_splits", "plan"],
     r"Dataset012_Bad/dataset\.json is not valid JSON \(.*\); fix: repair the file"),
    ("labels not consecutive", _gap, ["convert", "assemble", "fewshot_splits", "plan"],
     r"label values must be consecutive \(0, 1, 2, \.\.\.\) but \[2\] is missing \(values: \[0, 1, 3\]\); fix: renumber"),
    ("no background label", _no_background, ["convert", "assemble", "fewshot_splits", "plan"],
     r"Dataset012_Bad/dataset\.json: labels need \"background\": 0; fix: add it"),
    ("two labels with one value", _duplicate_value, ["convert", "assemble", "fewshot_splits", "plan"],
     r"labels 'liver' and 'spleen' both have value 1; fix: give each label its own value"),
    ("image/label geometry mismatch", _geometry, ["convert", "assemble", "plan"],
     r"case 'bad_001': label bad_001\.nii\.gz has spacing \(2, 2, 2\) but image bad_001_0000\.nii\.gz has "
     r"\(1\.5, 1\.5, 1\.5\); fix: resample"),
    ("label values not in dataset.json", _undeclared, ["convert", "assemble", "plan"],
     r"case 'bad_001': label bad_001\.nii\.gz has values \[7\] that dataset\.json does not declare "
     r"\(declared: \[0, 1, 2\]\); fix:"),
    ("empty image file", _empty_image, ["convert", "assemble", "plan"],
     r"cannot read .*bad_001_0000\.nii\.gz: the file is empty \(0 bytes\); fix: re-export or replace it"),
    ("unreadable label file", _unreadable_labels, ["convert", "assemble", "fewshot_splits", "plan"],
     r"cannot read .*labelsTr/bad_00\d\.nii\.gz: the file is not a readable image; fix:"),
    ("numTraining wrong", _num_training, ["plan"],
     r"numTraining is 9 but there are 4 training cases; fix: set \"numTraining\": 4"),
]


@pytest.mark.parametrize("bad, make, command, message",
                         [(b, m, c, msg) for b, m, cs, msg in BAD_RAW for c in cs],
                         ids=[f"{b}-{c}" for b, _, cs, _ in BAD_RAW for c in cs])
def test_bad_raw_dataset_is_one_line(env, capsys, bad, make, command, message):
    dataset(env, 11, "Good")
    make(dataset(env, 12, "Bad"))
    line = cli(command, RAW_COMMANDS[command], capsys)
    assert re.search(message, line), line
    assert not (env / "raw" / "Dataset060_Out").exists() and not (env / "raw" / "Dataset061_Out").exists()


def test_empty_or_unreadable_mask_in_structures_layout(env, capsys):
    case = env / "cases" / "c1"
    (case / "segmentations").mkdir(parents=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 4), np.float32)), str(case / "ct.nii.gz"))
    (case / "segmentations" / "liver.nii.gz").write_bytes(b"")
    line = cli("convert", ["structures", env / "cases", "-o", 62, "-n", "S"], capsys)
    assert line.startswith(f"cannot read {case / 'segmentations' / 'liver.nii.gz'}: the file is empty (0 bytes)")


# ------------------------------------------------------------------------------------------------------------
# names, ids, counts and outputs that exist
# ------------------------------------------------------------------------------------------------------------

def test_support_case_lacking_the_target_class_is_refused(env, capsys):
    d = dataset(env, 12, "Bad", n=3)
    for case in ("bad_000", "bad_001", "bad_002"):
        edit_label(d, case, lambda a: np.where(a == 2, 0, a).astype(a.dtype))  # no spleen anywhere
    line = cli("fewshot_splits", ["-d", 12, "-k", 1, "--query", 1, "--target-class", "Spleen"], capsys)
    assert "has no voxel of the target class spleen in its label map; fix: put it in the query set" in line
    assert not (env / "pre" / "Dataset012_Bad" / "splits_final.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["-d", 11, "--preset", "huge"], "unknown plan preset 'huge'; available presets: abdomen_cpu, foundation_ct, tiny"),
    (["-d", 77, "--preset", "tiny"], "cannot find dataset '77': no such id in nnUNet_raw="),
], ids=["unknown preset", "unknown dataset id"])
def test_plan_unknown_names(env, capsys, argv, message):
    dataset(env, 11)
    assert message in cli("plan", argv, capsys)


def test_plan_refuses_existing_plans_without_overwrite(env, capsys):
    dataset(env, 11)
    plans_file = env / "pre" / "Dataset011_Good" / "nnUNetPlans.json"
    plans_file.parent.mkdir()
    plans_file.write_text("{}")
    assert cli("plan", ["-d", 11, "--preset", "tiny"], capsys) == \
        f"{plans_file} already exists; pass --overwrite to replace it"
    assert plans_file.read_text() == "{}"


def _model_folder(env, channels=None, bad_plans=False) -> Path:
    model = env / "res" / "Dataset950_Found" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    model.mkdir(parents=True)
    (model / "plans.json").write_text("{oops" if bad_plans else json.dumps(plans()))
    (model / "dataset.json").write_text(json.dumps(dict(DATASET_JSON, channel_names=channels or {"0": "CT"})))
    return model


@pytest.mark.parametrize("case, message", [
    ("no model folder", r"nomodel is not an nnU-Net model folder \(no plans\.json\); pass the folder that holds"),
    ("plans.json invalid", r"plans\.json is not valid JSON \(.*\); fix: copy the model folder again"),
    ("channel count", r"the target has 1 input channel\(s\) \(CT\) and the foundation 2 \(T1, T2\), and no rule maps them"),
    ("plans exist", r"Dataset011_Good/nnUNetPlans\.json already exists; pass --overwrite to replace it"),
], ids=["no model folder", "plans.json invalid", "channel count", "plans exist"])
def test_prepare_target_refusals(env, capsys, case, message):
    dataset(env, 11)
    model = env / "nomodel"
    if case != "no model folder":
        model = _model_folder(env, {"0": "T1", "1": "T2"} if case == "channel count" else None,
                              bad_plans=case == "plans.json invalid")
    if case == "plans exist":
        (env / "pre" / "Dataset011_Good").mkdir()
        (env / "pre" / "Dataset011_Good" / "nnUNetPlans.json").write_text("{}")
    line = cli("prepare_target", ["-d", 11, "-m", model], capsys)
    assert re.search(message, line), line


# ------------------------------------------------------------------------------------------------------------
# export, adapter files and foundations
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture
def shared(tmp_path):
    f = foundation(tmp_path / "foundation.pth")
    return {"foundation": f, "adapter": adapter(tmp_path / "adapter", f), "tmp": tmp_path}


def _rewrite_config(folder, **changes):
    path = folder / "fold_0" / "adapter.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def _replace_tensors(folder, foundation_file, method, options=None):
    """Tensors of another method/shape under the original adapter.json."""
    other = adapter(folder.parent / f"other_{method}", foundation_file, method, options)
    (folder / "fold_0" / "adapter.safetensors").write_bytes((other / "fold_0" / "adapter.safetensors").read_bytes())


EXPORT_CASES = {
    "wrong shapes (rank 8 tensors, rank 4 config)": (
        lambda s: _replace_tensors(s["adapter"], s["foundation"], "lora", {"rank": 8}),
        r"adapter .*fold_0 does not fit this network: '.*lora.*' is \(8, .*\) in the adapter but \(4, .*\) here; "
        r"use the plans it was trained with"),
    "wrong method (BitFit tensors, LoRA config)": (
        lambda s: _replace_tensors(s["adapter"], s["foundation"], "bitfit"),
        r"adapter .*fold_0 does not fit this method/network \(missing tensor '.*'\); use the foundation and plans"),
    "unknown method in adapter.json": (
        lambda s: _rewrite_config(s["adapter"], method="prefix_tuning"),
        r"fold_0: adapter.json names unknown method 'prefix_tuning'; known: full, ft_last, "),
    "adapter.json of another kind": (
        lambda s: (s["adapter"] / "fold_0" / "adapter.json").write_text('{"weights": "x"}'),
        r"fold_0: adapter.json has no 'method'; it was not written by an FSEFT trainer"),
    "adapter.safetensors corrupt": (
        lambda s: (s["adapter"] / "fold_0" / "adapter.safetensors").write_bytes(b"\x00" * 10),
        r"fold_0: adapter files are not valid JSON/safetensors \(SafetensorError\)"),
    "no adapter files": (
        lambda s: [p.unlink() for p in (s["adapter"] / "fold_0").iterdir()],
        r"adapter has no fold_X/adapter\.json; train first"),
    "adapter of another foundation": (
        lambda s: _rewrite_config(s["adapter"], foundation={"path": "/clinic/foundation.pth",
                                                            "weights_sha256": "0" * 64}),
        r"fold_0: this adapter was trained on another foundation \(network-weights sha256 000000000000…, given "
        r"[0-9a-f]{12}…\); pass the checkpoint named in adapter.json: /clinic/foundation.pth"),
    "adapter of another foundation, recorded by file only (older adapters)": (
        lambda s: _rewrite_config(s["adapter"], foundation={"path": "/clinic/foundation.pth", "sha256": "0" * 64}),
        r"fold_0: this adapter was trained on another foundation \(file sha256 000000000000…, "
        r"given [0-9a-f]{12}…\)"),
    "foundation missing": (
        lambda s: s["foundation"].unlink(),
        r"foundation checkpoint .*foundation\.pth does not exist; pass the foundation's fold_X/checkpoint_final\.pth"),
    "foundation not a checkpoint (text file)": (
        lambda s: (s["foundation"].write_text("hello"), _rewrite_config(s["adapter"], foundation=None)),
        r"foundation\.pth is not a readable PyTorch checkpoint \(\w+: not a torch zip archive\); pass a checkpoint_final\.pth"),
    "foundation of another architecture": (
        lambda s: (foundation(s["foundation"], features=(6, 12)), _rewrite_config(s["adapter"], foundation=None)),
        r"foundation .*foundation\.pth does not match this network: 'encoder\.stages\.0\.0\.convs\.0\.conv\.weight' is "
        r"\(6, 1, 3, 3, 3\) in the foundation but \(4, 1, 3, 3, 3\) here; prepare the target"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_apply_refuses_adapters_that_do_not_fit(shared, capsys, case):
    make, message = EXPORT_CASES[case]
    make(shared)
    out = shared["tmp"] / "rebuilt"
    line = cli("export", ["--apply", shared["adapter"], shared["foundation"], out], capsys)
    assert re.search(message, line), line
    assert not out.exists() and not (shared["tmp"] / ".rebuilt.partial").exists()


@pytest.mark.parametrize("argv, message", [
    (lambda s: [s["tmp"] / "nomodel", s["tmp"] / "out"], r"nomodel is not an nnU-Net model folder \(no plans\.json\)"),
    (lambda s: [s["adapter"], s["tmp"] / "out", "--merge"],
     r"fold_0 has adapter files but no checkpoint_final\.pth \(an adapter export\?\); fix: rebuild with .*--apply"),
    (lambda s: [s["adapter"], s["foundation"]], r"output folder .*foundation\.pth exists; pass --overwrite to replace it"),
    (lambda s: [s["adapter"], s["foundation"], s["tmp"] / "out"], r"expected 2 paths, got 3; see nnUNetv2_fseft_export -h"),
], ids=["not a model folder", "merge an adapter export", "output exists", "wrong number of paths"])
def test_export_refusals(shared, capsys, argv, message):
    line = cli("export", argv(shared), capsys)
    assert re.search(message, line), line


def test_apply_output_folder_exists_without_overwrite(shared, capsys):
    out = shared["tmp"] / "rebuilt"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = cli("export", ["--apply", shared["adapter"], shared["foundation"], out], capsys)
    assert line == f"output folder {out} exists; pass --overwrite to replace it"
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------------------
# untrusted files: a pickle where an adapter file belongs is refused and never runs
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("writer", ["pickle.dumps", "torch.save"])
def test_malicious_pickle_as_adapter_is_refused_not_run(shared, capsys, writer):
    marker = shared["tmp"] / "pwned"
    payload = shared["tmp"] / "payload.bin"
    if writer == "torch.save":
        torch.save({"lora": Marker(marker)}, payload)
    else:
        payload.write_bytes(pickle.dumps(Marker(marker)))
    # the payload is live: unpickling it runs code
    torch.load(payload, weights_only=False) if writer == "torch.save" else pickle.loads(payload.read_bytes())
    assert marker.exists()
    marker.rmdir()

    (shared["adapter"] / "fold_0" / "adapter.safetensors").write_bytes(payload.read_bytes())
    with pytest.raises(FSEFTError, match="not valid JSON/safetensors"):
        read_adapter(shared["adapter"] / "fold_0")
    line = cli("export", ["--apply", shared["adapter"], shared["foundation"], shared["tmp"] / "out"], capsys)
    assert "adapter files are not valid JSON/safetensors" in line
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------------
# -pretrained_weights: what the loader adds to test_checkpoints.py
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case, message", [
    ("text file", r"x\.pth is not a readable PyTorch checkpoint \(UnpicklingError: .*\); pass a checkpoint_final\.pth"),
    ("empty file", r"x\.pth is not a readable PyTorch checkpoint \(EOFError: .*\); pass a checkpoint_final\.pth"),
    ("safetensors file", r"x\.pth is not a readable PyTorch checkpoint \(UnpicklingError: .*\)"),
    ("other channel count", r"'encoder\.stages\.0\.0\.convs\.0\.conv\.weight' is \(4, 2, 3, 3, 3\) in the foundation "
                            r"but \(4, 1, 3, 3, 3\) here \(input channels: foundation 2, target 1\); prepare the target"),
])
def test_pretrained_weights_refusals(tmp_path, case, message):
    path = tmp_path / "x.pth"
    if case == "text file":
        path.write_text("not a checkpoint")
    elif case == "empty file":
        path.write_bytes(b"")
    elif case == "safetensors file":
        from safetensors.torch import save_file
        save_file({"w": torch.zeros(2)}, str(path))
    else:
        two = tiny_unet()
        two.encoder.stages[0][0].convs[0].conv = torch.nn.Conv3d(2, 4, 3, padding=1)
        two.encoder.stages[0][0].convs[0].all_modules[0] = two.encoder.stages[0][0].convs[0].conv
        torch.save({"network_weights": two.state_dict()}, path)
    with pytest.raises(FSEFTError, match=message):
        load_foundation(tiny_unet(), path, DATASET_JSON)


def test_trainer_turns_loader_errors_into_one_line_exit(tmp_path):
    """What nnUNetv2_train -tr FSEFT...Trainer -pretrained_weights BAD prints (SystemExit: no traceback)."""
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer

    class Stub:
        dataset_json = DATASET_JSON

        def plain_network(self):
            return tiny_unet()

    with pytest.raises(SystemExit) as e:
        FSEFTTrainer.load_foundation(Stub(), tmp_path / "missing.pth")
    assert str(e.value.code) == (f"{ERROR}foundation checkpoint {tmp_path / 'missing.pth'} does not exist; pass the "
                                 "foundation's fold_X/checkpoint_final.pth with -pretrained_weights")


@pytest.mark.parametrize("attrs, message", [
    ({"peft_method": "lora", "peft_options": {"r": 8}}, r"FSEFTTypo: method 'lora' takes no option\(s\) \['r'\]; it "
                                                        r"takes \['alpha', .*'rank'.*\]"),
    ({"peft_method": "lroa"}, r"FSEFTTypo: unknown PEFT method 'lroa'; choose one of: full, .*decoder_lora.*"),
], ids=["option", "method"])
def test_a_trainer_declaring_an_unknown_option_or_method_is_refused_when_constructed(attrs, message):
    """A subclass's typo ends nnUNetv2_train in one line before nnU-Net sets anything up (no plans are read)."""
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
    typo = type("FSEFTTypo", (FSEFTTrainer,), attrs)
    with pytest.raises(SystemExit) as e:
        typo({}, "3d_fullres", 0, {})
    assert re.fullmatch(ERROR + message, str(e.value.code)), e.value.code
    assert "\n" not in str(e.value.code)


# ------------------------------------------------------------------------------------------------------------
# nothing lost: sources never written, atomic writes
# ------------------------------------------------------------------------------------------------------------

def _hashes(*roots) -> dict:
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def test_sources_are_never_written(env, shared, capsys):
    good, bad = dataset(env, 11, "Good"), dataset(env, 12, "Bad")
    _undeclared(bad)
    before = _hashes(good, bad, shared["foundation"], shared["adapter"])
    main = {c: importlib.import_module(f"nnunetv2_fseft.cli.{c}").main for c in
            ("convert", "assemble", "fewshot_splits", "plan", "export")}
    main["convert"](["relabel", "-i", "11", "--labels", "organ=liver,spleen", "-o", "20", "-n", "Rel"])
    main["assemble"](["-d", "11", "20", "-o", "21", "-n", "Asm"])
    main["fewshot_splits"](["-d", "11", "-k", "1", "2", "--query", "2"])
    main["export"](["--apply", str(shared["adapter"]), str(shared["foundation"]), str(env / "rebuilt"), "--merge"])
    main["export"](["--apply", str(shared["adapter"]), str(shared["foundation"]), str(env / "rebuilt"), "--overwrite"])
    for failing in (lambda: main["convert"](["relabel", "-i", "12", "--labels", "a=liver", "-o", "22", "-n", "X"]),
                    lambda: main["assemble"](["-d", "11", "12", "-o", "23", "-n", "X"]),
                    lambda: main["plan"](["-d", "12", "--preset", "tiny"]),
                    lambda: main["convert"](["relabel", "-i", "11", "--labels", "a=liver", "-o", "11", "-n", "Good",
                                             "--overwrite"]),
                    lambda: main["export"](["--apply", str(shared["adapter"]), str(shared["foundation"]),
                                            str(shared["adapter"])])):
        with pytest.raises(SystemExit):
            failing()
    assert _hashes(good, bad, shared["foundation"], shared["adapter"]) == before
    assert (env / "rebuilt" / "fold_0" / "adapter.safetensors").is_file()
    assert not list(env.rglob("*.partial")) and not list(env.rglob("*.tmp*"))


@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "Ctrl-C"])
def test_atomic_write_keeps_the_previous_file_when_the_write_dies(tmp_path, crash):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {"w": torch.ones(3)}}, path)
    previous = path.read_bytes()

    def half_then_crash(tmp):
        torch.save({"network_weights": {"w": torch.zeros(1000)}}, tmp)
        with open(tmp, "r+b") as f:
            f.truncate(100)
        raise crash

    with pytest.raises(type(crash)):
        atomic_write(path, half_then_crash)
    assert path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert torch.equal(torch.load(path, weights_only=True)["network_weights"]["w"], torch.ones(3))


def test_atomic_write_survives_kill_9_mid_write(tmp_path):
    """SIGKILL runs no cleanup at all: the previous file must still be the one nnU-Net finds."""
    path = tmp_path / "adapter.json"
    path.write_text('{"v": 1}')
    code = ("import sys, time; from nnunetv2_fseft.files import atomic_write\n"
            "def slow(tmp):\n    f = open(tmp, 'w'); f.write('{\"v\": 2, \"half'); f.flush(); print('writing', flush=True)\n"
            "    time.sleep(60)\n"
            f"atomic_write({str(path)!r}, slow)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert json.loads(path.read_text()) == {"v": 1}


# ------------------------------------------------------------------------------------------------------------
# the real console scripts: exit code and stderr as a user sees them
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script, argv", [
    ("nnUNetv2_fseft_plan", ["-d", "12", "--preset", "tiny"]),
    ("nnUNetv2_fseft_export", ["--apply", "ADAPTER", "NOFILE.pth", "OUT"]),
])
def test_console_scripts_print_one_line(env, script, argv):
    _gap(dataset(env, 12, "Bad"))
    (env / "ADAPTER").mkdir()
    exe = BIN / script
    if not exe.exists():
        pytest.skip(f"{script} not installed")
    r = subprocess.run([str(exe)] + argv, capture_output=True, text=True, cwd=env, env=os.environ.copy(), timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith(ERROR), r.stderr


def test_listing_piped_into_head_stops_quietly():
    """`nnUNetv2_fseft_ext_path --list | head -1` is a normal thing to type: no traceback when the reader has gone."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) has already exited: every write gets EPIPE
    try:
        lister = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_fseft_ext_path"), "--list"],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in lister.stderr and lister.returncode == 141, lister.stderr
