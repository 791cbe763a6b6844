"""Foundation checkpoints in, adapter files out.

- `load_foundation` puts a foundation's weights into an adapted network: checks the architecture first
  (one clear line naming the first mismatching key), maps CUDA tensors to the CPU, and starts each target
  class's head channel from the foundation's channel of the same name.
- Adapter files hold only the trained tensors (safetensors, no pickle) plus the method's config (JSON).
- Every file is written to a temporary name and renamed, so an interrupted write never leaves half a file.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import FSEFTError
from .names import foreground_label_names, normalize_class_name
from .peft import foundation_key, trainable_state

HEAD_KEY = ".seg_layers."
FIX_PLANS = ("prepare the target with the foundation's plans: "
             "nnUNetv2_fseft_prepare_target -d TARGET -m FOUNDATION_MODEL_FOLDER")


def atomic_write(path, write) -> None:
    """Call write(tmp_path) then rename onto `path` (atomic on POSIX)."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_foundation(path) -> dict:
    """Load an nnU-Net checkpoint on the CPU whatever device saved it. nnU-Net checkpoints are pickles:
    only load ones you trust (adapter files, in contrast, never execute code)."""
    path = Path(path)
    if not path.is_file():
        raise FSEFTError(f"foundation checkpoint {path} does not exist; pass the foundation's "
                         "fold_X/checkpoint_final.pth with -pretrained_weights")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # any unreadable file: say which and why, not a traceback
        raise FSEFTError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:120]}); "
                         "pass a checkpoint_final.pth written by nnUNetv2_train") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise FSEFTError(f"{path} is not an nnU-Net checkpoint (no 'network_weights'); "
                         "pass a checkpoint_final.pth written by nnUNetv2_train")
    return checkpoint


def _check_architecture(adapted: dict, pretrained: dict, path) -> None:
    for key, tensor in adapted.items():
        fkey = foundation_key(key)
        if fkey is None or HEAD_KEY in fkey:
            continue
        if fkey not in pretrained:
            raise FSEFTError(f"foundation {path} does not match this network: it has no '{fkey}'; {FIX_PLANS}")
        if pretrained[fkey].shape != tensor.shape:
            got, want = tuple(pretrained[fkey].shape), tuple(tensor.shape)
            hint = ""
            if tensor.ndim > 2 and got[0] == want[0] and got[1] != want[1] and key.startswith("encoder") and \
                    fkey.endswith(".weight") and list(pretrained).index(fkey) < 4:
                hint = f" (input channels: foundation {got[1]}, target {want[1]})"
            raise FSEFTError(f"foundation {path} does not match this network: '{fkey}' is {got} in the "
                             f"foundation but {want} here{hint}; {FIX_PLANS}")


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
    """Copy head channels of same-named classes from the foundation and zero the rest; returns lines for the log."""
    head_keys = [k for k in adapted if is_head_key(k)]
    if not head_keys or foundation_json is None:
        zero_channels(adapted, head_keys, None)
        return ["head: the foundation names no classes; all target classes start fresh (zero)"]
    example = next(k for k in head_keys if k.endswith("weight"))
    t_names, t_softmax = channel_names(target_json, adapted[example].shape[0])
    f_names, f_softmax = channel_names(foundation_json, pretrained[foundation_key(example)].shape[0])
    if t_names is None or f_names is None:
        zero_channels(adapted, head_keys, None)
        return ["head: channel layout not recognised; all target classes start fresh (zero)"]
    pairs = [(ti, f_names.index(n)) for ti, n in enumerate(t_names) if n != "background" and n in f_names]
    if pairs and t_softmax and f_softmax:
        pairs.append((0, 0))
    for key in head_keys:
        src = pretrained[foundation_key(key)]
        for ti, fi in pairs:
            adapted[key][ti] = src[fi]
    # a sigmoid foundation's classes in a softmax target: background logit 0 makes softmax([0, z]) == sigmoid(z)
    zero_channels(adapted, head_keys, [ti for ti in range(len(t_names)) if ti not in dict(pairs)])
    mapped = {t_names[ti] for ti, _ in pairs} - {"background"}
    fresh = [n for n in t_names if n not in mapped and n != "background"]
    lines = [f"head: target '{t_names[ti]}' <- foundation channel {fi} ('{f_names[fi]}')"
             for ti, fi in pairs if t_names[ti] != "background"]
    if fresh:
        lines.append(f"head: new classes start fresh: {', '.join(fresh)} (zero)")
    return lines


def zero_channels(adapted: dict, head_keys: list, channels) -> None:
    """Unmapped head channels (all when `channels` is None) start at zero weight and bias, so every voxel starts
    at the same uncommitted output and the first steps depend on no random draw. nnU-Net's He initialisation of a
    new head made the support loss of one seed start at 4 instead of 0.6 (K=1, novel class); full fine-tuning
    at AdamW 1e-4 never recovered in 1,000 iterations. A zero head grows by about the learning rate per Adam step,
    so every FSEFT trainer trains its head at head_learning_rate (docs/hippocampus.md, "The head learning rate")."""
    for key in head_keys:
        adapted[key][slice(None) if channels is None else channels] = 0


def foundation_weights(checkpoint: dict) -> dict:
    """The checkpoint's network weights without DDP's 'module.' prefix."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in checkpoint["network_weights"].items()}


def weights_sha256(path) -> str:
    """sha256 over the network weights' names, dtypes, shapes and bytes, in order. Unlike the file's sha256 it
    ignores the log and optimizer state, so two runs with bitwise-equal weights share it."""
    return weights_digest(read_foundation(path))


def weights_digest(checkpoint: dict) -> str:
    """weights_sha256 for a checkpoint already read (by read_foundation)."""
    h = hashlib.sha256()
    for name, tensor in foundation_weights(checkpoint).items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_foundation(network: torch.nn.Module, path, target_json: dict) -> list:
    """Load foundation weights into an (adapted) network. Returns log lines."""
    return apply_foundation(network, read_foundation(path), path, target_json)


def apply_foundation(network: torch.nn.Module, checkpoint: dict, path, target_json: dict) -> list:
    """load_foundation for a checkpoint already read (by read_foundation)."""
    pretrained = foundation_weights(checkpoint)
    state = network.state_dict()
    _check_architecture(state, pretrained, path)
    for key in state:
        fkey = foundation_key(key)
        if fkey is not None and HEAD_KEY not in fkey:
            state[key] = pretrained[fkey].to(state[key].dtype)
    foundation_json = checkpoint.get("init_args", {}).get("dataset_json")
    lines = map_heads(state, pretrained, target_json, foundation_json)
    network.load_state_dict(state)
    return [f"foundation loaded from {path}"] + lines


def save_adapter(network: torch.nn.Module, folder, config: dict) -> None:
    """adapter.safetensors (trained tensors only) + adapter.json (method, options, provenance)."""
    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in trainable_state(network).items()}
    atomic_write(folder / "adapter.safetensors", lambda tmp: save_file(tensors, tmp))
    atomic_write(folder / "adapter.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))


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
