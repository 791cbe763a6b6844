"""Transductive size prior (TI) for the FSEFT trainers: L = L_seg(supports) + lambda * L_TI(S, S_hat(query)).

`TransductiveMixin` is put in front of any FSEFT trainer (trainers/fseft_ti_trainers.py does that for the 14 methods).
Before the warm-up ends the trainer is exactly its FSEFT parent. After it, every training iteration adds
lambda * L_TI on query tiles to the supervised loss (see docs/transductive.md for the derivation and the cost).

* S (mm^3 per foreground class) comes from the fold's SUPPORT cases only: their preprocessed label maps
  (nnU-Net's dataset class, `load_case`) x the voxel volume of the configuration's spacing,
  `estimate_class_sizes` (robust mean).
* The query set is the fold's validation list (`do_split()[1]`, the shared query set of the few-shot splits).
  Only its preprocessed IMAGES are opened (`<case>.b2nd`, `.npy` or the 'data' array of `.npz`): never its
  `_seg` files, `.pkl` properties (they hold label-derived class locations), gt_segmentations or raw labels.
* Each query image is cut into a fixed grid of patch-sized tiles; every voxel belongs to exactly one tile
  (edge tiles are shifted inwards and count only the voxels they own; an image smaller than the patch is
  zero-padded at its end, as nnU-Net pads with 0, and the padding is not counted).
  S_hat(query) = sum over its tiles of voxel volume x the foreground probabilities.
* Once per epoch (after the warm-up) a no-grad pass over every tile of every query refreshes a per-tile cache of
  these sums (the reference evaluates the penalty once per epoch on the whole query volume).
* Each iteration then draws `ti_batch_size` (query, tile) pairs uniformly (query first, then tile), predicts them
  after the support batch (their gradients add up before the optimizer step) and adds lambda * penalty(S_hat) where
      S_hat = (cached total of the query with this tile's fresh value) + n_tiles * (s_tile - s_tile.detach()):
  its value is the whole-image penalty, and its gradient is an unbiased estimate of the gradient of the
  whole-image penalty (mean over queries and classes), the straight-through scheme of losses/size_prior.py.
  The sampled tiles' fresh sums go back into the cache.
Extra cost per epoch after the warm-up: a forward/backward pass of one query tile per iteration, plus one no-grad
forward pass per query tile (docs/transductive.md has measurements).
"""
import os
import time
from os.path import isfile, join
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import autocast

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy
from nnunetv2.utilities.helpers import dummy_context

from ..errors import fail
from ..losses.size_prior import DEFAULT_GAMMA, DEFAULT_LAMBDA, SizePriorLoss, estimate_class_sizes, sizes_tensor
from .optim_step import backward_and_step


# ------------------------------------------------------------------ data access (no labels for queries)

def open_query_image(dataset_class, folder: str, identifier: str):
    """The preprocessed image [C, *spatial] of one case, opened lazily where possible; its labels are not touched.

    nnU-Net's `load_case` also opens `<case>_seg.*` and reads `<case>.pkl` (class locations computed from the
    labels), so it must not be used for query cases."""
    if issubclass(dataset_class, nnUNetDatasetBlosc2):
        import blosc2
        mmap = {} if os.name == "nt" else {"mmap_mode": "r"}
        return blosc2.open(urlpath=join(folder, identifier + ".b2nd"), mode="r", dparams={"nthreads": 1}, **mmap)
    if issubclass(dataset_class, nnUNetDatasetNumpy):
        npy = join(folder, identifier + ".npy")
        if isfile(npy):
            return np.load(npy, mmap_mode="r")
        with np.load(join(folder, identifier + ".npz")) as archive:  # npz members load one at a time
            return archive["data"]
    raise fail(f"the transductive (TI) trainers cannot read query images from a {dataset_class.__name__} folder "
               f"without also opening their labels; preprocess with nnU-Net 2.8's default blosc2 format")


def support_label_maps(dataset_class, folder: str, identifiers: List[str]):
    """The label array of each support case: its preprocessed `<case>_seg` file, via nnU-Net's dataset class."""
    dataset = dataset_class(folder, identifiers)
    for identifier in identifiers:
        _, seg, _, _ = dataset.load_case(identifier)
        yield np.asarray(seg[:])


# ------------------------------------------------------------------ tiling

def tile_grid(image_shape, patch_size) -> List[Tuple[Tuple[slice, ...], Tuple[slice, ...], Tuple[int, ...]]]:
    """Non-overlapping ownership of an image by patch-sized tiles.

    Returns, per tile, (slices of the image to read, slices of the tile's OWN voxels inside the patch, padding
    needed after the read region per axis). Every image voxel is owned by exactly one tile."""
    per_axis = []
    for length, p in zip(image_shape, patch_size):
        length, p = int(length), int(p)
        if length <= p:
            per_axis.append([(slice(0, length), slice(0, length), p - length)])
            continue
        entries = []
        for i in range(-(-length // p)):
            start = min(i * p, length - p)
            own_lo, own_hi = i * p, min((i + 1) * p, length)
            entries.append((slice(start, start + p), slice(own_lo - start, own_hi - start), 0))
        per_axis.append(entries)
    tiles = []
    for combo in np.ndindex(*[len(a) for a in per_axis]):
        picked = [per_axis[d][j] for d, j in enumerate(combo)]
        tiles.append((tuple(e[0] for e in picked), tuple(e[1] for e in picked), tuple(e[2] for e in picked)))
    return tiles


def read_tile(image, read: Tuple[slice, ...], pad: Tuple[int, ...]) -> np.ndarray:
    """image[:, read] as float32, zero-padded at the end of each axis by `pad` (nnU-Net pads with 0 as well)."""
    tile = np.asarray(image[(slice(None),) + tuple(read)], dtype=np.float32)
    if any(pad):
        tile = np.pad(tile, [(0, 0)] + [(0, p) for p in pad])
    return tile


class QuerySet:
    """The query images and their tiles: what TI predicts. Holds lazy image handles, never labels."""

    def __init__(self, images: dict, patch_size, voxel_volume_mm3: float):
        self.images = images                                    # case id -> lazy array [C, *spatial]
        self.ids = sorted(images)
        self.two_d = len(patch_size) == 2                       # 2d configurations: slices of the 3d image
        self.patch3d = (1, *patch_size) if self.two_d else tuple(patch_size)
        self.tiles = {k: tile_grid(images[k].shape[1:], self.patch3d) for k in self.ids}
        self.voxel_volume_mm3 = float(voxel_volume_mm3)

    def n_tiles(self, case: str) -> int:
        return len(self.tiles[case])

    def batch(self, picks, device) -> torch.Tensor:
        """Network input for [(case, tile index), ...]: [B, C, *patch] (the slice axis dropped for 2d)."""
        arrays = [read_tile(self.images[c], *self.tiles[c][t][0::2]) for c, t in picks]
        x = torch.from_numpy(np.stack(arrays))
        if self.two_d:
            x = x[:, :, 0]
        return x.to(device, non_blocking=True)

    def owned(self, case: str, tile: int) -> Tuple[slice, ...]:
        own = self.tiles[case][tile][1]
        return own[1:] if self.two_d else own


def head_output(output):
    """The full-resolution output of a network that may return deep-supervision lists."""
    return output[0] if isinstance(output, (list, tuple)) else output


# ------------------------------------------------------------------ the mixin

class TransductiveMixin:
    """Adds the transductive size prior to an FSEFT trainer. Put it FIRST in the bases:
    `class MyTITrainer(TransductiveMixin, FSEFTLoRATrainer)`. Tune it with a subclass's class attributes."""

    ti_lambda = DEFAULT_LAMBDA      # weight of L_TI (reference --lambda_TI 0.1)
    ti_gamma = DEFAULT_GAMMA        # half-width of the allowed size band, relative (reference --margin 0.3)
    ti_warmup_fraction = 0.5        # supervised-only share of the epochs (reference: 50 of 100 epochs)
    ti_warmup_epochs = None         # absolute warm-up in epochs; overrides ti_warmup_fraction when set
    ti_batch_size = 1               # query tiles per training iteration (with gradient)
    ti_max_queries = None           # use at most this many query cases (a seeded subset); None = all

    ti_sizes_mm3: Optional[dict] = None     # S per foreground class (channel order), set by ti_setup
    ti_epoch_penalty: Optional[float] = None  # whole-image penalty of the last query pass (mean over queries)
    _ti_queries: Optional[QuerySet] = None
    _ti_prior: Optional[SizePriorLoss] = None
    _ti_cache_epoch: Optional[int] = None

    # ---- schedule

    def ti_warmup(self) -> int:
        if self.ti_warmup_epochs is not None:
            return int(self.ti_warmup_epochs)
        return int(round(self.ti_warmup_fraction * self.num_epochs))

    def ti_active(self) -> bool:
        return (self._ti_prior is not None and self.ti_lambda > 0
                and self.current_epoch >= self.ti_warmup())

    # ---- set-up

    def ti_class_spec(self) -> Tuple[dict, list, str]:
        """(class -> label values, channel order, nonlin) of the foreground output channels."""
        lm = self.label_manager
        if lm.has_regions:
            spec = {i: list(np.atleast_1d(r)) for i, r in enumerate(lm.foreground_regions)}
            return spec, list(spec), "sigmoid"
        spec = {int(v): int(v) for v in lm.foreground_labels}
        return spec, list(spec), "softmax"

    def ti_voxel_volume(self) -> float:
        spacing = list(self.configuration_manager.spacing)
        if len(spacing) == 2:  # 2d configurations keep the through-plane spacing of each case; use the median
            spacing = [self.plans_manager.plans["original_median_spacing_after_transp"][0]] + spacing
        return float(np.prod(spacing))

    def ti_setup(self) -> None:
        """Size prior from the supports, query images from the split. Called by on_train_start."""
        if self.is_cascaded:
            raise fail("the transductive (TI) trainers do not support cascaded configurations (3d_cascade_fullres)")
        supports, queries = self.do_split()
        overlap = sorted(set(supports) & set(queries))
        if overlap:
            self.print_to_log_file(f"TI WARNING: {len(overlap)} query case(s) are also supports (e.g. {overlap[0]}); "
                                   "the size prior is then not transductive for them")
        if self.ti_max_queries is not None and len(queries) > self.ti_max_queries:
            picked = np.random.default_rng(0).choice(len(queries), self.ti_max_queries, replace=False)
            queries = sorted(str(sorted(queries)[i]) for i in picked)

        spec, order, nonlin = self.ti_class_spec()
        vv = self.ti_voxel_volume()
        labels = support_label_maps(self.dataset_class, self.preprocessed_dataset_folder, list(supports))
        sizes = estimate_class_sizes(((seg, [vv]) for seg in labels), spec)
        self.ti_sizes_mm3 = {c: sizes.get(c) for c in order}
        missing = [c for c in order if c not in sizes]
        if missing:
            self.print_to_log_file(f"TI: no support has class(es) {missing}: no size prior for them")
        if len(missing) == len(order) or not queries:
            self.print_to_log_file("TI: nothing to constrain (no class in the supports or no query case); "
                                   "training without the size prior")
            return
        self._ti_prior = SizePriorLoss(sizes_tensor(sizes, order), gamma=self.ti_gamma, nonlin=nonlin).to(self.device)
        images = {q: open_query_image(self.dataset_class, self.preprocessed_dataset_folder, q) for q in queries}
        self._ti_queries = QuerySet(images, self.configuration_manager.patch_size, vv)
        self._ti_cache, self._ti_cache_epoch = {}, None
        self._ti_rng = np.random.default_rng(np.random.randint(0, 2 ** 31 - 1))
        n_tiles = sum(self._ti_queries.n_tiles(q) for q in self._ti_queries.ids)
        self.print_to_log_file(
            f"TI: size prior from {len(supports)} support case(s): "
            + ", ".join(f"class {c}: {s / 1000:.2f} ml" for c, s in sizes.items())
            + f"; {len(queries)} query case(s), {n_tiles} tiles; lambda={self.ti_lambda}, gamma={self.ti_gamma}, "
              f"active from epoch {self.ti_warmup()} of {self.num_epochs}")

    def on_train_start(self):
        super().on_train_start()
        self.ti_setup()

    # ---- per epoch: whole-image sizes of the queries, no gradient

    @torch.no_grad()
    def ti_refresh(self) -> np.ndarray:
        """Predict every tile of every query; refill the cache. Returns the penalty per query [Q]."""
        qs, prior = self._ti_queries, self._ti_prior
        was_training = self.network.training
        self.network.eval()
        picks = [(q, t) for q in qs.ids for t in range(qs.n_tiles(q))]
        sizes = {q: np.zeros((qs.n_tiles(q), prior.sizes_mm3.numel())) for q in qs.ids}
        step = max(1, self.ti_batch_size)
        for i in range(0, len(picks), step):
            chunk = picks[i:i + step]
            padded = chunk + [chunk[-1]] * (step - len(chunk))  # constant batch shape (torch.compile)
            s = self._ti_tile_sizes(padded)[:len(chunk)].double().cpu().numpy()
            for (q, t), row in zip(chunk, s):
                sizes[q][t] = row
        self._ti_cache, self._ti_cache_epoch = sizes, self.current_epoch
        if was_training:
            self.network.train()
        totals = torch.from_numpy(np.stack([sizes[q].sum(0) for q in qs.ids])).float().to(self.device)
        return np.array([float(prior.penalty(totals[i:i + 1])) for i in range(len(qs.ids))])

    def _ti_tile_sizes(self, picks) -> torch.Tensor:
        """Predicted size (mm^3) of each picked tile's own voxels: [B, C] (no-grad pass)."""
        x = self._ti_queries.batch(picks, self.device)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = head_output(self.network(x))
        return self._ti_sizes_from_output(out, picks)

    def _ti_sizes_from_output(self, out: torch.Tensor, picks) -> torch.Tensor:
        qs = self._ti_queries
        rows = [self._ti_prior.predicted_sizes(out[i:i + 1][(slice(None), slice(None)) + qs.owned(q, t)],
                                               qs.voxel_volume_mm3)
                for i, (q, t) in enumerate(picks)]
        return torch.cat(rows, 0)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.ti_active():
            self.ti_epoch_pass()

    def ti_epoch_pass(self) -> None:
        t0 = time.time()
        penalties = self.ti_refresh()
        prior = self._ti_prior.sizes_mm3.cpu().numpy()
        ratios = np.stack([self._ti_cache[q].sum(0) / prior for q in self._ti_queries.ids])  # [Q, C]
        self.ti_epoch_penalty = float(penalties.mean())
        self.print_to_log_file(
            f"TI: query pass over {len(penalties)} case(s) in {time.time() - t0:.1f} s; predicted/prior size per class "
            f"(median over queries) {' '.join('-' if not np.isfinite(r) else f'{r:.2f}' for r in np.median(ratios, 0))}; "
            f"{int((penalties > 0).sum())} outside the band; whole-image penalty {self.ti_epoch_penalty:.4f}")

    # ---- per iteration: supports + lambda * L_TI on query tiles

    def ti_sample(self) -> list:
        """`ti_batch_size` (query, tile) pairs: a query uniformly, then one of its tiles uniformly."""
        qs, rng = self._ti_queries, self._ti_rng
        picks = []
        for _ in range(max(1, self.ti_batch_size)):
            q = qs.ids[rng.integers(len(qs.ids))]
            picks.append((q, int(rng.integers(qs.n_tiles(q)))))
        return picks

    def ti_loss(self, query_logits: torch.Tensor, picks) -> Tuple[torch.Tensor, torch.Tensor]:
        """L_TI (without lambda) of the picked tiles' queries; returns (loss, the tiles' fresh sizes [B, C]).

        Value: the whole-image penalty of each query, its size being the cached sizes of its other tiles plus this
        tile's fresh one. Gradient: n_tiles x this tile's share, an unbiased estimate of the gradient of the
        whole-image penalty averaged over queries (picks are uniform over queries, then over their tiles)."""
        qs = self._ti_queries
        s = self._ti_sizes_from_output(query_logits, picks).float()                   # [B, C], with grad
        others = np.stack([self._ti_cache[q].sum(0) - self._ti_cache[q][t] for q, t in picks])
        others = torch.as_tensor(others, dtype=s.dtype, device=s.device)
        n_tiles = torch.tensor([qs.n_tiles(q) for q, _ in picks], dtype=s.dtype, device=s.device)[:, None]
        s_hat = others + s.detach() + n_tiles * (s - s.detach())
        return self._ti_prior.penalty(s_hat), s.detach()

    def train_step(self, batch: dict) -> dict:
        if not self.ti_active():
            return super().train_step(batch)
        if self._ti_cache_epoch is None:  # called outside run_training's loop
            self.ti_epoch_pass()
        # nnUNetTrainer.train_step (2.8.1) plus lambda * L_TI on query tiles. Supports and query tiles go through the
        # network separately (peak memory of the supervised step; no query in batch-norm statistics) and their
        # gradients add up before the one optimizer step (nnU-Net's tail, optim_step). The query pass goes first,
        # unsynchronised: under DDP the support pass, whose deep-supervision loss reaches every trained parameter,
        # then all-reduces the summed gradients once (the other order leaves heads the query loss misses unsynced).
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        picks = self.ti_sample()
        query = self._ti_queries.batch(picks, self.device)
        amp = (lambda: autocast(self.device.type, enabled=True)) if self.device.type == "cuda" else dummy_context

        self.optimizer.zero_grad(set_to_none=True)
        with self.network.no_sync() if self.is_ddp else dummy_context():
            with amp():
                l_ti, s_fresh = self.ti_loss(head_output(self.network(query)), picks)
                weighted = self.ti_lambda * l_ti
            (self.grad_scaler.scale(weighted) if self.grad_scaler is not None else weighted).backward()
        del query
        with amp():
            l_seg = self.loss(self.network(data), target)
        backward_and_step(self, l_seg)
        for (q, t), row in zip(picks, s_fresh.double().cpu().numpy()):
            self._ti_cache[q][t] = row  # the tile's size before this step's update: fresher than the epoch pass
        loss = l_seg.detach() + self.ti_lambda * l_ti.detach()
        return {"loss": loss.cpu().numpy(), "seg_loss": l_seg.detach().cpu().numpy(),
                "ti_loss": l_ti.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        if train_outputs and "ti_loss" in train_outputs[0]:
            seg = float(np.mean([o["seg_loss"] for o in train_outputs]))
            ti = float(np.mean([o["ti_loss"] for o in train_outputs]))
            self.print_to_log_file(f"TI: mean seg loss {seg:.4f}, mean L_TI {ti:.4f} (x lambda {self.ti_lambda})")
