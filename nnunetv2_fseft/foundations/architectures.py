"""The network architectures a foundation may name, resolved to nnU-Net plans style, and the check that a
foundation's weights fit the topology it names."""
import pydoc

import torch

from ..errors import FSEFTError

DNA_UNET = "dynamic_network_architectures.architectures.unet."
SUPPORTED_CLASSES = {"ResidualEncoderUNet": DNA_UNET + "ResidualEncoderUNet", "PlainConvUNet": DNA_UNET + "PlainConvUNet"}
REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]

# nnssl's fixed name "ResEncL" (no kwargs): the topology nnU-Net's ResEnc L plans give, isotropic.
RESENC_L = {
    "network_class_name": SUPPORTED_CLASSES["ResidualEncoderUNet"],
    "arch_kwargs": {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 6,
        "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5, "n_blocks_per_stage": [1, 3, 4, 6, 6, 6],
        "n_conv_per_stage_decoder": [1, 1, 1, 1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": list(REQUIRES_IMPORT),
}
# nnssl's "NoSkipResEncL" (nnssl.architectures.get_network_by_name: ResidualEncoderUNet_noskip, for PCRLv2-style
# pre-training) has exactly ResEnc L's encoder and only a decoder without skip connections; only the encoder is
# loaded (the decoder starts fresh for every nnssl foundation), so it reads as ResEnc L.
FIXED_NAMES = {"ResEncL": RESENC_L, "NoSkipResEncL": RESENC_L}
SUPPORTED_TEXT = ("supported: 'ResEncL' or 'NoSkipResEncL' (fixed names; the encoder of both is ResEnc L's) or a "
                  "dynamic-network-architectures ResidualEncoderUNet / PlainConvUNet with arch_kwargs")


def resolve_architecture(plan: dict, path) -> dict:
    """nnssl's architecture_plans -> nnU-Net plans style {network_class_name, arch_kwargs, _kw_requires_import}."""
    name = plan.get("arch_class_name") if isinstance(plan, dict) else None
    kwargs = plan.get("arch_kwargs") if isinstance(plan, dict) else None
    if not isinstance(name, str) or not name:
        raise FSEFTError(f"{path}: the adaptation plan names no architecture (architecture_plans.arch_class_name); "
                         "the checkpoint is incomplete: get it again from its source")
    short = name.split(".")[-1]
    if short.lower().startswith("primus"):
        raise FSEFTError(f"{path}: architecture '{name}' is a Primus vision transformer, out of scope here (the "
                         f"plugin adapts convolutional U-Nets); {SUPPORTED_TEXT}")
    if name in FIXED_NAMES and not kwargs:
        return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                for k, v in FIXED_NAMES[name].items()}
    if name in FIXED_NAMES:  # a fixed name with explicit kwargs: the kwargs win (smaller variants, tests)
        class_name = FIXED_NAMES[name]["network_class_name"]
    elif name in SUPPORTED_CLASSES:
        class_name = SUPPORTED_CLASSES[name]
    elif name in SUPPORTED_CLASSES.values():
        class_name = name
    else:
        raise FSEFTError(f"{path}: architecture '{name}' is not one the plugin builds; {SUPPORTED_TEXT}")
    if not isinstance(kwargs, dict):
        raise FSEFTError(f"{path}: architecture '{name}' comes without arch_kwargs, so its topology is unknown; "
                         f"{SUPPORTED_TEXT}")
    requires = plan.get("arch_kwargs_requiring_import") or [k for k in REQUIRES_IMPORT if k in kwargs]
    return {"network_class_name": class_name, "arch_kwargs": dict(kwargs), "_kw_requires_import": list(requires)}


def build_network(architecture: dict, input_channels: int, output_channels: int, meta: bool = False):
    """The plain network the architecture describes (nnU-Net's own builder). meta=True: shapes only, no memory."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    for key in architecture["_kw_requires_import"]:
        value = architecture["arch_kwargs"].get(key)
        if value is not None and pydoc.locate(value) is None:
            raise FSEFTError(f"architecture kwarg {key}={value!r} names nothing importable; use dotted names such "
                             "as torch.nn.modules.conv.Conv3d")
    try:
        with torch.device("meta") if meta else torch.device("cpu"):
            return get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                          architecture["_kw_requires_import"], input_channels, output_channels,
                                          allow_init=not meta, deep_supervision=False)
    except (TypeError, ValueError, AssertionError, IndexError) as e:
        raise FSEFTError(f"architecture {architecture['network_class_name'].split('.')[-1]} cannot be built from its "
                         f"arch_kwargs ({type(e).__name__}: {str(e)[:150]}); fix the adaptation plan's arch_kwargs") from None


def check_weights(architecture: dict, weights: dict, input_channels: int, prefixes: tuple, path) -> None:
    """Refuse weights that do not fit the named topology, naming the first key that differs. Only keys under
    `prefixes` are compared (an encoder-only foundation's decoder is never used)."""
    network = build_network(architecture, input_channels, 1, meta=True)
    expected = {k: tuple(v.shape) for k, v in network.state_dict().items() if k.startswith(prefixes)}
    given = {k: tuple(v.shape) for k, v in weights.items() if k.startswith(prefixes)}
    for key, shape in expected.items():
        if key not in given:
            raise FSEFTError(f"{path}: the weights do not match the topology the adaptation plan names: no '{key}'; "
                             "the plan's arch_kwargs must describe the network the weights come from")
        if given[key] != shape:
            raise FSEFTError(f"{path}: the weights do not match the topology the adaptation plan names: '{key}' is "
                             f"{given[key]} in the weights but {shape} in the topology; the plan's arch_kwargs must "
                             "describe the network the weights come from")
    extra = [k for k in given if k not in expected]
    if extra:
        raise FSEFTError(f"{path}: the weights do not match the topology the adaptation plan names: '{extra[0]}' "
                         "has no place in it; the plan's arch_kwargs must describe the network the weights come from")
