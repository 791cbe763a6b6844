"""Adapting an nnssl checkpoint (encoder only, published layout, 1 channel) to a 2-channel target, end to end through
prepare_target, nnU-Net's training and prediction, and the plugin's export."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.checkpoints import read_adapter
from nnunetv2_fseft.export import apply_adapter, export_model
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.planning import prepare_target
from nnunetv2_fseft.synthetic import write_phantom_dataset

from foundation_files import CITATION, tiny_architecture, tiny_network, write_checkpoint

CPU = torch.device("cpu")
OPT_IN = "nnUNet_fseft_allow_untrained_decoder"


def _two_channel_target(raw: Path, dataset_id: int, name: str) -> Path:
    """Phantoms with a second channel ('PET': the image halved plus noise), channel names CT and PET."""
    folder = write_phantom_dataset(raw, dataset_id, name, ["spleen", "pancreas"], 6, shape=(24, 24, 24), seed=1)
    rng = np.random.default_rng(0)
    for image in sorted((folder / "imagesTr").glob("*_0000.nii.gz")):
        ct = sitk.ReadImage(str(image))
        array = sitk.GetArrayFromImage(ct) * 0.5 + rng.normal(0, 5, ct.GetSize()[::-1])
        pet = sitk.GetImageFromArray(array.astype(np.float32))
        pet.CopyInformation(ct)
        sitk.WriteImage(pet, str(image).replace("_0000.nii.gz", "_0001.nii.gz"))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "CT", "1": "PET"}
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    return folder


@pytest.fixture(scope="module")
def world(nnunet_env):
    """A tiny PlainConvUNet written as an nnssl checkpoint (1 channel; its weights need no training to test the
    plumbing), and a 2-channel target prepared from that checkpoint as a user would."""
    from nnunetv2.run.run_training import run_training
    raw = nnunet_env / "raw"
    architecture = tiny_architecture("PlainConvUNet")
    ssl = write_checkpoint(nnunet_env / "ssl.pth", network_weights=tiny_network(architecture).state_dict(),
                           architecture=architecture, spacing=[1.5, 1.5, 1.5], normalization_schemes=["CTNormalization"],
                           patch_size=[24, 24, 24], citations=[CITATION])
    _two_channel_target(raw, 923, "SslTwo")
    plans = prepare_target(923, ssl, num_processes=1, cpu=True)
    run_training("923", "3d_fullres", 0, "FSEFTDecoderLoRATrainer_testnoval", plans_identifier=plans, device=CPU,
                 pretrained_weights=str(ssl))
    return {"root": nnunet_env, "raw": raw, "ssl": ssl, "plans": plans}


def _predict(model, images: Path, out: Path) -> dict:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(use_mirroring=False, device=CPU, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (0,))
    out.mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(str(images), str(out))
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(out.glob("*.nii.gz"))}


def _images(world) -> Path:
    images = world["root"] / "images_two"
    if not images.exists():
        images.mkdir()
        for f in sorted((world["raw"] / "Dataset923_SslTwo" / "imagesTr").glob("*_000[01].nii.gz"))[:4]:
            shutil.copy(f, images)
    return images


def _same_labels(world, *models) -> None:
    images = _images(world)
    labels = [_predict(m, images, world["root"] / "pred" / m.name) for m in models]
    assert labels[0] and all(a.keys() == labels[0].keys() for a in labels)
    assert all(np.array_equal(a[k], labels[0][k]) for a in labels[1:] for k in a)


def _same_outputs(adapted: Path, merged: Path) -> None:
    """A merged export computes what the adapted model does, up to float rounding (labels could flip on the few
    voxels whose logits tie, so compare the network outputs)."""
    from nnunetv2_fseft.networks import build_adapted_network, build_plain_network
    plans, dataset_json = (json.loads((adapted / n).read_text()) for n in ("plans.json", "dataset.json"))
    config, _ = read_adapter(adapted / "fold_0")
    networks = [build_adapted_network(plans, "3d_fullres", dataset_json, config["method"], config["options"]),
                build_plain_network(plans, "3d_fullres", dataset_json)]
    for network, folder in zip(networks, (adapted, merged)):
        checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        network.load_state_dict(checkpoint["network_weights"])
        network.eval()
    x = torch.randn(1, 2, 24, 24, 24)
    with torch.no_grad():
        assert torch.allclose(networks[0](x), networks[1](x), atol=1e-4)


def _trained(world, trainer: str) -> Path:
    return Path(world["root"]) / "res" / "Dataset923_SslTwo" / f"{trainer}__{world['plans']}__3d_fullres"


def test_nnssl_checkpoint_loads_encoder_maps_channels_and_logs_counts_and_citations(world):
    fold = _trained(world, "FSEFTDecoderLoRATrainer_testnoval") / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert f"foundation: nnssl checkpoint {world['ssl']}: encoder + stem only (decoder and heads start fresh)" in log
    found = read_foundation(world["ssl"])
    n = len(found.weights)
    assert f"encoder {n} of {n} tensors loaded (stem included)" in log and "tensors new" in log
    assert "cite (paper) Tiny SSL encoder: Doe, J. (2026). A tiny encoder." in log
    assert ("input channels: the foundation's one channel repeated over the target's 2 ('CT', 'PET') and divided "
            "by 2 (nnssl's rule); the stem's first convolution trains") in log
    config, tensors = read_adapter(fold)
    block = config["foundation"]
    assert (block["source"], block["parts"], block["citations"]) == ("nnssl", "encoder", [CITATION])
    assert block["weights_sha256"] == found.weights_sha256 and block["stem_trains"]
    stem = tensors["encoder.stages.0.0.convs.0.conv.base_layer.weight"]
    start = found.weights["encoder.stages.0.0.convs.0.conv.weight"].repeat(1, 2, 1, 1, 1) / 2
    assert stem.shape == start.shape and not torch.equal(stem, start)  # the mapped stem trained


def test_adapted_model_predicts_and_merges_and_applies_exactly(world):
    trained = _trained(world, "FSEFTDecoderLoRATrainer_testnoval")
    merged, adapter = world["root"] / "ssl_merged", world["root"] / "ssl_adapter"
    export_model(trained, merged, merge=True)
    export_model(trained, adapter, merge=False)
    rebuilt = apply_adapter(adapter, world["ssl"], world["root"] / "ssl_rebuilt")
    _same_labels(world, trained, rebuilt)  # the same network rebuilt: the same labels
    _same_labels(world, merged)  # stock nnU-Net predicts the merged export
    _same_outputs(trained, merged)


def test_decoder_frozen_method_is_refused_on_an_encoder_only_foundation_unless_opted_in(world, monkeypatch):
    from nnunetv2.run.run_training import run_training
    monkeypatch.delenv(OPT_IN, raising=False)
    with pytest.raises(SystemExit, match=r"holds an encoder only .*method 'lora' keeps the decoder frozen; use a "
                                         r"method that trains it: full, decoder, decoder_lora, .*allow_untrained_decoder"):
        run_training("923", "3d_fullres", 0, "FSEFTLoRATrainer_testnoval", plans_identifier=world["plans"],
                     device=CPU, pretrained_weights=str(world["ssl"]))
    monkeypatch.setenv(OPT_IN, "1")
    run_training("923", "3d_fullres", 0, "FSEFTLoRATrainer_testnoval", plans_identifier=world["plans"], device=CPU,
                 pretrained_weights=str(world["ssl"]))
    trained = _trained(world, "FSEFTLoRATrainer_testnoval")
    # the refused run left its own log: read the opted-in run's, the newer one
    log = max((trained / "fold_0").glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime_ns)
    assert "opted in with allow_untrained_decoder" in log.read_text()
    adapter = world["root"] / "ssl_lora_adapter"
    export_model(trained, adapter, merge=False)
    # its frozen decoder is not in the adapter file: --apply must draw the same fresh decoder again
    _same_labels(world, trained, apply_adapter(adapter, world["ssl"], world["root"] / "ssl_lora_rebuilt"))


def test_resume_keeps_training_the_mapped_stem(world):
    """--c never sees -pretrained_weights: the fold's foundation.json tells the trainer that the stem trains, so the
    optimizer state fits and the re-saved adapter file still holds the stem."""
    from nnunetv2.run.run_training import run_training
    run_training("923", "3d_fullres", 0, "FSEFTDecoderLoRATrainer_testnoval", plans_identifier=world["plans"],
                 continue_training=True, device=CPU)
    _, tensors = read_adapter(_trained(world, "FSEFTDecoderLoRATrainer_testnoval") / "fold_0")
    assert "encoder.stages.0.0.convs.0.conv.base_layer.weight" in tensors
