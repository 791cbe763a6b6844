"""Foundation files the tests write themselves: nnssl checkpoints in the published layout (by hand, not through
the plugin's writer) and nnU-Net checkpoints, at a tiny size set through arch_kwargs."""
import torch

from nnunetv2_fseft.foundations.architectures import build_network

CITATION = {"type": "paper", "name": "Tiny SSL encoder", "apa_citations": ["Doe, J. (2026). A tiny encoder."]}


def tiny_architecture(kind: str = "ResidualEncoderUNet", dims: int = 3) -> dict:
    """nnU-Net plans style, a 3-stage network of 4/8/16 features."""
    kwargs = {"n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
              "kernel_sizes": [[3] * dims] * 3, "strides": [[1] * dims, [2] * dims, [2] * dims],
              "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
              "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    if kind == "ResidualEncoderUNet":
        kwargs["n_blocks_per_stage"] = [1, 2, 2]
    else:
        kwargs["n_conv_per_stage"] = [2, 2, 2]
    return {"network_class_name": f"dynamic_network_architectures.architectures.unet.{kind}", "arch_kwargs": kwargs,
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}


def tiny_network(architecture: dict, channels: int = 1, classes: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return build_network(architecture, channels, classes)


def nnssl_by_hand(path, network, architecture: dict, arch_class_name: str = "ResidualEncoderUNet", **overrides):
    """The published nnssl layout written out key by key: network.state_dict() already holds decoder.encoder.* and
    both names of the stem conv, as an nnssl-trained network's does."""
    weights = network.state_dict()
    assert "decoder.encoder.stem.convs.0.conv.weight" in weights or "decoder.encoder.stages.0.0.convs.0.conv.weight" in weights
    plan = {
        "architecture_plans": {"arch_class_name": arch_class_name, "arch_kwargs": architecture["arch_kwargs"],
                               "arch_kwargs_requiring_import": architecture["_kw_requires_import"]},
        "pretrain_plan": {"configurations": {"onemmiso": {
            "spacing": [1.0, 1.0, 1.0], "spacing_style": "onemmiso", "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "patch_size": [32, 32, 32]}}},
        "pretrain_num_input_channels": next(v for k, v in weights.items() if k.startswith("encoder.")).shape[1],
        "recommended_downstream_patchsize": [32, 32, 32],
        "key_to_encoder": "encoder.stages", "key_to_stem": "encoder.stem",
        "keys_to_in_proj": ["encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0"],
        "key_to_lpe": None,
    }
    plan.update(overrides)
    torch.save({"network_weights": weights, "citations": [CITATION], "nnssl_adaptation_plan": plan}, path)
    return path
