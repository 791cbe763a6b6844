"""read_foundation: nnssl checkpoints in the published layout (built by hand and by the writer), nnU-Net
checkpoints whose trainer class is not importable here, and one line for each file it refuses."""
import os

import pytest
import torch

from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.foundations.architectures import RESENC_L, build_network

from foundation_files import CITATION, nnssl_by_hand, tiny_architecture, tiny_network, write_checkpoint


class NotPlainData:
    """An object only unpickling code can rebuild."""


def test_nnssl_layout_written_by_hand_reads_as_an_encoder_only_foundation(tmp_path):
    architecture = tiny_architecture()
    network = tiny_network(architecture)
    foundation = read_foundation(nnssl_by_hand(tmp_path / "ssl.pth", network, architecture))
    assert (foundation.source, foundation.parts, foundation.num_input_channels) == ("nnssl", "encoder", 1)
    assert foundation.architecture == architecture and foundation.plans is None and foundation.dataset_json is None
    assert foundation.citations == [CITATION]
    assert foundation.preprocessing == {"spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
                                        "use_mask_for_norm": [False], "patch_size": [32, 32, 32],
                                        "recommended_patch_size": [32, 32, 32]}
    expected = {k: v for k, v in network.state_dict().items() if k.startswith("encoder.")}
    assert foundation.weights.keys() == expected.keys()  # no decoder, no decoder.encoder alias
    assert all(torch.equal(foundation.weights[k], v) for k, v in expected.items())
    assert len(foundation.weights_sha256) == 64


def test_fixed_name_resencl_expands_to_the_published_topology(tmp_path):
    network = build_network(RESENC_L, 1, 2, meta=True)
    assert list(network.encoder.output_channels) == [32, 64, 128, 256, 320, 320]
    assert [len(stage.blocks) for stage in network.encoder.stages] == [1, 3, 4, 6, 6, 6]
    assert list(network.encoder.strides) == [[1, 1, 1]] + [[2, 2, 2]] * 5
    assert len([k for k in network.state_dict() if k.startswith("encoder.")]) == 448


def test_nnssl_noskip_resencl_reads_as_resencl_its_decoder_ignored(tmp_path):
    """nnssl's NoSkipResEncL is ResEnc L's encoder with a decoder without skips: only the encoder is loaded."""
    from nnunetv2_fseft.foundations.architectures import resolve_architecture
    assert resolve_architecture({"arch_class_name": "NoSkipResEncL"}, "x.pth") == RESENC_L
    architecture = tiny_architecture()
    network = tiny_network(architecture)
    path = nnssl_by_hand(tmp_path / "noskip.pth", network, architecture, arch_class_name="NoSkipResEncL")
    checkpoint = torch.load(path, weights_only=True)
    # a decoder stage that takes no skip: half the input channels of the U-Net's; never read
    checkpoint["network_weights"]["decoder.stages.0.convs.0.conv.weight"] = torch.zeros(8, 8, 3, 3, 3)
    torch.save(checkpoint, path)
    foundation = read_foundation(path)
    assert foundation.architecture["network_class_name"].endswith(".ResidualEncoderUNet")
    assert foundation.weights.keys() == {k for k in network.state_dict() if k.startswith("encoder.")}


def test_writer_round_trip_plainconv_stem_under_both_names(tmp_path):
    architecture = tiny_architecture("PlainConvUNet")
    network = tiny_network(architecture)
    weights = {k: v for k, v in network.state_dict().items() if not k.startswith("decoder.encoder.")}
    path = write_checkpoint(tmp_path / "w.pth", network_weights=weights, architecture=architecture, spacing=None,
                            normalization_schemes=["CTNormalization"], patch_size=[16, 16, 16], citations=[CITATION])
    raw = torch.load(path, map_location="cpu", weights_only=True)
    plan = raw["nnssl_adaptation_plan"]
    assert plan["key_to_stem"] == "encoder.stages.0" and plan["key_to_encoder"] == "encoder.stages"
    assert plan["keys_to_in_proj"] == ["encoder.stages.0.0.convs.0.conv", "encoder.stages.0.0.convs.0.all_modules.0"]
    assert plan["architecture_plans"]["arch_class_name"] == "PlainConvUNet"
    assert plan["pretrain_num_input_channels"] == 1 and plan["key_to_lpe"] is None
    assert torch.equal(raw["network_weights"]["decoder.encoder.stages.0.0.convs.0.conv.weight"],
                       raw["network_weights"]["encoder.stages.0.0.convs.0.all_modules.0.weight"])
    foundation = read_foundation(path)
    assert foundation.preprocessing["spacing"] is None and foundation.citations == [CITATION]
    with pytest.raises(FSEFTError, match="exists"):
        write_checkpoint(path, network_weights=weights, architecture=architecture, spacing=None,
                         normalization_schemes=["CTNormalization"], patch_size=[16, 16, 16])


def test_nnunet_checkpoint_of_a_trainer_class_not_installed_here_still_reads(tmp_path):
    architecture = tiny_architecture("PlainConvUNet")
    plans = {"plans_name": "nnUNetPlans", "dataset_name": "Dataset1_X", "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [24, 24, 24], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "experiment_planner_used": "x",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {},
             "configurations": {"3d_fullres": {"data_identifier": "d", "preprocessor_name": "DefaultPreprocessor",
                                               "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [24, 24, 24],
                                               "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["CTNormalization"],
                                               "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
                                               "resampling_fn_seg": "resample_data_or_seg_to_shape",
                                               "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
                                               "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                                               "resampling_fn_probabilities_kwargs": {},
                                               "architecture": {"network_class_name": architecture["network_class_name"],
                                                                "arch_kwargs": architecture["arch_kwargs"],
                                                                "_kw_requires_import": architecture["_kw_requires_import"]},
                                               "batch_dice": False}}}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1}, "file_ending": ".nii.gz"}
    torch.save({"network_weights": tiny_network(architecture).state_dict(), "trainer_name": "nnUNetTrainer_NoSuchClass",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset_json,
                              "device": torch.device("cpu")}, "logging": {"x": [NotPlainData.__name__]}},
               tmp_path / "checkpoint_final.pth")
    foundation = read_foundation(tmp_path / "checkpoint_final.pth")
    assert (foundation.source, foundation.parts, foundation.configuration) == ("nnunet", "network", "3d_fullres")
    assert foundation.channel_names == {"0": "CT"} and foundation.architecture == architecture
    assert foundation.preprocessing["normalization_schemes"] == ["CTNormalization"]


def _refused(tmp_path, path, pattern):
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(FSEFTError, match=pattern) as e:
        read_foundation(path)
    assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == before  # one line, nothing written
    return str(e.value)


def test_a_pth_of_neither_kind_is_refused(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pth")
    _refused(tmp_path, tmp_path / "other.pth", r"not an nnU-Net checkpoint \(no 'network_weights'\) nor an nnssl "
                                               r"checkpoint \(no 'nnssl_adaptation_plan'\)")


def test_an_nnssl_file_that_needs_unpickling_is_refused_without_running_it(tmp_path):
    architecture = tiny_architecture()
    path = nnssl_by_hand(tmp_path / "ssl.pth", tiny_network(architecture), architecture)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["citations"] = [NotPlainData()]
    torch.save(checkpoint, path)
    message = _refused(tmp_path, path, r"looks like an nnssl checkpoint but needs unpickling code "
                                       r"\(test_foundations_read\.NotPlainData\).*nothing was unpickled")
    assert "weights_only=True" in message


@pytest.mark.parametrize("name, pattern", [
    ("PrimusM", r"'PrimusM' is a Primus vision transformer, out of scope here.*supported: 'ResEncL'"),
    ("ResEncM", r"architecture 'ResEncM' is not one the plugin builds; supported: 'ResEncL' or 'NoSkipResEncL' \(fixed names; "
                r"the encoder of both is ResEnc L's\) or a "
                r"dynamic-network-architectures ResidualEncoderUNet / PlainConvUNet"),
    ("dynamic_network_architectures.architectures.unet.ResidualUNet", r"is not one the plugin builds"),
])
def test_an_architecture_the_plugin_does_not_build_is_refused(tmp_path, name, pattern):
    architecture = tiny_architecture()
    path = nnssl_by_hand(tmp_path / "ssl.pth", tiny_network(architecture), architecture, arch_class_name=name)
    plan = torch.load(path, weights_only=True)
    if name != "dynamic_network_architectures.architectures.unet.ResidualUNet":
        plan["nnssl_adaptation_plan"]["architecture_plans"].update(arch_kwargs=None, arch_kwargs_requiring_import=None)
    torch.save(plan, path)
    _refused(tmp_path, path, pattern)


def test_weights_that_do_not_fit_the_named_topology_name_the_first_key(tmp_path):
    architecture = tiny_architecture()
    network = tiny_network(architecture)
    path = nnssl_by_hand(tmp_path / "ssl.pth", network, architecture)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["nnssl_adaptation_plan"]["architecture_plans"]["arch_kwargs"]["features_per_stage"] = [4, 8, 32]
    torch.save(checkpoint, path)
    _refused(tmp_path, path, r"do not match the topology the adaptation plan names: 'encoder\.stages\.2\.blocks\.0\.conv1\."
                             r"conv\.weight' is \(16, 8, 3, 3, 3\) in the weights but \(32, 8, 3, 3, 3\) in the topology")
    checkpoint["nnssl_adaptation_plan"]["architecture_plans"]["arch_class_name"] = "ResEncL"
    checkpoint["nnssl_adaptation_plan"]["architecture_plans"]["arch_kwargs"] = None
    torch.save(checkpoint, path)
    _refused(tmp_path, path, r"'encoder\.stem\.convs\.0\.conv\.weight' is \(4, 1, 3, 3, 3\) in the weights but "
                             r"\(32, 1, 3, 3, 3\) in the topology")
