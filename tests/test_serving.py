"""Issue 59: several adapters on one foundation in one pass (nnUNetv2_fseft_predict, serving.MultiAdapterPredictor).

One tiny foundation, one phantom target, four adapters of different methods: a decoder adapter trained by its
FSEFT trainer (a trained model folder), and a LoRA (changes the encoder), a linear-probe and an FT-last adapter
written as nnUNetv2_fseft_export writes adapter folders, with random tensors instead of a training run (a few
seconds instead of a training each, and outputs far from the foundation's); their nnUNetv2_predict reference is the
model folder that nnUNetv2_fseft_export --apply rebuilds (tests/test_fseft_e2e.py checks that against trained
ones)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.checkpoints import apply_foundation, is_head_key, save_adapter
from nnunetv2_fseft.cli.predict import main
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.export import apply_adapter
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.networks import build_adapted_network
from nnunetv2_fseft.peft import resolved_options
from nnunetv2_fseft.planning import prepare_target
from nnunetv2_fseft.serving import MultiAdapterPredictor
from nnunetv2_fseft.serving.combine import combine, label_table
from phantom_world import foundation_and_target, model_folder

CPU = torch.device("cpu")
TARGET = "Dataset942_ServeTarget"
CASES = ("servetarget_000", "servetarget_001")


def _adapter_like(world, trained: Path, method: str, trainer: str, seed: int) -> tuple:
    """(adapter folder, rebuilt model folder) of `method` on the trained adapter's plans, tensors drawn at random."""
    root, config = world["root"], json.loads((trained / "fold_0" / "adapter.json").read_text())
    config.update(method=method, trainer_name=trainer, options=resolved_options(method))
    plans, dataset_json = (json.loads((trained / n).read_text()) for n in ("plans.json", "dataset.json"))
    network = build_adapted_network(plans, config["configuration"], dataset_json, method, config["options"])
    apply_foundation(network, read_foundation(world["foundation"]), dataset_json)
    torch.manual_seed(seed)
    with torch.no_grad():  # every class in play: heads' biases level, weights and adapters far from their start
        for key, p in network.named_parameters():
            if p.requires_grad:
                p.copy_(torch.zeros_like(p) if is_head_key(key) and key.endswith("bias") else
                        p + torch.randn_like(p) * 0.5)
    folder = root / "serve_adapters" / method
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(trained / name, folder / name)
    save_adapter(network, folder / "fold_0", config)
    return folder, apply_adapter(folder, world["foundation"], root / "serve_models" / method)


@pytest.fixture(scope="module")
def world(nnunet_env):
    return build_world(nnunet_env)


def build_world(root: Path) -> dict:
    from nnunetv2.run.run_training import run_training
    foundation = foundation_and_target(root, 941, 942, prefix="Serve")
    prepare_target(942, foundation, num_processes=1)
    trainer = "FSEFTDecoderTrainer_testnoval"
    run_training("942", "3d_fullres", 0, trainer, device=CPU,
                 pretrained_weights=str(foundation / "fold_0" / "checkpoint_final.pth"))
    world = {"root": root, "foundation": foundation, "models": {"decoder": model_folder(root, TARGET, trainer)}}
    adapters = {"decoder": world["models"]["decoder"]}
    for method, trainer, seed in (("lora", "FSEFTLoRATrainer", 1), ("linear_probe", "FSEFTLinearProbeTrainer", 2),
                                  ("ft_last", "FSEFTFTLastTrainer", 3)):
        adapters[method], world["models"][method] = _adapter_like(world, adapters["decoder"], method, trainer, seed)
    images = root / "serve_images"
    images.mkdir()
    for case in CASES:
        shutil.copy(root / "raw" / TARGET / "imagesTr" / f"{case}_0000.nii.gz", images)
    return dict(world, images=images, adapters=adapters, probe_adapter=adapters["linear_probe"])


def _reference(world, name: str) -> dict:
    """nnUNetv2_predict's own run for one adapter's model folder (default mirroring), probabilities saved."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    out = world["root"] / "serve_reference" / name
    if not out.exists():
        predictor = nnUNetPredictor(device=CPU, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(world["models"][name]), (0,))
        out.mkdir(parents=True)
        predictor.predict_from_files_sequential(str(world["images"]), str(out), save_probabilities=True)
    return _read(out)


def _read(folder: Path) -> dict:
    out = {}
    for case in CASES:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
        probs = np.load(folder / f"{case}.npz")["probabilities"] if (folder / f"{case}.npz").is_file() else None
        out[case] = (labels, probs)
    return out


def _assert_same(ours: tuple, theirs: tuple) -> None:
    """Probabilities within 1e-3; labels identical wherever the top two classes are not tied."""
    (labels_a, probs_a), (labels_b, probs_b) = ours, theirs
    assert labels_a.shape == labels_b.shape == (24, 24, 24)
    if probs_a is not None:
        difference = float(np.abs(probs_a - probs_b).max())
        assert difference < 1e-3, f"probabilities differ by up to {difference}"
    top2 = np.sort(probs_b, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3
    assert np.array_equal(labels_a[clear], labels_b[clear])


def _run(args, capsys) -> tuple:
    """The command in this process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def _args(world, out, *adapters, extra=()):
    return ["-i", str(world["images"]), "-o", str(out), "-m", str(world["foundation"]), "-a", *adapters,
            "-device", "cpu", "--disable_progress_bar", *extra]


def test_each_adapter_equals_its_own_nnunet_predict(world, capsys):
    """A trained model folder (decoder) and two adapter folders (LoRA, linear probe) in one pass, with nnU-Net's
    background preprocessing and export processes, each against its own nnUNetv2_predict."""
    out = world["root"] / "serve_out_all"
    models, adapters = world["models"], world["adapters"]
    code, err = _run(_args(world, out, str(adapters["lora"]), f"decoder={adapters['decoder']}",
                           str(adapters["linear_probe"]), extra=["--save_probabilities", "-npp", "1", "-nps", "1"]),
                     capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["decoder", "linear_probe", "lora"]
    for name in ("lora", "decoder", "linear_probe"):
        ours, theirs = _read(out / name), _reference(world, name)
        for case in CASES:
            _assert_same(ours[case], theirs[case])
        assert json.loads((out / name / "dataset.json").read_text())["labels"] == \
            json.loads((models[name] / "dataset.json").read_text())["labels"]
        assert (out / name / "plans.json").is_file()


def test_shared_encoder_and_trunk_give_the_same_outputs(world):
    adapters = world["adapters"]
    specs = [f"lora={adapters['lora']}", f"decoder={adapters['decoder']}", f"probe={adapters['linear_probe']}",
             str(adapters["ft_last"])]
    shared = MultiAdapterPredictor.from_paths(world["foundation"], specs, use_mirroring=False)
    separate = MultiAdapterPredictor.from_paths(world["foundation"], specs, use_mirroring=False, shared_encoder=False)
    stacked = shared.passes[0].predictor.fold_networks[0]
    stages = len(stacked.adapters[2].decoder.stages)
    # LoRA changes the encoder: it runs whole; the decoder adapter shares the encoder, FT-last the encoder and all
    # decoder stages but its last, the probe the whole trunk (its head only runs on its own)
    assert shared.passes[0].depths == {"lora": None, "decoder": 0, "probe": stages, "ft_last": stages - 1}
    assert set(separate.passes[0].depths.values()) == {None}
    assert shared.tensors_shared > 0
    assert stacked.adapters[1].encoder is not stacked.adapters[2].encoder  # one module per adapter ...
    assert all(p is q for p, q in zip(stacked.adapters[1].encoder.parameters(),  # ... on the same tensors
                                      stacked.adapters[2].encoder.parameters()))
    data, _ = shared.preprocess(str(world["images"] / f"{CASES[0]}_0000.nii.gz"))
    a, b = shared.predict_logits(data), separate.predict_logits(data)
    for name in ("lora", "decoder", "probe", "ft_last"):
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-3, rtol=0), name
        assert torch.equal(a[name].argmax(0), b[name].argmax(0)), name


def test_python_api_predicts_an_array_and_a_file(world):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    adapters = world["adapters"]
    predictor = MultiAdapterPredictor.from_paths(world["foundation"], [f"decoder={adapters['decoder']}",
                                                                       f"probe={adapters['linear_probe']}"])
    image = world["images"] / f"{CASES[1]}_0000.nii.gz"
    from_file = predictor.predict(str(image))
    array, properties = SimpleITKIO().read_images([str(image)])
    from_array = predictor.predict(array, {"spacing": properties["spacing"]})
    assert list(from_file) == list(from_array) == ["decoder", "probe"]
    for name in ("decoder", "probe"):
        assert from_file[name].shape == (24, 24, 24)
        assert np.array_equal(from_file[name], from_array[name])
        _assert_same((from_file[name], None), _reference(world, {"probe": "linear_probe"}.get(name, name))[CASES[1]])


def test_combine_refuses_a_shared_class_name_until_told_which_wins(world, capsys):
    adapters = world["adapters"]
    specs = [f"decoder={adapters['decoder']}", f"probe={adapters['linear_probe']}"]
    out = world["root"] / "serve_combined"
    code, err = _run(_args(world, out, *specs, extra=["--combine", "-npp", "0", "-nps", "0"]), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "class 'spleen' is predicted by more than one adapter (decoder, probe)" in err and "--prefer" in err
    assert not out.exists()
    code, err = _run(_args(world, out, *specs, extra=["--combine", "--prefer", "spleen=decoder", "pancreas=probe",
                                                      "-npp", "0", "-nps", "0"]), capsys)
    assert code == 0, err
    table = json.loads((out / "dataset.json").read_text())
    assert table["labels"] == {"background": 0, "spleen": 1, "pancreas": 2}
    assert table["fseft_combined"]["class_sources"] == {"spleen": "decoder", "pancreas": "probe"}
    api = MultiAdapterPredictor.from_paths(world["foundation"], specs)
    _, luts, _ = label_table([(a.name, a.dataset_json) for a in api.adapters],
                             {"spleen": "decoder", "pancreas": "probe"})
    for case in CASES:
        combined = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.nii.gz")))
        both = api.predict(str(world["images"] / f"{case}_0000.nii.gz"), return_probabilities=True)
        spleen, pancreas = both["decoder"][0] == 1, both["probe"][0] == 2
        assert np.all(combined[spleen & ~pancreas] == 1) and np.all(combined[pancreas & ~spleen] == 2)
        assert np.all(combined[~spleen & ~pancreas] == 0)  # the probe's spleen and the decoder's pancreas count not
        assert pancreas.any()
        expected = combine([both["decoder"][0], both["probe"][0]], [both["decoder"][1], both["probe"][1]], luts)
        assert np.array_equal(combined, expected)


def test_combine_rule_higher_probability_wins_and_disjoint_classes_merge():
    labels, luts, sources = label_table([("a", {"labels": {"background": 0, "liver": 1}}),
                                         ("b", {"labels": {"background": 0, "Spleen": 1, "kidney": 2}})])
    assert labels == {"background": 0, "liver": 1, "Spleen": 2, "kidney": 3}
    assert sources == {"liver": "a", "Spleen": "b", "kidney": "b"}
    seg_a, seg_b = np.array([1, 1, 0, 0]), np.array([1, 2, 2, 0])
    probs_a = np.array([[0.2, 0.4, 0.9, 0.9], [0.8, 0.6, 0.1, 0.1]])
    probs_b = np.array([[0.1, 0.1, 0.2, 0.9], [0.7, 0.1, 0.1, 0.05], [0.2, 0.8, 0.7, 0.05]])
    assert combine([seg_a, seg_b], [probs_a, probs_b], luts).tolist() == [1, 3, 3, 0]
    with pytest.raises(FSEFTError, match="no adapter named 'c' predicts 'liver'"):
        label_table([("a", {"labels": {"background": 0, "liver": 1}})], {"liver": "c"})


def _refused(world, capsys, out, *adapters, foundation=None, extra=()) -> str:
    args = _args(world, out, *adapters, extra=["-npp", "0", "-nps", "0", *extra])
    if foundation is not None:
        args[args.index("-m") + 1] = str(foundation)
    existed = out.exists()
    code, err = _run(args, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("nnunetv2_fseft: error: ") and "Traceback" not in err
    assert out.exists() == existed and not (out.parent / f".{out.name}.partial").exists()
    return err


def _adapter_copy(world, tmp_path, name="probe") -> Path:
    copy = tmp_path / name
    shutil.copytree(world["probe_adapter"], copy)
    return copy


def test_bad_input_is_one_line_and_writes_nothing(world, tmp_path, capsys):
    out, probe = tmp_path / "out", world["probe_adapter"]
    # an adapter from another foundation: one weight differs, so does its weights' sha256
    checkpoint = torch.load(world["foundation"] / "fold_0" / "checkpoint_final.pth", weights_only=False)
    key = next(iter(checkpoint["network_weights"]))
    checkpoint["network_weights"][key] = checkpoint["network_weights"][key] + 1e-6
    torch.save(checkpoint, tmp_path / "other.pth")
    err = _refused(world, capsys, out, str(probe), foundation=tmp_path / "other.pth")
    assert "trained on another foundation" in err
    # other plans: another target spacing
    other = _adapter_copy(world, tmp_path / "plans")
    plans = json.loads((other / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 3.0, 3.0]
    (other / "plans.json").write_text(json.dumps(plans))
    assert "other plans" in _refused(world, capsys, out, str(probe), f"other={other}")
    # another configuration
    other = _adapter_copy(world, tmp_path / "config")
    config = json.loads((other / "fold_0" / "adapter.json").read_text())
    (other / "fold_0" / "adapter.json").write_text(json.dumps(dict(config, configuration="2d")))
    assert "trained as '2d' but the foundation" in _refused(world, capsys, out, str(other))
    # a missing and a corrupt adapter file
    other = _adapter_copy(world, tmp_path / "missing")
    (other / "fold_0" / "adapter.safetensors").unlink()
    assert "holds no adapter" in _refused(world, capsys, out, str(other))
    other = _adapter_copy(world, tmp_path / "corrupt")
    (other / "fold_0" / "adapter.safetensors").write_bytes(b"\x00" * 64)
    assert "corrupt" in _refused(world, capsys, out, str(other))
    # a missing fold, two adapters of one name
    assert "holds no adapter" in _refused(world, capsys, out, str(probe), extra=["-f", "3"])
    assert "two adapters are named 'linear_probe'" in _refused(world, capsys, out, str(probe), str(probe))
    # an output folder that exists is kept as it is
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "exists; pass --overwrite" in _refused(world, capsys, out, str(probe))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_console_script_refuses_an_existing_output_folder_in_one_line(world, tmp_path):
    """The installed command, before it loads anything heavy."""
    out = tmp_path / "exists"
    out.mkdir()
    r = subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_fseft_predict"), "-i", str(world["images"]),
                        "-o", str(out), "-m", str(world["foundation"]), "-a", str(world["probe_adapter"])],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == \
        f"nnunetv2_fseft: error: output folder {out} exists; pass --overwrite to replace it"
