"""The feature cache across `nnUNetv2_train ... --c` (docs/cost.md, "Resuming").

Whenever FSEFTTrainer writes an nnU-Net checkpoint while the cache is active, the cache's state goes next to it
as `<checkpoint stem>.feature_cache.pt`: the pool's samples (features and targets, as tensors, spilled ones
included), its counters (steps, trunk passes, oldest slot, the pool's RNG state) and what must match to reuse
it (checkpoint epoch, capacity, dtype, feature shape). It is written with atomic_write and read with
torch.load(weights_only=True): plain tensors, numbers and strings, no pickled code. A sidecar that is missing,
unreadable or does not match is ignored with one log line, and the pool is rebuilt as in a fresh run.
Sidecars are deleted once checkpoint_final.pth exists (--c never reads latest/best then).
"""
import os
import shutil
from pathlib import Path

import torch

from ..files import atomic_write
from .feature_cache import SPILL_PREFIX, FeatureCache, final_head

FORMAT = "nnunetv2_fseft.feature_cache/1"
SUFFIX = ".feature_cache.pt"


def sidecar_path(checkpoint) -> Path:
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(checkpoint.stem + SUFFIX)


def feature_shape(network: torch.nn.Module, patch_size) -> tuple:
    """Shape of one pooled feature sample: the final head's input channels x the patch."""
    head = final_head(network)
    return (getattr(head, "base_layer", head).in_channels, *patch_size)


def save_sidecar(cache, checkpoint, epoch: int) -> None:
    """Write the cache's state next to `checkpoint` (epoch: the checkpoint's 'current_epoch'), or delete a
    sidecar there when no cache is active, so that an old one never outlives its checkpoint."""
    path = sidecar_path(checkpoint)
    if cache is None:
        path.unlink(missing_ok=True)
        return
    previous = getattr(cache, "saved_to", None)
    if previous is not None and previous[0] == cache.steps and previous[1] != path and previous[1].is_file() \
            and _hard_link(previous[1], path):
        return
    state = dict(cache.state(), format=FORMAT, epoch=epoch)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    cache.saved_to = (cache.steps, path)


def _hard_link(source: Path, path: Path) -> bool:
    """checkpoint_latest and checkpoint_best of one epoch hold the same state: link it rather than write it twice.
    False where the file system cannot (the caller then writes a copy)."""
    try:
        atomic_write(path, lambda tmp: os.link(source, tmp))
        return True
    except OSError:
        return False


def remove_sidecars(folder) -> None:
    for path in Path(folder).glob(f"*{SUFFIX}"):
        path.unlink(missing_ok=True)


def _mismatch(state, cache: FeatureCache, epoch: int, shape: tuple):
    """Why `state` cannot be restored into `cache`, or None when it can."""
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return "not a feature-cache file of this plugin"
    if state["epoch"] != epoch:
        return f"written at epoch {state['epoch']}, the checkpoint is at epoch {epoch}"
    pool = cache.pool
    if state["capacity"] != pool.capacity:
        return f"pool capacity {state['capacity']} saved, {pool.capacity} now"
    if state["dtype"] != str(pool.dtype):
        return f"feature dtype {state['dtype']} saved, {pool.dtype} now"
    features, targets = state["features"], state["targets"]
    if len(features) != len(targets) or len(features) > pool.capacity or \
            not 0 <= state["oldest"] < pool.capacity:
        return "inconsistent pool"
    for f, t in zip(features, targets):
        if tuple(f.shape) != shape or str(f.dtype) != str(pool.dtype) or tuple(t.shape[1:]) != shape[1:]:
            return f"feature shape {tuple(f.shape)} saved, {shape} now"
    return None


def restore_sidecar(cache: FeatureCache, checkpoint, epoch: int, shape: tuple) -> str:
    """Restore `cache` from the sidecar of `checkpoint` when it fits; returns the log line saying what happened."""
    path = sidecar_path(checkpoint)
    folder = path.parent
    for stale in folder.glob(f"{SPILL_PREFIX}*"):  # spill folders of the interrupted run: their samples are in
        if stale.is_dir() and stale != cache.pool._spill_dir:  # the sidecar, or lost with the pool
            shutil.rmtree(stale, ignore_errors=True)
    if not path.is_file():
        return f"feature cache: no saved pool next to {Path(checkpoint).name}; rebuilding it"
    try:
        state = torch.load(path, weights_only=True, mmap=True)  # tensors stay on disk until restored one by one
        why = _mismatch(state, cache, epoch, shape)
    except Exception as e:  # truncated, foreign or malformed file: rebuild rather than stop the training
        why = f"unreadable or malformed: {type(e).__name__}"
    if why is not None:
        return f"feature cache: {path.name} not used ({why}); rebuilding the pool"
    cache.restore(state)
    return (f"feature cache: restored {len(cache.pool)} samples from {path.name} ({cache.steps} steps, "
            f"{cache.encoded_batches} trunk passes so far)")
