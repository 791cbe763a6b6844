"""Mixed precision (nnU-Net trains under autocast + GradScaler on every CUDA run), tested on the CPU with
bfloat16 autocast and torch's CPU GradScaler:

* LoRA and adapter layers keep float32 parameters and gradients while their forward runs in low precision;
* the grad scaler unscales and nnU-Net's clipping (norm 12) covers every parameter group, the head's own group
  (head_learning_rate) included, in the network step and in the cached black-box head step;
* an adapter trained under autocast merges into plain convolutions as exactly as test_peft's merge tests ask.
"""
import copy
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from networks import tiny_unet
from nnunetv2_fseft.checkpoints import is_head_key
from nnunetv2_fseft.peft import apply_peft, merge_peft
from nnunetv2_fseft.peft.tree import injected_modules
from nnunetv2_fseft.training.feature_cache import head_train_step, trunk_features
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
from nnunetv2_fseft.training.optim_step import backward_and_step

ADAPTED = ["lora", "decoder_lora", "cnn_adapter", "adaptformer", "spatial_adapter"]


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 1, 8, 8, 8), generator=g), torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).float()


def _trainer(net, scaler=None):
    """What backward_and_step and head_train_step read of an FSEFTTrainer; the optimizer is FSEFTTrainer's own
    (two parameter groups: the head at head_learning_rate)."""
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    t = SimpleNamespace(network=net, plain_network=lambda: net, loss=loss, grad_scaler=scaler, is_ddp=False,
                        initial_lr=1e-3, head_learning_rate=1e-2, weight_decay=1e-4, num_epochs=10,
                        _stem_trained_before=lambda: False)  # not a --c
    t.optimizer, _ = FSEFTTrainer.configure_optimizers(t)
    return t


def _network(method, deep_supervision=False):
    torch.manual_seed(0)
    net = apply_peft(tiny_unet(num_classes=3, deep_supervision=deep_supervision), method)
    with torch.no_grad():  # non-zero adapters, as after some training
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return net


@pytest.mark.parametrize("method", ADAPTED)
def test_adapter_parameters_stay_float32_under_autocast(method):
    net = _network(method)
    trainer = _trainer(net)
    x, y = _batch()
    for _ in range(2):
        trainer.optimizer.zero_grad(set_to_none=True)
        with bf16():
            out = net(x)
            loss = trainer.loss(out, y)
        assert out.dtype == torch.bfloat16  # autocast really ran the convolutions in low precision
        backward_and_step(trainer, loss)
    wrappers = [p for m in injected_modules(net) for p in m.parameters()]
    assert wrappers
    for p in net.parameters():
        assert p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad and p.grad is not None}


def _scaled_equals_unscaled(step, method):
    """One step with a GradScaler (scale 2**12) and one without, from the same state: the scaler's run must end
    with the same (unscaled, clipped) gradients and parameters in both groups."""
    nets = [_network(method), _network(method)]
    plain, scaled = _trainer(nets[0]), _trainer(nets[1], torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    step(plain)
    step(scaled)
    assert scaled.grad_scaler.get_scale() == 2.0 ** 12  # no inf/nan: the step was taken, the scale kept
    g_plain, g_scaled = _grads(nets[0]), _grads(nets[1])
    heads = [k for k in g_plain if is_head_key(k)]
    groups = len(scaled.optimizer.param_groups)
    assert heads and groups == (1 if len(heads) == len(g_plain) else 2)  # the head has its own group
    for k in g_plain:
        assert torch.allclose(g_plain[k], g_scaled[k], rtol=1e-4, atol=1e-8), k
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in g_scaled.values()]))
    assert norm <= 12 * (1 + 1e-4), f"not clipped: total norm {norm}"
    for (k, a), b in zip(nets[0].state_dict().items(), nets[1].state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), k


@pytest.mark.parametrize("method", ["lora", "decoder_lora"])
def test_grad_scaler_unscales_and_clips_the_head_group_with_the_rest(method):
    x, y = _batch()

    def step(trainer):
        trainer.optimizer.zero_grad(set_to_none=True)
        with bf16():
            loss = 1e3 * trainer.loss(trainer.network(x), y)  # large: the clipping at 12 bites
        backward_and_step(trainer, loss)

    _scaled_equals_unscaled(step, method)


def test_grad_scaler_in_the_cached_head_step():
    x, y = _batch()

    def step(trainer):
        features = trunk_features(trainer.network, x).to(torch.float16)  # as the pool keeps them
        trainer.loss = _scaled_loss(trainer.loss)
        head_train_step(trainer, features, y, bf16)

    _scaled_equals_unscaled(step, "linear_probe")


def _scaled_loss(loss):
    return lambda output, target: 1e3 * loss(output, target)


@pytest.mark.parametrize("method", ["lora", "decoder_lora", "cnn_adapter"])
def test_adapter_trained_under_autocast_merges_exactly(method):
    net = _network(method, deep_supervision=False)
    trainer = _trainer(net, torch.amp.GradScaler("cpu"))
    x, y = _batch()
    for _ in range(3):
        trainer.optimizer.zero_grad(set_to_none=True)
        with bf16():
            loss = trainer.loss(net(x), y)
        backward_and_step(trainer, loss)
    net.eval()
    with torch.no_grad():
        adapted = net(x)
        merged = merge_peft(copy.deepcopy(net))
        assert not injected_modules(merged) and all(p.dtype == torch.float32 for p in merged.parameters())
        assert (merged(x) - adapted).abs().max() <= 1e-4  # test_peft's merge tolerance
