"""Foundation files the tests write themselves: nnssl checkpoints in the published layout (by hand, and through
write_checkpoint, which benchmarks/hippocampus_foundations.py also uses) and nnU-Net checkpoints, at a tiny size set
through arch_kwargs; and load_foundation, a foundation file put into a network in one call."""
from pathlib import Path

import torch

from nnunetv2_fseft.checkpoints import apply_foundation
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.files import atomic_write
from nnunetv2_fseft.foundations import read_foundation
from nnunetv2_fseft.foundations.architectures import SUPPORTED_CLASSES, build_network, resolve_architecture
from nnunetv2_fseft.foundations.description import strip_prefix
from nnunetv2_fseft.foundations.nnssl import PLAN_KEY, stem_keys

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


def load_foundation(network: torch.nn.Module, path, target_json: dict) -> list:
    """Load a foundation (model folder, nnU-Net or nnssl checkpoint) into an (adapted) network. Returns log lines."""
    return apply_foundation(network, read_foundation(path), target_json).lines


def write_checkpoint(path, *, network_weights: dict, architecture, spacing, normalization_schemes, patch_size,
                     citations=()) -> Path:
    """Write weights in the published nnssl layout (read back by read_foundation as an encoder-only foundation).

    architecture: "ResEncL" or nnU-Net plans style {network_class_name, arch_kwargs, _kw_requires_import}.
    network_weights: a state dict of the network; the `decoder.encoder.*` aliases are added where missing."""
    weights = {k: v.detach().cpu().clone() for k, v in strip_prefix(network_weights).items()}
    for key in [k for k in weights if k.startswith("encoder.")]:
        weights.setdefault("decoder." + key, weights[key])  # the decoder holds the encoder again
    if isinstance(architecture, str):
        plans = {"arch_class_name": architecture, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
    else:
        name = architecture["network_class_name"]
        short = next((s for s, full in SUPPORTED_CLASSES.items() if full == name), name)
        plans = {"arch_class_name": short, "arch_kwargs": dict(architecture["arch_kwargs"]),
                 "arch_kwargs_requiring_import": list(architecture.get("_kw_requires_import") or [])}
    resolved = resolve_architecture(plans, path)
    stem, in_proj = stem_keys(resolved)
    for a, b in (in_proj, in_proj[::-1]):  # the stem conv under both of its names
        for suffix in (".weight", ".bias"):
            if a + suffix in weights:
                weights.setdefault(b + suffix, weights[a + suffix])
    first = weights.get(in_proj[0] + ".weight")
    if first is None:
        raise FSEFTError(f"network_weights has no '{in_proj[0]}.weight' (the stem conv of "
                         f"{resolved['network_class_name'].split('.')[-1]}); pass the state dict of that network")
    checkpoint = {
        "network_weights": weights,
        "citations": [dict(c) for c in citations],
        PLAN_KEY: {
            "architecture_plans": plans,
            "pretrain_plan": {"configurations": {"pretrain": {
                "spacing": None if spacing is None else [float(s) for s in spacing],
                "spacing_style": "like_pretrained", "normalization_schemes": list(normalization_schemes),
                "use_mask_for_norm": [False] * len(normalization_schemes),
                "patch_size": [int(p) for p in patch_size]}}},
            "pretrain_num_input_channels": int(first.shape[1]),
            "recommended_downstream_patchsize": [int(p) for p in patch_size],
            "key_to_encoder": "encoder.stages", "key_to_stem": stem, "keys_to_in_proj": list(in_proj),
            "key_to_lpe": None,
        },
    }
    path = Path(path)
    if path.exists():
        raise FSEFTError(f"{path} exists; choose another file name or remove it first")
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return path
