"""torch.compile (nnU-Net compiles the network on every CUDA run, nnUNet_compile) of the adapted networks.

* Outputs and gradients of the compiled network equal eager ones for LoRA, decoder + LoRA, the CNN adapter,
  AdaptFormer, and LoRA with activation checkpointing (its per-instance forward patch). LoRA compiles with
  inductor (the CUDA default; C++ code generation on the CPU) in the default suite; the others compile with
  aot_eager (the same graph capture and autograd split, without code generation), and with inductor too when
  FSEFT_SLOW_TESTS=1 (a minute or more each on 2 cores).
* Compilation leaves the names alone: nnU-Net saves `_orig_mod`'s state dict, so checkpoints, adapter files,
  `--c`, `--merge` and `--apply` see the eager keys; FSEFTTrainer.plain_network() unwraps the compiled module.
"""
import copy
import json
import os
from pathlib import Path

import pytest
import torch

from nnunetv2_fseft.peft import apply_peft, trainable_state
from nnunetv2_fseft.training.activation_checkpointing import enable_activation_checkpointing

SLOW = os.environ.get("FSEFT_SLOW_TESTS") == "1"
CASES = {  # name -> (method, activation checkpointing)
    "lora": ("lora", False), "decoder_lora": ("decoder_lora", False), "cnn_adapter": ("cnn_adapter", False),
    "adaptformer": ("adaptformer", False), "lora_checkpointed": ("lora", True)}


def smallest_unet():
    """Two stages, one conv each: every kind of layer a wrapper goes on (encoder and decoder convs, the transposed
    conv, the heads) and no more kernels for inductor to generate than needed."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(input_channels=1, n_stages=2, features_per_stage=[4, 8], conv_op=torch.nn.Conv3d,
                         kernel_sizes=3, strides=[1, 2], n_conv_per_stage=1, num_classes=3,
                         n_conv_per_stage_decoder=1, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=True)


def _adapted(method: str, checkpointed: bool):
    torch.manual_seed(0)
    net = apply_peft(smallest_unet(), method).train()
    with torch.no_grad():  # as after some training: zero-initialised branches would hide their gradients
        for p in net.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    if checkpointed:
        enable_activation_checkpointing(net)
    return net


def _run(net, x):
    outputs = net(x)
    loss = sum((o.float() ** 2).mean() * (i + 1) for i, o in enumerate(outputs))  # every head in the graph
    loss.backward()
    return [o.detach() for o in outputs]


def _grads(net) -> dict:
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}


def _compiled_equals_eager(case: str, backend: str):
    eager = _adapted(*CASES[case])
    twin = copy.deepcopy(eager)
    if CASES[case][1]:  # deepcopy copies the patched forward bound to the original's stages: patch the twin anew
        twin = _adapted(*CASES[case])
    compiled = torch.compile(twin, backend=backend)
    x = torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    expected, got = _run(eager, x), _run(compiled, x)
    assert len(expected) == len(got) == 1  # deep supervision: the list of (here one) outputs
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, rtol=1e-4, atol=1e-5), (e - g).abs().max()
    ge, gc = _grads(eager), _grads(twin)
    assert ge.keys() == gc.keys() and ge
    for k in ge:
        assert torch.allclose(ge[k], gc[k], rtol=1e-3, atol=1e-6), f"{k}: {(ge[k] - gc[k]).abs().max()}"
    # compilation wraps, it does not rename: nnU-Net saves _orig_mod's state dict
    assert list(compiled.state_dict()) == [f"_orig_mod.{k}" for k in eager.state_dict()]
    assert list(compiled._orig_mod.state_dict()) == list(eager.state_dict())
    assert list(trainable_state(compiled._orig_mod)) == list(trainable_state(eager))


def test_lora_compiles_with_inductor():
    _compiled_equals_eager("lora", "inductor")


@pytest.mark.parametrize("case", [c for c in CASES if c != "lora"])
def test_wrappers_compile(case):
    _compiled_equals_eager(case, "aot_eager")


@pytest.mark.skipif(not SLOW, reason="an inductor compile each (a minute or more on 2 cores); FSEFT_SLOW_TESTS=1")
@pytest.mark.parametrize("case", [c for c in CASES if c != "lora"])
def test_wrappers_compile_with_inductor(case):
    _compiled_equals_eager(case, "inductor")


# ------------------------------------------------------------------ the trainer with nnU-Net's compile switch on

def _plans() -> tuple:
    """nnU-Net 3d_fullres plans of a tiny 3-stage network, and a 2-label dataset.json."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                            "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                            "n_conv_per_stage": [2] * 3, "n_conv_per_stage_decoder": [1] * 2, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [16, 16, 16],
              "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_probabilities":
              "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
              "resampling_fn_probabilities_kwargs": {}, "batch_dice": False, "architecture": arch}
    plans = {"dataset_name": "Dataset954_Compile", "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": config},
             "original_median_spacing_after_transp": [1.0, 1.0, 1.0], "label_manager": "LabelManager",
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "foreground_intensity_properties_per_channel": {}, "experiment_planner_used": "ExperimentPlanner"}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "spleen": 1, "liver": 2},
                    "numTraining": 2, "file_ending": ".nii.gz"}
    return plans, dataset_json


def _trainer(compile_on: bool, resume: bool = False):
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTLoRATrainer

    class LoRACompiled(FSEFTLoRATrainer):
        activation_checkpointing = True

        def _do_i_compile(self):  # nnU-Net never compiles on the CPU; a CUDA run does by default
            return compile_on

    LoRACompiled.__name__ = "FSEFTLoRATrainer_compiletest"
    plans, dataset_json = _plans()
    return LoRACompiled(dict(plans, continue_training=resume), "3d_fullres", 0, dataset_json,
                        device=torch.device("cpu"))


@pytest.fixture
def preprocessed(nnunet_env):
    """An nnU-Net preprocessed folder the trainer can be initialised on (no case is read in these tests)."""
    folder = nnunet_env / "pre" / "Dataset954_Compile" / "nnUNetPlans_3d_fullres"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case_000.b2nd").write_bytes(b"")  # tells nnU-Net the dataset format
    return nnunet_env


def test_compiled_trainer_saves_resumes_and_exports_under_eager_names(preprocessed, tmp_path):
    from torch._dynamo import OptimizedModule

    from nnunetv2_fseft.export import export_model

    trainer = _trainer(compile_on=True)
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)
    plain = trainer.plain_network()
    assert plain is trainer.network._orig_mod and not isinstance(plain, OptimizedModule)
    with torch.no_grad():  # as after training
        for p in plain.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    fold = Path(trainer.output_folder)
    trainer.save_checkpoint(str(fold / "checkpoint_latest.pth"))
    trainer.save_checkpoint(str(fold / "checkpoint_final.pth"))

    eager = _trainer(compile_on=False)
    eager.initialize()
    names = list(eager.network.state_dict())
    saved = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert list(saved["network_weights"]) == names and not any("_orig_mod" in k for k in names)
    from safetensors.torch import load_file
    adapter = load_file(fold / "adapter.safetensors")
    assert set(adapter) == set(trainable_state(eager.network)) and adapter

    for compile_on in (False, True):  # --c, with and without compile
        resumed = _trainer(compile_on, resume=True)
        resumed.load_checkpoint(str(fold / "checkpoint_latest.pth"))
        for (k, p), q in zip(resumed.plain_network().state_dict().items(), saved["network_weights"].values()):
            assert torch.equal(p, q), k

    base = Path(trainer.output_folder_base)  # what on_train_start copies there
    plans, dataset_json = _plans()
    (base / "plans.json").write_text(json.dumps(plans))
    (base / "dataset.json").write_text(json.dumps(dataset_json))
    merged = export_model(base, tmp_path / "merged", merge=True)
    stock = torch.load(merged / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    from nnunetv2_fseft.networks import build_plain_network
    assert set(stock["network_weights"]) == set(build_plain_network(plans, "3d_fullres", dataset_json).state_dict())
