"""Foundation loading: architecture check, CUDA->CPU mapping, head mapping by class name."""
import math

import pytest
import torch

from nnunetv2_fseft.checkpoints import map_heads, weights_sha256
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.files import sha256
from nnunetv2_fseft.peft import apply_peft

from foundation_files import load_foundation
from networks import tiny_unet

PRIOR_LOGIT = math.log(0.01 / 0.99)
FOUND_SOFTMAX = {"labels": {"background": 0, "Liver": 1, "spleen": 2}}
FOUND_SIGMOID = {"labels": {"background": 0, "liver": [1], "Left-Kidney": [2]}, "regions_class_order": [1, 2]}


def _save(path, net, dataset_json):
    torch.save({"network_weights": net.state_dict(), "init_args": {"dataset_json": dataset_json}}, path)


def test_softmax_head_channels_follow_class_names(tmp_path):
    foundation = tiny_unet(num_classes=3)
    _save(tmp_path / "f.pth", foundation, FOUND_SOFTMAX)
    target = apply_peft(tiny_unet(num_classes=3), "lora")
    lines = load_foundation(target, tmp_path / "f.pth", {"labels": {"background": 0, "spleen": 1, "pancreas": 2}})
    f, t = foundation.decoder.seg_layers[-1], target.decoder.seg_layers[-1]
    assert torch.equal(t.weight[1], f.weight[2]) and torch.equal(t.weight[0], f.weight[0])
    assert not t.weight[2].any()  # the new class starts from no random draw: zero weights, bias at the prior
    assert torch.allclose(t.bias[2], torch.tensor(PRIOR_LOGIT))
    assert any("pancreas" in line for line in lines)


def test_a_head_for_novel_classes_starts_at_the_prior_whatever_the_seed(tmp_path):
    # nnU-Net's random init of a new head can start a seed far from the others (one support loss was 4, not 0.6);
    # a tie with background (p = 0.5) left a small organ unlearned at the demo's budget (docs/results.md)
    foundation = tiny_unet(num_classes=3)
    _save(tmp_path / "f.pth", foundation, FOUND_SOFTMAX)
    x = torch.randn(1, 1, 16, 16, 16)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        target = apply_peft(tiny_unet(num_classes=2), "full").eval()
        lines = load_foundation(target, tmp_path / "f.pth", {"labels": {"background": 0, "pancreas": 1}})
        with torch.no_grad():
            outputs.append(target(x))
    for a, b in zip(*outputs):  # every deep-supervision output, both seeds: p(pancreas) = 0.01 everywhere
        assert torch.equal(a, b)
        assert torch.allclose(torch.softmax(a, 1)[:, 1], torch.tensor(0.01), atol=1e-6)
    assert "new classes start fresh: pancreas (p = 0.01)" in lines[-1]


def test_sigmoid_foundation_to_binary_softmax_target_is_exact(tmp_path):
    foundation = tiny_unet(num_classes=2, deep_supervision=False).eval()
    _save(tmp_path / "f.pth", foundation, FOUND_SIGMOID)
    target = apply_peft(tiny_unet(num_classes=2, deep_supervision=False), "linear_probe").eval()
    load_foundation(target, tmp_path / "f.pth", {"labels": {"background": 0, "left kidney": 1}})
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        kidney_sigmoid = torch.sigmoid(foundation(x)[:, 1])
        kidney_softmax = torch.softmax(target(x), 1)[:, 1]
    assert torch.allclose(kidney_sigmoid, kidney_softmax, atol=1e-6)


def test_architecture_mismatch_names_the_first_key_and_the_fix(tmp_path):
    _save(tmp_path / "f.pth", tiny_unet(), FOUND_SOFTMAX)
    wider = tiny_unet()
    wider.encoder.stages[1][0].convs[0].conv = torch.nn.Conv3d(4, 9, 3)  # not what the plans would build
    wider.encoder.stages[1][0].convs[0].all_modules[0] = wider.encoder.stages[1][0].convs[0].conv
    with pytest.raises(FSEFTError, match=r"encoder\.stages\.1\.0\.convs\.0\.conv\.weight.*nnUNetv2_fseft_prepare_target"):
        load_foundation(wider, tmp_path / "f.pth", FOUND_SOFTMAX)


def test_missing_and_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FSEFTError, match="does not exist"):
        load_foundation(tiny_unet(), tmp_path / "nope.pth", FOUND_SOFTMAX)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(FSEFTError, match="not an nnU-Net checkpoint"):
        load_foundation(tiny_unet(), tmp_path / "other.pth", FOUND_SOFTMAX)


def test_weights_digest_sees_the_weights_not_the_log(tmp_path):
    """Two trainings with bitwise-equal weights must share the digest though their files differ (the log)."""
    net = tiny_unet()
    torch.save({"network_weights": net.state_dict(), "logging": {"epoch_end_timestamps": [1.0]}}, tmp_path / "a.pth")
    torch.save({"network_weights": {f"module.{k}": v for k, v in net.state_dict().items()},
                "logging": {"epoch_end_timestamps": [2.0]}}, tmp_path / "b.pth")
    assert sha256(tmp_path / "a.pth") != sha256(tmp_path / "b.pth")
    assert weights_sha256(tmp_path / "a.pth") == weights_sha256(tmp_path / "b.pth")
    changed = net.state_dict()
    key = next(iter(changed))
    changed[key] = changed[key].clone()
    changed[key].view(-1)[0] = torch.nextafter(changed[key].view(-1)[0], torch.tensor(1.0))  # one ulp
    torch.save({"network_weights": changed}, tmp_path / "c.pth")
    assert weights_sha256(tmp_path / "c.pth") != weights_sha256(tmp_path / "a.pth")


def test_cuda_saved_checkpoint_loads_on_a_cpu_only_machine(tmp_path):
    """Tag every storage 'cuda:0' while saving (what a GPU run writes); loading must still work on CPU."""
    from torch import serialization
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA to show the failure mode")
    net = tiny_unet()
    entry = (0, lambda obj: "cuda:0", lambda obj, location: None)
    serialization._package_registry.insert(0, entry)
    try:
        _save(tmp_path / "gpu.pth", net, FOUND_SOFTMAX)
    finally:
        serialization._package_registry.remove(entry)
    with pytest.raises(RuntimeError):
        torch.load(tmp_path / "gpu.pth", weights_only=False)  # what nnU-Net's own loader does
    target = apply_peft(tiny_unet(), "bitfit")
    load_foundation(target, tmp_path / "gpu.pth", FOUND_SOFTMAX)
    assert torch.equal(target.encoder.stages[0][0].convs[0].conv.weight, net.encoder.stages[0][0].convs[0].conv.weight)


def test_a_foundation_without_class_names_starts_every_class_fresh():
    state = apply_peft(tiny_unet(num_classes=3), "full").state_dict()
    lines = map_heads(state, {}, {"labels": {"background": 0, "liver": 1, "pancreas": 2}}, None)
    assert lines == ["head: the foundation names no classes; all target classes start fresh (p = 0.01)"]
    bias = next(v for k, v in state.items() if k.endswith("seg_layers.0.bias"))
    assert bias[0] == 0 and torch.allclose(bias[1:], torch.tensor(PRIOR_LOGIT))
