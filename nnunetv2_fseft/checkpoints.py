"""Foundations in, adapter files out.

- `apply_foundation` puts a foundation (read by foundations.read_foundation, whatever its source) into an adapted
  network: checks the architecture first (one clear line naming the first mismatching key and the right fix),
  maps the input channels when the target has other ones, starts each target class's head channel from the
  foundation's channel of the same name, and for an encoder-only foundation starts decoder and heads fresh.
- Adapter files hold only the trained tensors (safetensors, no pickle) plus the method's config (JSON).
- Every file is written to a temporary name and renamed, so an interrupted write never leaves half a file.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import FSEFTError
from .files import atomic_write, write_json
from .foundations import Foundation, read_foundation
from .names import foreground_label_names, normalize_class_name
from .peft import foundation_key, trainable_state
from .peft.tree import CONV_TYPES, TRANSPOSED_CONV_TYPES, head_modules, is_adapter_key

HEAD_KEY = ".seg_layers."
ENCODER_ALIAS = "decoder.encoder."  # dynamic-network-architectures' decoder holds the encoder again
FIX_PLANS = ("prepare the target with the foundation's plans: "
             "nnUNetv2_fseft_prepare_target -d TARGET -m FOUNDATION (model folder or checkpoint)")
HE_SLOPE = 1e-2  # nnU-Net's InitWeights_He
# a head channel's starting probability for a class it has not learned (the bias of a new class, or of a sigmoid
# head): the prior initialisation of Lin et al., "Focal Loss for Dense Object Detection" (2017), for outputs that are
# mostly background. At 0.5 a small organ is learned late or not at all (docs/results.md)
NEW_CLASS_PRIOR = 0.01


def prior_logit(p: float = NEW_CLASS_PRIOR) -> float:
    """The bias at which a sigmoid (or a softmax channel beside a zero background) starts at probability p."""
    return math.log(p / (1 - p))


@dataclass
class LoadReport:
    """What apply_foundation did: log lines, the input-channel rule that applied (None: channels as they are) and
    whether the stem's first convolution therefore trains."""
    lines: list = field(default_factory=list)
    channel_rule: str = None
    stem_trains: bool = False


def input_projection(network: torch.nn.Module):
    """The first convolution the input meets (the stem's), never an adapter's own layer."""
    for name, module in network.encoder.named_modules():
        if type(module) in CONV_TYPES and not is_adapter_key(name):
            return module
    raise FSEFTError("the network's encoder has no convolution; it is not a U-Net this plugin adapts")


def train_input_projection(network: torch.nn.Module) -> None:
    """The documented exception to the frozen encoder: a stem whose input channels were mapped trains."""
    for p in input_projection(network).parameters():
        p.requires_grad_(True)


def _projection_keys(network: torch.nn.Module) -> set:
    """Plain-network keys of the first convolution's weight, every alias included."""
    first = input_projection(network)
    return {foundation_key(f"{name}.weight") for name, m in network.named_modules(remove_duplicate=False) if m is first}


def _source_key(fkey: str, foundation: Foundation):
    """The foundation key that feeds `fkey`, or None when that tensor starts fresh (an encoder-only foundation's
    decoder and heads; every foundation's heads are mapped separately)."""
    if HEAD_KEY in fkey:
        return None
    if foundation.parts == "encoder":
        if fkey.startswith(ENCODER_ALIAS):
            fkey = fkey[len("decoder."):]
        return fkey if fkey.startswith("encoder.") else None
    return fkey


def _rank_mismatch(fkey, got, want, foundation: Foundation) -> FSEFTError:
    f_dims, t_dims = len(got) - 2, len(want) - 2
    trained_as = f" (trained as '{foundation.configuration}')" if foundation.configuration else ""
    return FSEFTError(f"foundation {foundation.path} is a {f_dims}d network{trained_as} but this configuration builds "
                      f"a {t_dims}d one ('{fkey}' is {got} there, {want} here): adapt with a {f_dims}d configuration "
                      f"(nnUNetv2_train TARGET {foundation.configuration or '3d_fullres'} FOLD -tr ...) or from a "
                      f"{t_dims}d foundation; preparing the target again does not change this")


def _check_architecture(state: dict, foundation: Foundation, projection: set, target_channels: int) -> None:
    path, pretrained = foundation.path, foundation.weights
    for key, tensor in state.items():
        fkey = foundation_key(key)
        source = None if fkey is None else _source_key(fkey, foundation)
        if source is None:
            continue
        if source not in pretrained:
            raise FSEFTError(f"foundation {path} does not match this network: it has no '{source}'; {FIX_PLANS}")
        got, want = tuple(pretrained[source].shape), tuple(tensor.shape)
        if got == want:
            continue
        if len(got) != len(want):
            raise _rank_mismatch(source, got, want, foundation)
        if fkey in projection and got[0] == want[0] and got[2:] == want[2:]:
            if want[1] > target_channels > 0:
                raise FSEFTError(
                    f"this network takes {want[1]} inputs: the target's {target_channels} image channel(s) + "
                    f"{want[1] - target_channels} of the previous stage's segmentation (a cascade stage), which "
                    f"foundation {path} ({got[1]} input channel(s)) has no weights for: adapt 3d_fullres or "
                    "3d_lowres instead, or the cascade from a foundation trained as a cascade stage with the same "
                    "classes")
            continue  # another channel count: map_input_channels decides
        raise FSEFTError(f"foundation {path} does not match this network: '{source}' is {got} in the "
                         f"foundation but {want} here; {FIX_PLANS}")


def _names(channel_names) -> list:
    return [str(v) for _, v in sorted((channel_names or {}).items(), key=lambda kv: int(kv[0]))]


def map_input_channels(weight: torch.Tensor, foundation: Foundation, target_json: dict, target_channels: int,
                       source: str) -> tuple:
    """The foundation's first-conv weight for the target's channels, and the rule used (None: as it is).
    Channels whose names match map by name (case-insensitive); a 1-channel foundation's stem is repeated over the
    target's C channels and divided by C (nnssl's rule: a constant input over channels gives the same activation)."""
    f_names, t_names = _names(foundation.channel_names), _names(target_json.get("channel_names"))
    f_count = weight.shape[1]
    f_index = {n.casefold(): i for i, n in enumerate(f_names)}
    by_name = len(f_names) == f_count and len(t_names) == target_channels and \
        all(n.casefold() in f_index for n in t_names)
    if f_count == target_channels and (not by_name or [f_index[n.casefold()] for n in t_names] == list(range(f_count))):
        return weight, None
    if by_name:
        order = [f_index[n.casefold()] for n in t_names]
        pairs = ", ".join(f"'{t}' <- '{f_names[i]}'" for t, i in zip(t_names, order))
        return weight[:, order].clone(), f"input channels mapped by name ({pairs})"
    if f_count == 1:
        listed = ", ".join(f"'{n}'" for n in t_names) if t_names else f"{target_channels} channels"
        return (weight.repeat(1, target_channels, *[1] * (weight.ndim - 2)) / target_channels,
                f"input channels: the foundation's one channel repeated over the target's {target_channels} "
                f"({listed}) and divided by {target_channels} (nnssl's rule)")
    want = (weight.shape[0], target_channels, *weight.shape[2:])
    raise FSEFTError(f"foundation {foundation.path} does not match this network: '{source}' is "
                     f"{tuple(weight.shape)} in the foundation but {want} here (input channels: foundation {f_count}, "
                     f"target {target_channels}); prepare the target with the foundation's channel names (foundation: "
                     f"{f_names or 'not named'}, target: {t_names or 'not named'}) in dataset.json channel_names "
                     "(case does not matter), or adapt from a 1-channel foundation (repeated over the channels)")


def is_head_key(adapted_key: str) -> bool:
    """A segmentation head's own weight or bias (not an adapter injected into the head)."""
    return HEAD_KEY in (foundation_key(adapted_key) or "")


def channel_names(dataset_json: dict, n_channels: int):
    """Names of a head's output channels: softmax heads have background first, sigmoid heads do not."""
    names = [normalize_class_name(n) for n in foreground_label_names(dataset_json)]
    if n_channels == len(names) + 1:
        return ["background"] + names, True
    if n_channels == len(names):
        return names, False
    return None, None


def map_heads(adapted: dict, pretrained: dict, target_json: dict, foundation_json: dict) -> list:
    """Copy head channels of same-named classes from the foundation; the rest start fresh (start_fresh). Returns
    lines for the log."""
    head_keys = [k for k in adapted if is_head_key(k)]
    if not head_keys:
        return ["head: the network has no segmentation head to map"]
    example = next(k for k in head_keys if k.endswith("weight"))
    t_names, t_softmax = channel_names(target_json, adapted[example].shape[0])
    if t_names is None:
        start_fresh(adapted, head_keys, None, None)
        return ["head: channel layout not recognised; all target classes start fresh (zero)"]
    background = 0 if t_softmax else None
    source = pretrained.get(foundation_key(example))
    f_names, f_softmax = (None, None) if foundation_json is None or source is None else \
        channel_names(foundation_json, source.shape[0])
    if f_names is None:
        start_fresh(adapted, head_keys, range(len(t_names)), background)
        reason = "names no classes" if foundation_json is None or source is None else \
            "has a channel layout not recognised"
        return [f"head: the foundation {reason}; all target classes start fresh (p = {NEW_CLASS_PRIOR})"]
    pairs = [(ti, f_names.index(n)) for ti, n in enumerate(t_names) if n != "background" and n in f_names]
    if pairs and t_softmax and f_softmax:
        pairs.append((0, 0))
    for key in head_keys:
        src = pretrained[foundation_key(key)]
        for ti, fi in pairs:
            adapted[key][ti] = src[fi]
    # a sigmoid foundation's classes in a softmax target: background logit 0 makes softmax([0, z]) == sigmoid(z)
    start_fresh(adapted, head_keys, [ti for ti in range(len(t_names)) if ti not in dict(pairs)], background)
    mapped = {t_names[ti] for ti, _ in pairs} - {"background"}
    fresh = [n for n in t_names if n not in mapped and n != "background"]
    lines = [f"head: target '{t_names[ti]}' <- foundation channel {fi} ('{f_names[fi]}')"
             for ti, fi in pairs if t_names[ti] != "background"]
    if fresh:
        lines.append(f"head: new classes start fresh: {', '.join(fresh)} (p = {NEW_CLASS_PRIOR})")
    return lines


def start_fresh(adapted: dict, head_keys: list, channels, background) -> None:
    """Unmapped head channels (all when `channels` is None) start with zero weights, so that the first steps depend
    on no random draw (a random new head can start a seed far from the others and never recover at a few-shot
    budget), and a new class's bias at logit(NEW_CLASS_PRIOR) beside a zero background (docs/results.md, "A new
    class's head start"). Zero weights grow by about the learning rate per Adam step, so every FSEFT trainer
    trains its head at head_learning_rate. With `channels` None the layout is unknown: everything starts at zero."""
    prior = prior_logit()
    for key in head_keys:
        if channels is None:
            adapted[key][:] = 0
            continue
        for c in channels:
            adapted[key][c] = prior if key.endswith("bias") and c != background else 0


def weights_sha256(path) -> str:
    """sha256 over the foundation file's network weights' names, dtypes, shapes and bytes, in order. Unlike the
    file's sha256 it ignores the log and optimizer state, so two runs with bitwise-equal weights share it."""
    return read_foundation(path).weights_sha256


def _redraw_fresh_decoder(network: torch.nn.Module, seed: str) -> None:
    """An encoder-only foundation's decoder starts fresh. Its convolutions are drawn as nnU-Net's InitWeights_He
    draws them, from a generator seeded by the foundation's digest: a method that keeps them frozen (opt-in) then
    gets the same decoder again when `--apply` rebuilds the model from the adapter file."""
    generator = torch.Generator().manual_seed(int(seed[:15], 16) if seed else 0)
    heads = {id(m) for h in head_modules(network) for m in h.modules()}
    gain = math.sqrt(2.0 / (1 + HE_SLOPE ** 2))
    with torch.no_grad():
        for name, module in network.named_modules():
            if not name.startswith("decoder.") or name.startswith("decoder.encoder") or is_adapter_key(name) or \
                    id(module) in heads or type(module) not in CONV_TYPES + TRANSPOSED_CONV_TYPES:
                continue
            fan_in = torch.nn.init._calculate_fan_in_and_fan_out(module.weight)[0]
            draw = torch.randn(module.weight.shape, generator=generator) * (gain / math.sqrt(fan_in))
            module.weight.copy_(draw.to(module.weight.device, module.weight.dtype))
            if module.bias is not None:
                module.bias.zero_()


def _count(state: dict, loaded: set, prefix: str) -> tuple:
    """(loaded, total) plain-network tensors under `prefix`, the decoder's alias of the encoder not counted."""
    keys = {foundation_key(k) for k in state}
    keys = {k for k in keys if k is not None and k.startswith(prefix) and not k.startswith(ENCODER_ALIAS)}
    return len(keys & loaded), len(keys)


def _citation_lines(citations: list) -> list:
    lines = []
    for c in citations:
        if not isinstance(c, dict):
            lines.append(f"cite: {c}")
            continue
        text = c.get("apa_citations") or c.get("bibtex_citations") or ""
        text = " ".join(text) if isinstance(text, (list, tuple)) else str(text)
        lines.append(f"cite ({c.get('type', 'work')}) {c.get('name', '')}: {' '.join(text.split())}".rstrip(": "))
    return lines


def apply_foundation(network: torch.nn.Module, foundation: Foundation, target_json: dict) -> LoadReport:
    """Put `foundation` into `network` (adapted or plain); see the module docstring."""
    report = LoadReport([f"foundation: {foundation.describe()}"])
    if foundation.parts == "encoder":
        _redraw_fresh_decoder(network, foundation.weights_sha256)
    state = network.state_dict()
    projection = _projection_keys(network)
    target_channels = len(target_json.get("channel_names") or {})
    _check_architecture(state, foundation, projection, target_channels)
    loaded, mapped = set(), {}
    for key in state:
        fkey = foundation_key(key)
        source = None if fkey is None else _source_key(fkey, foundation)
        if source is None:
            continue
        value = foundation.weights[source]
        if fkey in projection:
            if source not in mapped:
                mapped[source] = map_input_channels(value, foundation, target_json, state[key].shape[1], source)
            value, rule = mapped[source]
            report.channel_rule = report.channel_rule or rule
        state[key] = value.to(state[key].dtype)
        loaded.add(fkey[len("decoder."):] if fkey.startswith(ENCODER_ALIAS) else fkey)
    heads = map_heads(state, foundation.weights, target_json, foundation.dataset_json)
    network.load_state_dict(state)
    if report.channel_rule:
        train_input_projection(network)
        report.stem_trains = True
        report.lines.append(f"{report.channel_rule}; the stem's first convolution trains (exception to the frozen "
                            "encoder)")
    encoder, decoder = _count(state, loaded, "encoder."), _count(state, loaded, "decoder.")
    head_tensors = len({foundation_key(k) for k in state if is_head_key(k)})
    adapters = len({id(v) for k, v in network.state_dict(keep_vars=True).items() if foundation_key(k) is None})
    decoder_own = decoder[1] - head_tensors
    fresh = f"decoder {decoder_own} tensors new" if foundation.parts == "encoder" else \
        f"decoder {decoder[0]} of {decoder_own} tensors loaded"
    report.lines.append(f"foundation weights: encoder {encoder[0]} of {encoder[1]} tensors loaded (stem included); "
                        f"{fresh}; heads {head_tensors} tensors (by class name, below); {adapters} adapter tensors new")
    report.lines += heads + _citation_lines(foundation.citations)
    return report


def save_adapter(network: torch.nn.Module, folder, config: dict) -> None:
    """adapter.safetensors (trained tensors only) + adapter.json (method, options, provenance)."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(network).items()}
    atomic_write(folder / "adapter.safetensors", lambda tmp: save_file(tensors, tmp))
    write_json(folder / "adapter.json", config)


def read_adapter(folder) -> tuple:
    """(config, tensors) from an adapter folder; never unpickles anything."""
    folder = Path(folder)
    cfg_file, tensor_file = folder / "adapter.json", folder / "adapter.safetensors"
    if not cfg_file.is_file() or not tensor_file.is_file():
        raise FSEFTError(f"{folder} holds no adapter (adapter.json + adapter.safetensors); "
                         "pass a fold folder written by an FSEFT trainer or by nnUNetv2_fseft_export")
    try:
        config = json.loads(cfg_file.read_text())
        tensors = load_file(str(tensor_file))
    except Exception as e:
        raise FSEFTError(f"{folder}: adapter files are not valid JSON/safetensors ({type(e).__name__}); "
                         "they may be corrupt or of another kind: re-export them") from None
    return config, tensors


def load_adapter_tensors(network: torch.nn.Module, tensors: dict, source) -> None:
    """Put an adapter's tensors into a network already adapted with the same method."""
    expected = trainable_state(network)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        key = (missing or unexpected)[0]
        raise FSEFTError(f"adapter {source} does not fit this method/network ("
                         f"{'missing' if missing else 'unexpected'} tensor '{key}'); use the foundation and "
                         "plans the adapter was trained with")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise FSEFTError(f"adapter {source} does not fit this network: '{key}' is {tuple(value.shape)} "
                             f"in the adapter but {tuple(expected[key].shape)} here; use the plans it was trained with")
    with torch.no_grad():
        params = dict(network.named_parameters())
        for key, value in tensors.items():
            params[key].copy_(value)
