"""DDP (`nnUNetv2_train ... -num_gpus N`) for every trainer family, on CPU: two processes, the gloo backend,
driving each trainer's own hooks and train_step as nnU-Net's loop does.

After every step the trainable parameters are identical on both ranks (and the ranks trained on different
batches, so that equality comes from gradient averaging), frozen ones are untouched, only rank 0 writes
checkpoints and adapter files, and a trainer resumed from checkpoint_latest.pth (`--c`) holds the saved
weights and trains on in step. The cached black-box step runs its head outside DDP's wrapper; its gradients are
averaged in training/optim_step.py: the linear probe is run with and without the cache, and cached on a BatchNorm
network (nnU-Net makes it SyncBatchNorm under DDP), whose frozen running statistics must not move. A `--c` of a run
whose stem trains (its input channels were mapped) trains the stem in step on both ranks.

Test-only seam: nnU-Net moves a DDP trainer to CUDA and wraps DDP with device_ids; here the trainer's device
is set back to the CPU right after construction and nnU-Net's `DDP` name wraps without device_ids, and without
torch's refusal of SyncBatchNorm in a CPU module (a SyncBatchNorm in eval mode never syncs; in train mode it raises
on CPU, where a GPU would sync). The production path is nnU-Net's, unchanged."""
import json
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
STEPS = 3


def _trainer_classes() -> dict:
    """Family name -> trainer class (test subclasses only set class attributes)."""
    from nnunetv2_fseft.training.multitalent import MultiTalentTrainer
    from nnunetv2_fseft_trainers.fseft_ti_trainers import FSEFTLoRATITrainer
    from nnunetv2_fseft_trainers.fseft_trainers import (FSEFTAdaptFormerTrainer, FSEFTCNNAdapterTrainer,
                                                        FSEFTDecoderTrainer, FSEFTFullFTTrainer,
                                                        FSEFTLinearProbeNoCacheTrainer, FSEFTLinearProbeTrainer,
                                                        FSEFTLoRATrainer, FSEFTSpatialAdapterTrainer)

    class LinearProbeCached(FSEFTLinearProbeTrainer):
        feature_pool_size, feature_refresh_every = 2, 3  # full after 2 steps of batch 1: pool steps follow

    class SpatialAdapterCached(FSEFTSpatialAdapterTrainer):
        feature_pool_size, feature_refresh_every = 2, 3

    class LoRATI(FSEFTLoRATITrainer):
        ti_warmup_epochs = 0  # the size prior from the first step

    class LinearProbeCachedBN(LinearProbeCached):
        """Trained on the BatchNorm plans (see _batchnorm_plans)."""

    class StemResumed(FSEFTLoRATrainer):
        """Its own results folder, for the foundation.json of a run whose stem trained."""

    return {"full": FSEFTFullFTTrainer, "decoder": FSEFTDecoderTrainer, "lora": FSEFTLoRATrainer,
            "cnn_adapter": FSEFTCNNAdapterTrainer, "adaptformer": FSEFTAdaptFormerTrainer,
            "linear_probe_cached": LinearProbeCached, "spatial_adapter_cached": SpatialAdapterCached,
            "linear_probe_uncached": FSEFTLinearProbeNoCacheTrainer, "lora_ti": LoRATI, "multitalent": MultiTalentTrainer,
            "linear_probe_cached_bn": LinearProbeCachedBN, "stem_resumed": StemResumed}


def _batchnorm_plans(args) -> tuple:
    """The same plans with BatchNorm3d in place of InstanceNorm3d."""
    plans, dataset_json = args
    plans = json.loads(json.dumps(plans))
    kwargs = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    kwargs["norm_op"], kwargs["norm_op_kwargs"] = "torch.nn.modules.batchnorm.BatchNorm3d", {"eps": 1e-5, "affine": True}
    return plans, dataset_json


RESUMED = ("lora", "linear_probe_cached", "multitalent")  # --c is the same nnU-Net code for every family


def _cpu_ddp_seam() -> None:
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base
    from torch.nn.parallel import DistributedDataParallel

    class CpuDDP(DistributedDataParallel):
        def _passing_sync_batchnorm_handle(self, module):
            pass

    def cpu_ddp(module, device_ids=None, **kwargs):
        return CpuDDP(module, **kwargs)

    base.DDP = cpu_ddp


def _new_trainer(cls, args, resume=False):
    plans, dataset_json = args
    trainer = cls(dict(plans, continue_training=resume), "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # the seam: nnU-Net set cuda under DDP
    return trainer


def _gather(tensor: torch.Tensor) -> list:
    out = [torch.empty_like(tensor) for _ in range(WORLD)]
    dist.all_gather(out, tensor.contiguous())
    return out


def _flat(params) -> torch.Tensor:
    params = list(params)
    return torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)


def _plain(trainer):
    """The network without the DDP wrapper (MultiTalentTrainer is no FSEFTTrainer: no plain_network())."""
    network = trainer.network
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def _split(network):
    params = list(network.parameters())
    return [p for p in params if p.requires_grad], [p for p in params if not p.requires_grad]


def _start_epoch(trainer):
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()


def _steps(trainer, n, name, losses, times=None):
    """n train_steps; after each, the trainable parameters are equal on both ranks. `times` collects
    (kind, seconds) per step, kind 'pool' for a cached step that drew from the pool."""
    trainable, _ = _split(_plain(trainer))
    for i in range(n):
        before = _flat(trainable).clone()
        cache = getattr(trainer, "feature_cache", None)
        kind = "pool" if cache is not None and not cache.needs_fresh() else "fresh"
        start = time.perf_counter()
        out = trainer.train_step(next(trainer.dataloader_train))
        if times is not None:
            times.append((kind, time.perf_counter() - start))
        losses.append(float(out["loss"]))
        after = _flat(trainable)
        a, b = _gather(after)
        assert torch.equal(a, b), f"{name}: trainable parameters differ between ranks after step {i + 1}"
        assert not torch.equal(before, after), f"{name}: step {i + 1} changed nothing"


def _files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _save_on_rank_zero_only(trainer, name, rank):
    """save_checkpoint on rank 1 first (must write nothing), then on rank 0."""
    fold = Path(trainer.output_folder)
    for writer in (1, 0):
        before = _files(fold)
        dist.barrier()
        if rank == writer:
            trainer.save_checkpoint(str(fold / "checkpoint_latest.pth"))
            if hasattr(trainer, "adapter_config"):
                trainer.save_checkpoint(str(fold / "checkpoint_final.pth"))  # writes the adapter files
        dist.barrier()
        if writer == 1:
            assert _files(fold) == before, f"{name}: rank 1 wrote files"
    expected = {"checkpoint_latest.pth"} | ({"checkpoint_final.pth", "adapter.json", "adapter.safetensors"}
                                             if hasattr(trainer, "adapter_config") else set())
    assert expected <= set(_files(fold)), f"{name}: rank 0 wrote {sorted(_files(fold))}"
    saved = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert list(saved["network_weights"]) == list(_plain(trainer).state_dict()), name  # no 'module.'
    assert not list(fold.glob("*.feature_cache.pt")), f"{name}: a pool was saved under DDP (each rank has its own)"
    return saved


def _stem_resumed(name, cls, args, rank, timings):
    """--c of a run whose foundation.json says the stem trains: the stem is trainable before DDP wraps the network,
    so its gradients are averaged and both ranks' stems stay equal (before, it turned trainable after the wrap)."""
    from nnunetv2_fseft.checkpoints import input_projection
    resumed = _new_trainer(cls, args, resume=True)
    if rank == 0:
        Path(resumed.output_folder).mkdir(parents=True, exist_ok=True)
        (Path(resumed.output_folder) / "foundation.json").write_text(json.dumps({"stem_trains": True}))
    dist.barrier()
    resumed.initialize()
    stem = input_projection(_plain(resumed)).weight
    assert stem.requires_grad, f"{name}: the stem does not train on --c"
    assert any(p is stem for p in resumed.network.parameters() if p.requires_grad), name
    _start_epoch(resumed)
    before = stem.detach().clone()
    times = []
    _steps(resumed, 2, name, [], times)  # every trainable parameter, the stem included, equal on both ranks
    timings[name] = times
    assert not torch.equal(stem.detach(), before), f"{name}: the stem did not move"


def _running_stats(network) -> torch.Tensor:
    return _flat(b.float() for n, b in network.named_buffers() if "running_" in n)


def _family(name, cls, args, rank, timings):
    if name == "stem_resumed":
        return _stem_resumed(name, cls, args, rank, timings)
    trainer = _new_trainer(cls, _batchnorm_plans(args) if name.endswith("_bn") else args)
    trainer.initialize()
    assert trainer.is_ddp and isinstance(trainer.network, torch.nn.parallel.DistributedDataParallel), name
    _, frozen = _split(_plain(trainer))
    frozen_before = _flat(frozen).clone()
    stats_before = _running_stats(_plain(trainer)).clone()
    if name.endswith("_bn"):
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in _plain(trainer).modules()), name
        assert stats_before.numel() > 0, name
    _start_epoch(trainer)
    cached = getattr(trainer, "feature_cache", None) is not None
    assert cached == ("_cached" in name), f"{name}: feature cache {'on' if cached else 'off'}"
    losses, times = [], []
    n = STEPS + (3 if name.startswith("linear_probe") else 0)  # more steps to time for the cache decision
    _steps(trainer, n, name, losses, times)
    timings[name] = times
    if cached:
        assert trainer.feature_cache.encoded_batches < n, f"{name}: no step drew from the pool"
    assert torch.equal(_flat(frozen), frozen_before), f"{name}: a frozen parameter moved"
    if cached:  # the frozen trunk runs in eval mode: BatchNorm's running statistics stay as loaded
        assert torch.equal(_running_stats(_plain(trainer)), stats_before), f"{name}: running statistics moved"
    mine = torch.tensor(losses, dtype=torch.float64)
    a, b = _gather(mine)
    assert not torch.equal(a, b), f"{name}: both ranks saw the same batches, equality proves nothing"
    saved = _save_on_rank_zero_only(trainer, name, rank)
    if cached:
        trainer.feature_cache.close()
    if name not in RESUMED:
        return
    dist.barrier()
    resumed = _new_trainer(cls, args, resume=True)  # nnUNetv2_train ... --c
    resumed.load_checkpoint(str(Path(trainer.output_folder) / "checkpoint_latest.pth"))
    assert resumed.current_epoch == saved["current_epoch"] == 1, name
    for (k, p), q in zip(_plain(resumed).state_dict().items(), saved["network_weights"].values()):
        assert torch.equal(p, q), f"{name} --c: {k} differs from the checkpoint"
    _start_epoch(resumed)
    if name.endswith("_cached") and rank == 0:  # nnU-Net's log is rank 0's
        assert "feature cache: not restored under DDP; rebuilding the pool" in Path(resumed.log_file).read_text()
    _steps(resumed, 1, f"{name} --c", [])
    if getattr(resumed, "feature_cache", None) is not None:
        resumed.feature_cache.close()


def _worker(rank, init_file, env, args, report):
    os.environ.update(env)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=300))  # a busy machine can hold one rank back
    try:
        _cpu_ddp_seam()
        results = {}
        for name, cls in _trainer_classes().items():
            timings = {}
            try:
                _family(name, cls, args, rank, timings)
                results[name] = {"error": None, "steps": timings[name]}
            except AssertionError as e:  # symmetric on both ranks (checked on gathered tensors): go on
                results[name] = {"error": str(e), "steps": timings.get(name)}
            print(f"rank {rank}: {name} {'ok' if results[name]['error'] is None else 'FAILED'}", flush=True)
            dist.barrier()
        if rank == 0:
            Path(report).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dataset(nnunet_env):
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset

    write_phantom_dataset(nnunet_env / "raw", 953, "Ddp", ["spleen", "liver"], 5, shape=(20, 20, 20), seed=0)
    plan_with_preset(953, "tiny", num_processes=1)
    pre = nnunet_env / "pre" / "Dataset953_Ddp"
    cases = sorted(p.stem for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:3], "val": cases[3:]}]))
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    assert plans["configurations"]["3d_fullres"]["batch_size"] == WORLD  # one sample per rank
    return plans, json.loads((pre / "dataset.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(dataset, nnunet_env, tmp_path_factory) -> dict:
    """One two-process run over every family (process start, imports and process group are paid once)."""
    tmp = tmp_path_factory.mktemp("ddp")
    env = {k: os.environ[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA",
                                      "nnUNet_compile", "nnUNet_def_n_proc", "nnUNet_extTrainer")}
    mp.spawn(_worker, args=(str(tmp / "init"), env, dataset, str(tmp / "report.json")), nprocs=WORLD, join=True)
    return json.loads((tmp / "report.json").read_text())


FAMILIES = ["full", "decoder", "lora", "cnn_adapter", "adaptformer", "linear_probe_cached", "spatial_adapter_cached",
            "linear_probe_uncached", "lora_ti", "multitalent", "linear_probe_cached_bn", "stem_resumed"]


@pytest.mark.parametrize("family", FAMILIES)
def test_trainer_family_stays_in_step_under_ddp(ddp_run, family):
    assert family in ddp_run, f"{family} did not run"
    assert ddp_run[family]["error"] is None, ddp_run[family]["error"]


def test_cached_head_step_vs_uncached_step_timing(ddp_run):
    """The cache under DDP is kept (gradients averaged) because a pool step is cheaper than the uncached step;
    printed for docs/gpu.md."""
    def median(family, kind):
        times = sorted(t for k, t in ddp_run[family]["steps"] if k == kind)
        return times[len(times) // 2]

    pool, fresh = median("linear_probe_cached", "pool"), median("linear_probe_cached", "fresh")
    uncached = median("linear_probe_uncached", "fresh")
    print(f"DDP, 2 gloo CPU ranks, linear probe: pool step {pool * 1e3:.0f} ms, fresh (trunk pass) step "
          f"{fresh * 1e3:.0f} ms, uncached step {uncached * 1e3:.0f} ms")
    assert pool < uncached
