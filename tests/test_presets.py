"""Plan presets: nnU-Net plans, the preset adjusts only what it names, nnU-Net preprocesses."""
import json

import numpy as np

from nnunetv2_fseft.networks import build_plain_network
from nnunetv2_fseft.planning import apply_preset, available_presets, load_preset, plan_with_preset
from nnunetv2_fseft.synthetic import write_phantom_dataset


def test_presets_ship_with_the_package():
    assert {"tiny", "foundation_ct"} <= set(available_presets())


def test_foundation_ct_preset_plans_ct_normalisation_isotropic_spacing_and_a_fixed_patch(nnunet_env):
    write_phantom_dataset(nnunet_env / "raw", 941, "CTPreset", ["liver", "spleen"], 2, shape=(24, 24, 24),
                          spacing=(2.0, 1.0, 1.0), seed=0)
    plans_name = plan_with_preset(941, "foundation_ct", num_processes=1)
    folder = nnunet_env / "pre" / "Dataset941_CTPreset"
    plans = json.loads((folder / f"{plans_name}.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    assert plans_name == "nnUNetPlans_foundation_ct"
    assert config["spacing"] == [1.5, 1.5, 1.5]
    assert config["patch_size"] == [96, 96, 96]
    assert config["normalization_schemes"] == ["CTNormalization"]
    arch = config["architecture"]["arch_kwargs"]
    # the topology nnU-Net derives for 96^3 at isotropic spacing: 4 poolings to a 6^3 bottleneck (>= 4 voxels)
    assert arch["n_stages"] == len(arch["strides"]) == len(arch["kernel_sizes"]) == 5
    assert np.prod(np.array(arch["strides"]), axis=0).tolist() == [16, 16, 16]
    assert arch["features_per_stage"] == [32, 64, 128, 256, 320]
    # nnU-Net preprocessed at that spacing, and the network builds from the plans
    assert any((folder / f"{plans_name}_3d_fullres").iterdir())
    network = build_plain_network(plans, "3d_fullres", json.loads((folder / "dataset.json").read_text()))
    assert sum(p.numel() for p in network.parameters()) > 10_000_000


def test_tiny_preset_changes_only_features_and_batch():
    plans = {"configurations": {"3d_fullres": {
        "batch_size": 7, "patch_size": [40, 56, 40], "spacing": [1, 1, 1], "normalization_schemes": ["ZScoreNormalization"],
        "architecture": {"arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256], "strides": [[1, 1, 1]] * 4}}}}}
    out = apply_preset(json.loads(json.dumps(plans)), load_preset("tiny"))["configurations"]["3d_fullres"]
    assert out["architecture"]["arch_kwargs"]["features_per_stage"] == [8, 16, 32, 64] and out["batch_size"] == 2
    assert out["patch_size"] == [40, 56, 40] and out["normalization_schemes"] == ["ZScoreNormalization"]
