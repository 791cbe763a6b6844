"""Invariants every PEFT method must keep on the networks nnU-Net builds (PlainConv / ResEnc, 2D / 3D)."""
import copy

import pytest
import torch

from nnunetv2_fseft.peft import METHODS, apply_peft, count_parameters, is_mergeable, merge_peft
from nnunetv2_fseft.peft.lora import LoRAConv
from nnunetv2_fseft.peft.methods import INJECTIONS
from nnunetv2_fseft.peft.spatial_adapter import SpatialAdapterHead
from nnunetv2_fseft.peft.tree import conv_layers, injected_modules

from networks import tiny_unet

NETS = [("plain", 3), ("resenc", 3), ("plain", 2), ("resenc", 2)]
WRAPPERS = {kind: entry[0] for kind, entry in INJECTIONS.items()} | {"spatial_adapter": SpatialAdapterHead}
# the methods whose injected layers all say they are linear; the tests below hold each side to its claim
MERGEABLE = {m for m, spec in METHODS.items() if all(WRAPPERS[kind].mergeable for kind, _ in spec.inject)}


def _final(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _setup(kind, dims, method):
    torch.manual_seed(0)
    base = tiny_unet(kind, dims).eval()
    x = torch.randn(1, 1, *([8] * dims))
    with torch.no_grad():
        reference = _final(base(x))
    return base, apply_peft(copy.deepcopy(base), method).eval(), x, reference


@pytest.mark.parametrize("kind,dims", NETS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_init_is_exact_nonzero_changes_output_grads_stay_inside(kind, dims, method):
    base, net, x, reference = _setup(kind, dims, method)
    with torch.no_grad():
        assert (_final(net(x)) - reference).abs().max() <= 1e-6
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        assert (_final(net(x)) - reference).abs().max() > 1e-3
    # gradients reach only the trained parameters
    net.train()
    out = net(x)
    sum(o.mean() for o in (out if isinstance(out, (list, tuple)) else [out])).backward()
    trainable, total = count_parameters(net)
    assert 0 < trainable <= total
    for name, p in net.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} is trainable but got no gradient"
        else:
            assert p.grad is None, f"{name} is frozen but got a gradient"


@pytest.mark.parametrize("kind,dims", NETS)
@pytest.mark.parametrize("method", sorted(MERGEABLE))
def test_merge_gives_a_plain_network_with_the_same_outputs(kind, dims, method):
    base, net, x, _ = _setup(kind, dims, method)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        adapted = _final(net(x))
        merged = merge_peft(net)
        assert not injected_modules(merged)
        assert set(merged.state_dict()) == set(base.state_dict())  # stock keys: stock nnU-Net loads it
        assert (_final(merged(x)) - adapted).abs().max() <= 1e-4


def test_nonlinear_adapters_refuse_to_merge():
    assert {"adaptformer", "spatial_adapter"} <= set(METHODS) - MERGEABLE
    for method in set(METHODS) - MERGEABLE:
        net = apply_peft(tiny_unet(), method)
        assert not is_mergeable(net)
        with pytest.raises(ValueError, match="cannot be merged"):
            merge_peft(net)


def test_lora_reaches_every_conv_through_the_aliases():
    """The alias trap: `.conv` and `.all_modules[0]` must both point at the LoRA layer, and so must decoder.encoder."""
    net = apply_peft(tiny_unet(), "lora")
    assert not conv_layers(net, "all", transposed=True)  # nothing left un-wrapped
    for block in (m for m in net.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")):
        assert isinstance(block.conv, LoRAConv) and block.all_modules[0] is block.conv
    assert net.decoder.encoder is net.encoder
    assert all(isinstance(t, LoRAConv) for t in net.decoder.transpconvs)


def test_decoder_methods_build_no_graph_in_the_frozen_encoder():
    net = apply_peft(tiny_unet(), "decoder")
    skips = net.encoder(torch.randn(1, 1, 8, 8, 8))
    assert all(s.grad_fn is None for s in skips)  # nothing kept for backward in the encoder


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(KeyError, match="lora"):
        apply_peft(tiny_unet(), "lorax")
