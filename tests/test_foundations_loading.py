"""Loading a foundation into an adapted network: an nnssl encoder (encoder + stem, every alias; decoder and heads
fresh), another input channel count, and the messages when the network differs in kind."""
import math
import os

import pytest
import torch

from nnunetv2_fseft.checkpoints import apply_foundation, input_projection, load_adapter_tensors, trainable_state
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.foundations.architectures import build_network
from nnunetv2_fseft.peft import apply_peft, merge_peft

from foundation_files import nnssl_by_hand, tiny_architecture, tiny_network

TARGET = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "tumour": 1}}
TWO_CHANNELS = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1}}


def _ssl(tmp_path, kind="ResidualEncoderUNet", channels=1):
    architecture = tiny_architecture(kind)
    network = tiny_network(architecture, channels=channels, classes=4)
    stem = "encoder.stem" if kind == "ResidualEncoderUNet" else "encoder.stages.0"
    first = "encoder.stem.convs.0" if kind == "ResidualEncoderUNet" else "encoder.stages.0.0.convs.0"
    path = nnssl_by_hand(tmp_path / "ssl.pth", network, architecture, arch_class_name=kind, key_to_stem=stem,
                         keys_to_in_proj=[f"{first}.conv", f"{first}.all_modules.0"])
    return read_foundation(path), network, architecture


def _target(architecture, method, channels=1, seed=1):
    return apply_peft(tiny_network(architecture, channels=channels, classes=2, seed=seed), method)


@pytest.mark.parametrize("kind", ["ResidualEncoderUNet", "PlainConvUNet"])
def test_nnssl_encoder_and_stem_load_under_every_alias_and_the_decoder_starts_fresh(tmp_path, kind):
    foundation, source, architecture = _ssl(tmp_path, kind)
    target = _target(architecture, "decoder_lora")
    report = apply_foundation(target, foundation, TARGET)
    state, plain = target.state_dict(), source.state_dict()
    for key, value in state.items():
        fkey = key.replace(".base_layer", "")
        if fkey.startswith(("encoder.", "decoder.encoder.")) and "lora_" not in key:
            assert torch.equal(value, plain[fkey]), key  # the decoder's alias of the encoder too
    decoder = [k for k in plain if k.startswith("decoder.stages") and k.endswith("conv.weight")]
    assert decoder and not any(torch.equal(state[k], plain[k]) for k in decoder)
    heads = {k: v for k, v in state.items() if ".seg_layers." in k}  # fresh: zero weights, the class at p = 0.01
    assert heads and not any(v.any() for k, v in heads.items() if k.endswith("weight"))
    assert all(v[0] == 0 and torch.allclose(v[1], torch.tensor(math.log(0.01 / 0.99)))
               for k, v in heads.items() if k.endswith("bias"))
    encoder_keys = len([k for k in plain if k.startswith("encoder.")])
    assert f"encoder {encoder_keys} of {encoder_keys} tensors loaded (stem included)" in report.lines[1]
    assert "decoder" in report.lines[1] and "tensors new" in report.lines[1]
    assert report.lines[0].startswith("foundation: nnssl checkpoint") and "encoder + stem only" in report.lines[0]
    assert report.lines[-1] == "cite (paper) Tiny SSL encoder: Doe, J. (2026). A tiny encoder."
    assert report.channel_rule is None and not report.stem_trains


def test_fresh_decoder_is_the_same_for_every_rebuild_so_a_frozen_one_survives_apply(tmp_path):
    foundation, _, architecture = _ssl(tmp_path)
    a, b = _target(architecture, "lora", seed=1), _target(architecture, "lora", seed=2)
    for network in (a, b):
        apply_foundation(network, foundation, TARGET)
    sa, sb = a.state_dict(), b.state_dict()
    frozen = [k for k in sa if k.startswith("decoder.stages") and "base_layer.weight" in k]
    assert frozen and all(torch.equal(sa[k], sb[k]) for k in frozen)
    lora_a = [k for k in sa if "lora_A" in k]  # adapters keep their own random start (they are saved)
    assert lora_a and not all(torch.equal(sa[k], sb[k]) for k in lora_a)


def test_one_channel_foundation_repeats_its_stem_over_two_channels_and_the_stem_trains(tmp_path):
    foundation, source, architecture = _ssl(tmp_path)
    target = _target(architecture, "decoder_lora", channels=2)
    report = apply_foundation(target, foundation, TWO_CHANNELS)
    assert report.channel_rule == ("input channels: the foundation's one channel repeated over the target's 2 "
                                   "('T1', 'T2') and divided by 2 (nnssl's rule)") and report.stem_trains
    first = input_projection(target)
    assert all(p.requires_grad for p in first.parameters())
    assert any(k.endswith("stem.convs.0.conv.base_layer.weight") for k in trainable_state(target))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():  # a constant second channel equal to the first: the foundation's own activations
        assert torch.allclose(first(torch.cat([x, x], 1)), input_projection(source)(x), atol=1e-6)


def test_channels_map_by_name_whatever_their_order_and_case(tmp_path):
    architecture = tiny_architecture()
    source = tiny_network(architecture, channels=2, classes=2)
    folder_weights = source.state_dict()
    foundation = read_foundation(nnssl_by_hand(tmp_path / "two.pth", source, architecture))
    foundation.channel_names = {"0": "t2", "1": "T1"}  # as an nnU-Net model folder's dataset.json names them
    target = _target(architecture, "lora", channels=2)
    report = apply_foundation(target, foundation, TWO_CHANNELS)
    assert report.channel_rule == "input channels mapped by name ('T1' <- 'T1', 'T2' <- 't2')"
    weight = input_projection(target).weight
    assert torch.equal(weight, folder_weights["encoder.stem.convs.0.conv.weight"][:, [1, 0]])
    one = _target(architecture, "lora", channels=1)
    report = apply_foundation(one, foundation, {"channel_names": {"0": "T2"}, "labels": TARGET["labels"]})
    assert "'T2' <- 't2'" in report.channel_rule
    assert torch.equal(input_projection(one).weight, folder_weights["encoder.stem.convs.0.conv.weight"][:, [0]])


def test_channels_that_no_rule_maps_are_refused_naming_both_lists(tmp_path):
    architecture = tiny_architecture()
    foundation = read_foundation(nnssl_by_hand(tmp_path / "two.pth", tiny_network(architecture, channels=2),
                                               architecture))
    foundation.channel_names = {"0": "CT", "1": "PET"}
    three = {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": TARGET["labels"]}
    with pytest.raises(FSEFTError, match=r"input channels: foundation 2, target 3\); prepare the target with the "
                                         r"foundation's channel names \(foundation: \['CT', 'PET'\], target: "
                                         r"\['T1', 'T2', 'FLAIR'\]\)"):
        apply_foundation(_target(architecture, "lora", channels=3), foundation, three)


def test_a_2d_target_from_a_3d_foundation_names_the_dimensions_not_prepare_target(tmp_path):
    foundation, _, _ = _ssl(tmp_path)
    flat = apply_peft(build_network(tiny_architecture(dims=2), 1, 2), "decoder_lora")
    with pytest.raises(FSEFTError, match=r"is a 3d network but this configuration builds a 2d one.*adapt with a 3d "
                                         r"configuration.*preparing the target again does not change this") as e:
        apply_foundation(flat, foundation, TARGET)
    assert "nnUNetv2_fseft_prepare_target" not in str(e.value)


def test_a_cascade_stage_names_its_extra_inputs(tmp_path):
    foundation, _, architecture = _ssl(tmp_path)
    cascade = _target(architecture, "decoder_lora", channels=3)  # 1 image channel + 2 previous-stage classes
    with pytest.raises(FSEFTError, match=r"takes 3 inputs: the target's 1 image channel\(s\) \+ 2 of the previous "
                                         r"stage's segmentation \(a cascade stage\).*adapt 3d_fullres or 3d_lowres"):
        apply_foundation(cascade, foundation, TARGET)


def test_mapped_stem_merges_exactly_and_an_adapter_file_rebuilds_it(tmp_path):
    foundation, _, architecture = _ssl(tmp_path)
    trained = _target(architecture, "decoder_lora", channels=2)
    apply_foundation(trained, foundation, TWO_CHANNELS)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # stands in for training: stem, LoRA, decoder all move
    adapter = {k: v.clone() for k, v in trainable_state(trained).items()}
    rebuilt = _target(architecture, "decoder_lora", channels=2, seed=7)
    apply_foundation(rebuilt, foundation, TWO_CHANNELS)
    load_adapter_tensors(rebuilt, adapter, "adapter")
    x = torch.randn(1, 2, 16, 16, 16)
    trained.eval(), rebuilt.eval()
    with torch.no_grad():
        expected = trained(x)
        assert torch.equal(rebuilt(x), expected)
        assert torch.allclose(merge_peft(rebuilt)(x), expected, atol=1e-5)


@pytest.mark.skipif(os.environ.get("FSEFT_SLOW_TESTS") != "1", reason="builds the real ResEnc-L (FSEFT_SLOW_TESTS=1)")
def test_real_resenc_l_loads_448_of_448_encoder_tensors_and_they_matter(tmp_path):
    from nnunetv2_fseft.foundations.architectures import RESENC_L
    from foundation_files import write_checkpoint
    source = build_network(RESENC_L, 1, 2)
    with torch.no_grad():  # as after training: ResEnc starts each block's last norm at 0, which hides its convs
        for module in source.modules():
            if isinstance(module, torch.nn.InstanceNorm3d):
                module.weight.uniform_(0.5, 1.5)
    path = write_checkpoint(tmp_path / "resencl.pth", network_weights=source.state_dict(), architecture="ResEncL",
                            spacing=[1, 1, 1], normalization_schemes=["ZScoreNormalization"], patch_size=[160] * 3)
    foundation = read_foundation(path)
    assert len(foundation.weights) == 448
    target = apply_peft(build_network(RESENC_L, 1, 2), "decoder_lora").eval()
    report = apply_foundation(target, foundation, TARGET)
    assert "encoder 448 of 448 tensors loaded" in report.lines[1]
    x = torch.randn(1, 1, 64, 64, 64)  # 2x2x2 at the bottleneck: instance norm needs more than one voxel
    with torch.no_grad():
        target.decoder.seg_layers[-1].weight.normal_()  # a fresh head is zero: give the output something to show
        before = target(x)
        # a perturbation, not a scale (instance norm would undo a scale)
        weight = target.encoder.stages[3].blocks[0].conv1.conv.base_layer.weight
        weight.add_(0.1 * torch.randn_like(weight))
        assert not torch.allclose(target(x), before)


def test_decoder_frozen_methods_are_declared_and_refused_unless_a_subclass_opts_in(tmp_path, monkeypatch):
    from nnunetv2_fseft.peft import METHODS
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
    assert {m for m, spec in METHODS.items() if spec.needs_trained_decoder} == {
        "ft_last", "linear_probe", "spatial_adapter", "bitfit", "affine_norm", "cnn_adapter", "adaptformer", "lora"}
    foundation, _, _ = _ssl(tmp_path)
    monkeypatch.delenv("nnUNet_fseft_allow_untrained_decoder", raising=False)

    class Trainer:
        peft_method, allow_untrained_decoder, logged = "bitfit", False, []
        print_to_log_file = logged.append
        _refuse = FSEFTTrainer._refuse_untrained_decoder

    with pytest.raises(FSEFTError, match=r"method 'bitfit' keeps the decoder frozen; use a method that trains it: "
                                         r"full, decoder, decoder_lora, decoder_bitfit, decoder_adaptformer, "
                                         r"decoder_affine_norm \(e\.g\. -tr FSEFTDecoderLoRATrainer\)"):
        Trainer()._refuse(foundation)

    class OptedIn(Trainer):
        allow_untrained_decoder = True

    OptedIn()._refuse(foundation)
    assert "opted in" in OptedIn.logged[-1]
    Trainer.peft_method = "decoder_bitfit"
    Trainer()._refuse(foundation)  # trains the decoder: nothing to refuse
