"""Feature cache for black-box methods (linear probe, spatial adapter): they only read the frozen network's
final decoder features, so the frozen trunk runs once per augmented support batch (under no_grad) and the
head trains on (features, target) pairs kept in a pool. See docs/cost.md.

Policy (FeatureCache.needs_fresh): while the pool is not full, every step encodes the fresh augmented batch
nnU-Net's dataloader gives and trains on it (exactly the uncached step). Once it is full, every
`refresh_every`-th step encodes a fresh batch, which replaces the oldest samples; the other steps train on
`batch_size` samples drawn at random from the pool, and nnU-Net's dataloader is not asked for a batch.
"""
import random
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..peft.tree import head_modules
from .optim_step import average_gradients, backward_and_step

SPILL_PREFIX = "fseft_feature_pool_"  # temporary folders of spilled pool samples


class _Stop(Exception):
    def __init__(self, features):
        super().__init__()
        self.features = features


def final_head(network: nn.Module) -> nn.Module:
    """The full-resolution segmentation head (with what a method wrapped around it)."""
    return head_modules(network)[-1]


def is_black_box(network: nn.Module) -> bool:
    """True when only the final head trains: then everything before it is a fixed feature extractor."""
    head = {id(p) for p in final_head(network).parameters()}
    trainable = [p for p in network.parameters() if p.requires_grad]
    return bool(trainable) and all(id(p) in head for p in trainable)


def trunk_features(network: nn.Module, data: torch.Tensor) -> torch.Tensor:
    """The input of the final head: the network's final decoder features. Runs the network under no_grad and
    stops before the head (a pre-hook on it raises), so neither the head nor a graph is computed.

    The frozen trunk runs in eval mode, as it will at inference: BatchNorm uses and keeps its running statistics
    (in train mode it would update them, and under DDP nnU-Net's SyncBatchNorm would issue a collective that the
    other ranks, filling their pools at other steps, never join: a hang). nnU-Net's InstanceNorm and a network
    without dropout give the same features in both modes."""
    def stop(module, args):
        raise _Stop(args[0])

    handle = final_head(network).register_forward_pre_hook(stop)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            network(data)
    except _Stop as s:
        return s.features
    finally:
        handle.remove()
        network.train(was_training)
    raise RuntimeError("the network's forward never reached its final segmentation head")


class FeaturePool:
    """At most `capacity` (features, target) samples, oldest replaced first. Features are kept as `dtype`
    (float16) and targets as int16 on the CPU; past `memory_limit_bytes` new samples go to files in
    `spill_dir` (a temporary folder), read back when drawn."""

    def __init__(self, capacity: int, dtype=torch.float16, memory_limit_bytes: int = None, spill_dir=None,
                 seed: int = 0):
        if capacity < 1:
            raise ValueError("the feature pool needs a capacity of at least 1 sample")
        self.capacity, self.dtype, self.memory_limit_bytes = capacity, dtype, memory_limit_bytes
        self._spill_parent, self._spill_dir = spill_dir, None
        self._entries = []   # (features, target) tensors, or a Path to a spilled pair
        self._oldest = 0
        self._target_dtype = None
        self.bytes_in_memory = 0
        self._rng = random.Random(seed)

    def __len__(self):
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    @property
    def spilled(self) -> int:
        return sum(isinstance(e, Path) for e in self._entries)

    def add(self, features: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch, one sample at a time."""
        self._target_dtype = target.dtype
        features = features.detach().to("cpu", self.dtype)
        target = target.detach().to("cpu", torch.int16)
        for f, t in zip(features, target):
            self._put((f.clone(), t.clone()))

    def _put(self, pair) -> None:
        if self.full:
            slot = self._oldest
            self._oldest = (self._oldest + 1) % self.capacity
            self._release(self._entries[slot])
        else:
            slot = len(self._entries)
            self._entries.append(None)
        self._store(slot, pair)

    def _store(self, slot: int, pair) -> None:
        size = sum(x.numel() * x.element_size() for x in pair)
        if self.memory_limit_bytes is not None and self.bytes_in_memory + size > self.memory_limit_bytes:
            path = self._spill_folder() / f"{slot}.pt"
            torch.save(pair, path)
            self._entries[slot] = path
        else:
            self._entries[slot] = pair
            self.bytes_in_memory += size

    def _release(self, entry) -> None:
        if isinstance(entry, Path):
            entry.unlink(missing_ok=True)
        else:
            self.bytes_in_memory -= sum(x.numel() * x.element_size() for x in entry)

    def _spill_folder(self) -> Path:
        if self._spill_dir is None:
            self._spill_dir = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self._spill_parent))
        return self._spill_dir

    def _get(self, i: int):
        entry = self._entries[i]
        return torch.load(entry, weights_only=True) if isinstance(entry, Path) else entry

    def sample(self, n: int) -> tuple:
        """`n` samples drawn without replacement (with replacement when the pool holds fewer): features as
        the pool's dtype, targets back in the dtype they came in."""
        picks = self._rng.sample(range(len(self)), n) if n <= len(self) else \
            [self._rng.randrange(len(self)) for _ in range(n)]
        pairs = [self._get(i) for i in picks]
        return (torch.stack([f for f, _ in pairs]), torch.stack([t for _, t in pairs]).to(self._target_dtype))

    def state(self) -> dict:
        """The pool as tensors, numbers and strings, for torch.save and torch.load(weights_only=True) (see
        cache_resume.py). In-memory samples go in by reference and spilled ones memory-mapped from their files, so
        saving does not hold the whole pool in memory a second time."""
        pairs = [torch.load(e, weights_only=True, mmap=True) if isinstance(e, Path) else e for e in self._entries]
        version, internal, gauss = self._rng.getstate()
        return {"capacity": self.capacity, "dtype": str(self.dtype), "oldest": self._oldest,
                "target_dtype": None if self._target_dtype is None else str(self._target_dtype),
                "rng": [version, list(internal), gauss],
                "features": [f for f, _ in pairs], "targets": [t for _, t in pairs]}

    def restore(self, state: dict) -> None:
        """Refill the pool from state() (checked by the caller); samples past the memory limit spill again."""
        self.close()
        for f, t in zip(state["features"], state["targets"]):
            self._entries.append(None)
            self._store(len(self._entries) - 1, (f.clone(), t.clone()))  # clone: off the sidecar's memory map
        self._oldest = state["oldest"]
        self._target_dtype = None if state["target_dtype"] is None else _dtype(state["target_dtype"])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))

    def close(self) -> None:
        if self._spill_dir is not None:
            shutil.rmtree(self._spill_dir, ignore_errors=True)
            self._spill_dir = None
        self._entries, self._oldest, self.bytes_in_memory = [], 0, 0


def _dtype(name: str) -> torch.dtype:
    """torch.float16 from 'torch.float16' (dtypes are stored as strings: plain data, no pickled objects)."""
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


class LazyBatch(Mapping):
    """A training batch taken from nnU-Net's dataloader only when read (a cached step may not need one)."""

    def __init__(self, loader):
        self._loader, self._batch = loader, None

    def load(self) -> dict:
        if self._batch is None:
            self._batch = next(self._loader)
        return self._batch

    @property
    def loaded(self) -> bool:
        return self._batch is not None

    def __getitem__(self, key):
        return self.load()[key]

    def __iter__(self):
        return iter(self.load())

    def __len__(self):
        return len(self.load())


class LazyBatches:
    """Wraps nnU-Net's training dataloader: `next()` hands out LazyBatch objects."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        return self

    def __next__(self) -> LazyBatch:
        return LazyBatch(self.loader)


class FeatureCache:
    """The pool plus the refresh policy; counts trunk passes and the time they took."""

    def __init__(self, pool: FeaturePool, refresh_every: int = 0):
        self.pool, self.refresh_every = pool, refresh_every
        self.steps = 0
        self.encoded_batches = 0
        self.encode_seconds = 0.0

    def needs_fresh(self) -> bool:
        if not self.pool.full:
            return True
        return bool(self.refresh_every) and self.steps % self.refresh_every == 0

    def encode(self, network: nn.Module, data: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        features = trunk_features(network, data)
        self.pool.add(features, target)
        self.encoded_batches += 1
        self.encode_seconds += time.perf_counter() - start
        return features

    def batch_for_step(self, network: nn.Module, batch, batch_size: int, device: torch.device, amp) -> tuple:
        """(features, target) on `device` for this training step; `amp` is a context factory (autocast on CUDA)."""
        fresh = self.needs_fresh()
        self.steps += 1
        if fresh:
            batch = batch.load() if isinstance(batch, LazyBatch) else batch
            data, target = batch["data"].to(device, non_blocking=True), batch["target"]
            if isinstance(target, list):
                raise ValueError("the feature cache needs deep supervision off (one target per batch)")
            target = target.to(device, non_blocking=True)
            with amp():
                features = self.encode(network, data, target)
            return features, target
        features, target = self.pool.sample(batch_size)
        return features.to(device, non_blocking=True), target.to(device, non_blocking=True)

    def state(self) -> dict:
        return dict(self.pool.state(), steps=self.steps, encoded_batches=self.encoded_batches,
                    encode_seconds=self.encode_seconds)

    def restore(self, state: dict) -> None:
        self.pool.restore(state)
        self.steps, self.encoded_batches = state["steps"], state["encoded_batches"]
        self.encode_seconds = state["encode_seconds"]

    def close(self) -> None:
        self.pool.close()


def head_train_step(trainer, features: torch.Tensor, target: torch.Tensor, amp) -> dict:
    """nnUNetTrainer.train_step (2.8.1) with the final head on cached features in place of the network:
    same loss, AMP/grad scaler, gradient clipping at 12 and optimizer step. The head runs outside DDP's wrapper,
    so under DDP its gradients are averaged over the ranks here, as DDP would (each rank trains on its own pool)."""
    head = final_head(trainer.plain_network())
    trainer.optimizer.zero_grad(set_to_none=True)
    with amp():
        weight = next(head.parameters())
        output = head(features.to(weight.dtype))
        loss = trainer.loss(output, target)
    sync = (lambda: average_gradients(head.parameters())) if getattr(trainer, "is_ddp", False) else None
    return backward_and_step(trainer, loss, sync)
