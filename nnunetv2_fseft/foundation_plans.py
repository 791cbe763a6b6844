"""The 3d_fullres configuration for a target adapted from a network whose topology is fixed by its weights.

nnU-Net's planner chooses a topology for a patch; a pre-trained network's topology is given, so here the patch
is chosen for the topology instead: a multiple of the network's total stride on every axis, no larger than the
data needs (the median image rounded up to that stride), and within the memory target by nnU-Net's own
estimate (compute_conv_feature_map_size against its planners' reference values), reduced one stride at a time
on the axis that is largest relative to the data, as nnU-Net's planner does.
"""
import copy
import math

from .errors import FSEFTError

# nnU-Net's reference values (feature-map voxels that fit its reference GB at batch 2): ExperimentPlanner for
# PlainConvUNet, nnUNetPlannerResEncM for ResidualEncoderUNet
_REFERENCE = {"ResidualEncoderUNet": (680_000_000, 8), "PlainConvUNet": (560_000_000, 8)}
_REFERENCE_BATCH = 2
CPU_PATCH_EDGE = 64  # --cpu: at most this many voxels per axis (rounded down to the stride), batch 2
BATCH_SIZE = 2  # as nnssl's and nnU-Net's fine-tuning of pre-trained networks


def total_stride(arch_kwargs: dict, ndim: int) -> list:
    """Product of the per-stage strides on each axis: every patch edge must be a multiple of it."""
    total = [1] * ndim
    for stride in arch_kwargs["strides"]:
        per_axis = [stride] * ndim if isinstance(stride, int) else list(stride)
        total = [t * int(s) for t, s in zip(total, per_axis)]
    return total


def round_up(shape, stride) -> list:
    return [max(s, math.ceil(m / s) * s) for m, s in zip(shape, stride)]


def check_patch(patch, stride) -> list:
    """A user's --patch-size: one line naming the axis and a valid size when it does not fit the network."""
    if len(patch) != len(stride):
        raise FSEFTError(f"--patch-size has {len(patch)} values but the network is {len(stride)}-D; "
                         f"pass {len(stride)} values, e.g. {' '.join(map(str, stride))}")
    for axis, (p, s) in enumerate(zip(patch, stride)):
        if p <= 0 or p % s:
            raise FSEFTError(f"--patch-size {' '.join(map(str, patch))}: axis {axis} ({p}) is not a multiple of the "
                             f"network's total stride {s}; use e.g. {max(s, round(p / s) * s)}")
    return [int(p) for p in patch]


class MemoryEstimate:
    """nnU-Net's VRAM estimate for one network at several patch sizes (the network is built once)."""

    def __init__(self, architecture: dict, in_channels: int, out_channels: int, gpu_memory_gb: float):
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        name = architecture["network_class_name"].rsplit(".", 1)[-1]
        reference, reference_gb = _REFERENCE.get(name, _REFERENCE["PlainConvUNet"])
        self.limit = reference * gpu_memory_gb / reference_gb
        import torch
        with torch.device("meta"):  # shapes only: a ResEnc-L allocates nothing
            self.network = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                                  architecture["_kw_requires_import"], in_channels, out_channels,
                                                  allow_init=False)

    def fits(self, patch, batch_size: int) -> bool:
        estimate = float(self.network.compute_conv_feature_map_size(list(patch)))
        return estimate / _REFERENCE_BATCH * batch_size <= self.limit


def fit_patch(median_shape, stride, fits, cap=None) -> list:
    """The largest stride-multiple patch up to the median shape (and `cap`) for which fits(patch) holds."""
    patch = round_up(median_shape, stride)
    if cap is not None:
        patch = [min(p, max(s, c // s * s)) for p, s, c in zip(patch, stride, cap)]
    while not fits(patch):
        shrinkable = [a for a in range(len(patch)) if patch[a] > stride[a]]
        if not shrinkable:
            raise FSEFTError(f"even the smallest patch {patch} (one network stride per axis) does not fit the memory "
                             "target; raise -gpu_memory_target or pass --cpu for a CPU-size run")
        axis = max(shrinkable, key=lambda a: patch[a] / median_shape[a])
        patch[axis] -= stride[axis]
    return patch


def foundation_configuration(config: dict, architecture: dict, preprocessing: dict, n_channels: int,
                             patch_size: list) -> dict:
    """nnU-Net's planned 3d_fullres with the foundation's network and normalization, the given patch, batch 2."""
    config = copy.deepcopy(config)
    config["architecture"] = copy.deepcopy(architecture)
    schemes, masks = preprocessing.get("normalization_schemes"), preprocessing.get("use_mask_for_norm")
    if schemes:
        # a 1-channel foundation's scheme applies to every target channel (its stem is repeated over them)
        config["normalization_schemes"] = list(schemes) if len(schemes) == n_channels else [schemes[0]] * n_channels
        masks = list(masks or [False])
        config["use_mask_for_norm"] = masks if len(masks) == n_channels else [masks[0]] * n_channels
    config["patch_size"] = list(patch_size)
    config["batch_size"] = BATCH_SIZE
    return config


def channel_rule(foundation, target_json: dict):
    """None when the loader takes the stem as it is, else the line saying how it maps the input channels (the same
    decision the loader makes: checkpoints.map_input_channels), or FSEFTError when no rule maps them."""
    import torch
    from .checkpoints import map_input_channels
    n_target, n_found = len(target_json["channel_names"]), foundation.num_input_channels
    try:
        _, rule = map_input_channels(torch.zeros(1, n_found, 1), foundation, target_json, n_target, "stem")
    except FSEFTError:
        raise FSEFTError(f"the target has {n_target} input channel(s) ({_listed(target_json['channel_names'])}) and "
                         f"the foundation {n_found} ({_listed(foundation.channel_names)}), and no rule maps them: name "
                         "the target's channels as the foundation's in its dataset.json channel_names (case does not "
                         "matter), or adapt from a 1-channel foundation") from None
    if rule is None:
        return None
    return (f"channels differ (target {n_target}: {_listed(target_json['channel_names'])}; foundation {n_found}: "
            f"{_listed(foundation.channel_names)}): {rule}; the stem trains in every method")


def _listed(channel_names) -> str:
    if not channel_names:
        return "not named"
    return ", ".join(str(v) for _, v in sorted(channel_names.items(), key=lambda kv: int(kv[0])))


def channel_sources(foundation, target_json: dict):
    """(for each target channel the foundation channel the loader takes its stem weights from, repeated) or None
    when the channels are taken as they are; repeated: a 1-channel foundation's stem over C channels."""
    import torch
    from .checkpoints import map_input_channels
    n_target, n_found = len(target_json["channel_names"]), foundation.num_input_channels
    index = torch.arange(1, n_found + 1, dtype=torch.float64).reshape(1, n_found, 1)
    mapped, rule = map_input_channels(index, foundation, target_json, n_target, "stem")
    if rule is None:
        return None
    values = mapped.reshape(-1).tolist()
    if all(float(v).is_integer() for v in values):
        return [int(v) - 1 for v in values], False  # by name
    return [0] * n_target, True  # repeated and divided by C


def remap_channels(plans: dict, sources: list, target_properties: dict, repeated: bool) -> None:
    """Per-channel normalization follows the stem: a channel mapped by name is normalized as the foundation's
    channel of that name (scheme and intensity statistics: the CT window the network saw); a repeated 1-channel
    foundation's scheme applies to every channel, with the target's own statistics (another modality's)."""
    for config in plans["configurations"].values():
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key in config:
                config[key] = [config[key][i] for i in sources]
    found = plans.get("foreground_intensity_properties_per_channel") or {}
    plans["foreground_intensity_properties_per_channel"] = dict(target_properties) if repeated else \
        {str(t): found.get(str(f), target_properties.get(str(t))) for t, f in enumerate(sources)}
