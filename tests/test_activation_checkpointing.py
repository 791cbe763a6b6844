"""Activation checkpointing (nnunetv2_fseft/training/activation_checkpointing.py): the same outputs and gradients
with fewer activations kept for the backward pass; inference untouched."""
import pytest
import torch

from networks import tiny_unet
from nnunetv2_fseft.peft import apply_peft
from nnunetv2_fseft.training.activation_checkpointing import enable_activation_checkpointing


def _pair(kind, method):
    torch.manual_seed(0)
    net = apply_peft(tiny_unet(kind), method)
    with torch.no_grad():  # non-zero LoRA/adapter branches, as after some training
        for name, p in net.named_parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.05)
    other = apply_peft(tiny_unet(kind), method)
    other.load_state_dict(net.state_dict())
    assert enable_activation_checkpointing(other) > 0
    return net, other


def _saved_bytes_and_grads(net, x):
    """Bytes autograd keeps for backward (outside checkpointed stages, whose own hooks take over), and grads."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    net.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(x)
    sum(o.float().pow(2).mean() for o in out).backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}
    return sum(saved), [o.detach() for o in out], grads


@pytest.mark.parametrize("kind, method", [("plain", "lora"), ("plain", "full"), ("residual", "cnn_adapter")])
def test_checkpointing_keeps_outputs_and_gradients_and_saves_memory(kind, method):
    net, ckpt = _pair(kind, method)
    x = torch.randn(2, 1, 16, 16, 16)
    plain_bytes, plain_out, plain_grads = _saved_bytes_and_grads(net, x)
    ckpt_bytes, ckpt_out, ckpt_grads = _saved_bytes_and_grads(ckpt, x)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain_out, ckpt_out))
    assert plain_grads.keys() == ckpt_grads.keys()
    assert all(torch.allclose(plain_grads[k], ckpt_grads[k], rtol=1e-4, atol=1e-6) for k in plain_grads)
    assert ckpt_bytes < 0.6 * plain_bytes, (ckpt_bytes, plain_bytes)
    assert list(net.state_dict()) == list(ckpt.state_dict())  # checkpoints stay interchangeable


def test_inference_and_repeated_calls_are_unchanged():
    net, ckpt = _pair("plain", "lora")
    assert enable_activation_checkpointing(ckpt) == enable_activation_checkpointing(net)  # idempotent count
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(net.eval()(x)[0], ckpt.eval()(x)[0], atol=1e-6)


def test_a_network_without_stages_is_refused():
    with pytest.raises(ValueError, match="no encoder/decoder stages"):
        enable_activation_checkpointing(torch.nn.Conv3d(1, 1, 1))


def test_trainer_option_checkpoints_the_stages(nnunet_env):
    """activation_checkpointing = True on an FSEFT trainer (a user's two-line subclass) patches every stage."""
    import json
    from pathlib import Path
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTLoRATrainer

    class FSEFTLoRATrainer_ckpt(FSEFTLoRATrainer):
        activation_checkpointing = True

    write_phantom_dataset(nnunet_env / "raw", 961, "Ckpt", ["spleen"], 2, shape=(24, 24, 24), seed=0)
    plan_with_preset(961, "tiny", num_processes=1)
    pre = nnunet_env / "pre" / "Dataset961_Ckpt"
    plans = dict(json.loads((pre / "nnUNetPlans.json").read_text()), continue_training=False)
    trainer = FSEFTLoRATrainer_ckpt(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()),
                                    device=torch.device("cpu"))
    trainer.initialize()
    net = trainer.network
    stages = list(net.encoder.stages) + list(net.decoder.stages)
    assert stages and all(getattr(s, "_fseft_checkpointed", False) for s in stages)
    log = next(Path(trainer.output_folder).glob("training_log_*.txt")).read_text()
    assert f"activation checkpointing: {len(stages)} encoder/decoder stages" in log
