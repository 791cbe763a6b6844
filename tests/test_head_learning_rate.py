"""FSEFTTrainer.configure_optimizers: the segmentation head trains at head_learning_rate, both rates follow nnU-Net's
poly decay, and without a head rate the optimiser is the single-rate AdamW it was."""
from types import SimpleNamespace

import pytest
import torch

from networks import tiny_unet
from nnunetv2_fseft.peft import apply_peft
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer


def _configured(head_lr, method="full", seed=0):
    torch.manual_seed(seed)
    net = apply_peft(tiny_unet(num_classes=2, deep_supervision=method == "full"), method)
    fake = SimpleNamespace(plain_network=lambda: net, initial_lr=1e-4, head_learning_rate=head_lr,
                           weight_decay=1e-4, num_epochs=20, _stem_trained_before=lambda: False)  # not a --c
    optimizer, scheduler = FSEFTTrainer.configure_optimizers(fake)
    return net, optimizer, scheduler


def _is_head(name):
    return name.startswith("decoder.seg_layers.")


def test_head_gets_its_own_rate_and_both_decay_alike():
    net, optimizer, scheduler = _configured(1e-2)
    body, head = optimizer.param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert head["params"] and all(_is_head(names[id(p)]) for p in head["params"])
    assert not any(_is_head(names[id(p)]) for p in body["params"])
    assert len(body["params"]) + len(head["params"]) == len(list(net.parameters()))
    scheduler.step(10)  # nnU-Net steps the scheduler with the epoch
    factor = (1 - 10 / 20) ** 0.9
    assert body["lr"] == pytest.approx(1e-4 * factor) and head["lr"] == pytest.approx(1e-2 * factor)


def test_an_adapter_inside_the_head_keeps_the_method_rate():
    net, optimizer, _ = _configured(1e-2, method="spatial_adapter")
    body, head = optimizer.param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in head["params"]) == ["decoder.seg_layers.1.base_layer.bias",
                                                            "decoder.seg_layers.1.base_layer.weight"]
    assert body["lr"] == 1e-4 and any(".adapter." in names[id(p)] for p in body["params"])


def test_zero_started_head_moves_by_about_its_rate():
    """The defect head_learning_rate mends: Adam moves each weight by about the rate per step, so a zero-started
    head at 1e-4 is still near zero after a step that moves it 100x further at 1e-2."""
    moved = {}
    for head_lr in (None, 1e-2):
        net, optimizer, _ = _configured(head_lr)
        head = net.decoder.seg_layers[-1]
        with torch.no_grad():
            head.weight.zero_(), head.bias.zero_()
        net(torch.randn(1, 1, 16, 16, 16))[0].mean().backward()
        optimizer.step()
        moved[head_lr] = head.weight.abs().max().item()
    assert moved[None] == pytest.approx(1e-4, rel=0.05) and moved[1e-2] == pytest.approx(1e-2, rel=0.05)


def test_without_head_rate_the_update_is_the_single_group_adamw():
    net, optimizer, _ = _configured(None)
    reference = tiny_unet(num_classes=2, deep_supervision=True)
    reference.load_state_dict(net.state_dict())
    single = torch.optim.AdamW(reference.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(1, 1, 16, 16, 16)
    for model, opt in ((net, optimizer), (reference, single)):
        model(x)[0].square().mean().backward()
        opt.step()
    after = reference.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in net.state_dict().items())


def test_every_fseft_trainer_trains_its_head_at_the_linear_probe_rate():
    """New head channels start with zero weights: every method's head trains at 1e-2 whatever the method's own rate, and the
    trainer list says so where the two differ."""
    from nnunetv2_fseft.trainer_names import describe, plugin_trainers
    fseft = {n: c for n, c in plugin_trainers().items() if issubclass(c, FSEFTTrainer)}
    assert "FSEFTDecoderLoRATrainer" in fseft and "FSEFTFullFTTrainer" in fseft
    for name, cls in fseft.items():
        assert (cls.head_learning_rate or cls.learning_rate) == 1e-2, name
        assert ("head lr 1e-02" in describe(cls)[0]) == (cls.learning_rate != 1e-2), name
