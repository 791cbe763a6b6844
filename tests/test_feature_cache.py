"""The feature cache of the black-box methods (nnunetv2_fseft/training/feature_cache.py): the trunk pass builds no
graph and stops before the head, a cached step equals the uncached one, the pool and refresh policy, and a short
in-process run of the cached trainer on tiny phantoms."""
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import dummy_context

from networks import tiny_unet
from nnunetv2_fseft.peft import apply_peft
from nnunetv2_fseft.training.feature_cache import (FeatureCache, FeaturePool, LazyBatch, final_head,
                                                   head_train_step, is_black_box, trunk_features)

BLACK_BOX = ["linear_probe", "spatial_adapter"]


def _network(method, seed=0):
    torch.manual_seed(seed)
    net = apply_peft(tiny_unet(num_classes=3, deep_supervision=False), method)
    if method == "spatial_adapter":  # non-zero adapter, as after some training
        with torch.no_grad():
            final_head(net).adapter[-1].weight.normal_(0, 0.05)
    return net


def _batch(seed=1, n=2):
    g = torch.Generator().manual_seed(seed)
    return {"data": torch.randn((n, 1, 16, 16, 16), generator=g),
            "target": torch.randint(0, 3, (n, 1, 16, 16, 16), generator=g).float()}


def _trainer(net):
    loss = DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=1e-4)
    return SimpleNamespace(network=net, plain_network=lambda: net, optimizer=optimizer, loss=loss, grad_scaler=None)


def _uncached_step(trainer, batch):
    """nnUNetTrainer.train_step (2.8.1) on CPU."""
    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.loss(trainer.network(batch["data"]), batch["target"])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainer.network.parameters(), 12)
    trainer.optimizer.step()


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", BLACK_BOX)
def test_trunk_pass_builds_no_graph_and_stops_before_the_head(method):
    net = _network(method)
    assert is_black_box(net)
    calls = []
    final_head(net).register_forward_hook(lambda *a: calls.append(1))
    x = _batch()["data"]
    features = trunk_features(net, x)
    assert not calls  # the head (and a spatial adapter) never ran
    assert features.grad_fn is None and not features.requires_grad
    head = final_head(net)
    assert features.shape[1] == getattr(head, "base_layer", head).in_channels
    with torch.no_grad():
        assert torch.allclose(final_head(net)(features), net(x), atol=1e-6)  # hook removed, same output


def test_only_head_training_methods_are_black_box():
    assert not is_black_box(apply_peft(tiny_unet(deep_supervision=False), "lora"))
    assert not is_black_box(apply_peft(tiny_unet(deep_supervision=False), "ft_last"))


@pytest.mark.parametrize("method", BLACK_BOX)
def test_cached_step_gives_the_uncached_gradients_and_update(method):
    batch = _batch()
    plain, cached = _network(method), _network(method)
    cached.load_state_dict(plain.state_dict())
    t_plain, t_cached = _trainer(plain), _trainer(cached)
    _uncached_step(t_plain, batch)

    cache = FeatureCache(FeaturePool(capacity=2), refresh_every=0)
    features, target = cache.batch_for_step(cached, batch, 2, torch.device("cpu"), dummy_context)
    assert cache.encoded_batches == 1 and len(cache.pool) == 2 and cache.pool.full
    head_train_step(t_cached, features, target, dummy_context)
    g_plain, g_cached = _grads(plain), _grads(cached)
    assert g_plain.keys() == g_cached.keys() and g_plain
    for k in g_plain:
        assert torch.allclose(g_plain[k], g_cached[k], rtol=1e-5, atol=1e-7), k
    for (k, a), b in zip(plain.state_dict().items(), cached.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), k

    # the same batch drawn back from the pool (float16, maybe reordered): same gradients up to float16 rounding
    again = _network(method)
    again.load_state_dict(cached.state_dict())
    reference = copy.deepcopy(again)
    _uncached_step(_trainer(reference), batch)
    lazy = LazyBatch(iter(()))  # a pool step must not ask the dataloader for a batch
    features, target = cache.batch_for_step(again, lazy, 2, torch.device("cpu"), dummy_context)
    assert not lazy.loaded and cache.encoded_batches == 1 and features.dtype == torch.float16
    head_train_step(_trainer(again), features, target, dummy_context)
    for k, g in _grads(reference).items():
        assert torch.allclose(g, _grads(again)[k], rtol=2e-2, atol=1e-4), k


def test_pool_keeps_capacity_replaces_oldest_and_restores_dtypes():
    pool = FeaturePool(capacity=3, seed=0)

    def batch(value, n):
        return torch.full((n, 2, 4, 4, 4), float(value)), torch.full((n, 1, 4, 4, 4), float(value))

    pool.add(*batch(1, 2))
    assert len(pool) == 2 and not pool.full
    pool.add(*batch(2, 2))
    assert len(pool) == 3 and pool.full  # the second 2 replaced the oldest 1
    pool.add(*batch(3, 1))  # replaces the other 1
    features, target = pool.sample(3)
    assert sorted(features[:, 0, 0, 0, 0].tolist()) == [2.0, 2.0, 3.0]
    assert features.dtype == torch.float16 and target.dtype == torch.float32
    assert torch.equal(features[:, :1].float(), target)  # pairs stay together
    assert pool.sample(5)[0].shape[0] == 5  # more than held: with replacement


def test_refresh_policy():
    cache = FeatureCache(FeaturePool(capacity=4), refresh_every=3)
    fresh = []
    for _ in range(10):
        fresh.append(cache.needs_fresh())
        cache.steps += 1
        if fresh[-1]:
            cache.pool.add(torch.zeros(2, 1, 2, 2, 2), torch.zeros(2, 1, 2, 2, 2))
    # fills in 2 steps (batch 2, capacity 4), then every 3rd step
    assert fresh == [True, True, False, True, False, False, True, False, False, True]
    never = FeatureCache(FeaturePool(capacity=1), refresh_every=0)
    never.pool.add(torch.zeros(1, 1, 2, 2, 2), torch.zeros(1, 1, 2, 2, 2))
    for step in range(20):
        never.steps = step
        assert not never.needs_fresh()


def test_pool_spills_past_its_memory_limit_and_cleans_up(tmp_path):
    one = 2 * 4 * 4 * 4 * 2 + 4 * 4 * 4 * 2  # float16 features + int16 target per sample
    pool = FeaturePool(capacity=4, memory_limit_bytes=2 * one, spill_dir=tmp_path)
    for v in range(4):
        pool.add(torch.full((1, 2, 4, 4, 4), float(v)), torch.full((1, 1, 4, 4, 4), float(v)))
    assert pool.bytes_in_memory == 2 * one and pool.spilled == 2
    assert len(list(tmp_path.rglob("*.pt"))) == 2
    features, target = pool.sample(4)
    assert sorted(features[:, 0, 0, 0, 0].tolist()) == [0.0, 1.0, 2.0, 3.0]
    assert torch.equal(features[:, :1].float(), target)
    pool.add(torch.full((1, 2, 4, 4, 4), 9.0), torch.full((1, 1, 4, 4, 4), 9.0))  # replaces an in-memory one
    assert pool.bytes_in_memory == 2 * one and pool.spilled == 2
    pool.close()
    assert not list(tmp_path.iterdir())


def test_no_cache_trainers_keep_the_uncached_step():
    from nnunetv2_fseft_trainers import fseft_trainers as t
    assert t.FSEFTLinearProbeTrainer.use_feature_cache and t.FSEFTSpatialAdapterTrainer.use_feature_cache
    for name, base in (("FSEFTLinearProbeNoCacheTrainer", t.FSEFTLinearProbeTrainer),
                       ("FSEFTSpatialAdapterNoCacheTrainer", t.FSEFTSpatialAdapterTrainer)):
        cls = getattr(t, name)
        assert issubclass(cls, base) and cls.use_feature_cache is False
        assert (cls.peft_method, cls.learning_rate) == (base.peft_method, base.learning_rate)


def test_cached_trainer_runs_in_process(nnunet_env):
    """A few iterations of the cached linear probe through nnU-Net's own loop, dataloader and augmentation."""
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTLinearProbeTrainer

    class FSEFTLinearProbeTrainer_cachetest(FSEFTLinearProbeTrainer):
        epochs, iterations_per_epoch, val_iterations_per_epoch = 1, 6, 1
        feature_pool_size, feature_refresh_every = 4, 2

        def perform_actual_validation(self, save_probabilities: bool = False):
            pass

    write_phantom_dataset(nnunet_env / "raw", 951, "Cache", ["spleen"], 4, shape=(24, 24, 24), seed=0)
    plan_with_preset(951, "tiny", num_processes=1)
    pre = nnunet_env / "pre" / "Dataset951_Cache"
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    cases = sorted(p.stem for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))  # 4 cases: our own split
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:3], "val": cases[3:]}]))
    trainer = FSEFTLinearProbeTrainer_cachetest(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()),
                                                device=torch.device("cpu"))
    trainer.initialize()
    trunk_before = {k: v.clone() for k, v in trainer.network.state_dict().items() if "seg_layers" not in k}
    head_before = final_head(trainer.network).weight.detach().clone()
    trainer.run_training()
    fold = Path(trainer.output_folder)
    log = next(fold.glob("training_log_*.txt")).read_text()
    # batch 2, pool 4: steps 0, 1 fill it; then fresh at steps 2 and 4, pool draws at 1 of every 2
    assert "feature cache: pool of 4 samples" in log and "feature cache: 4 trunk passes in 6 steps" in log
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "adapter.safetensors").is_file()
    assert trainer.feature_cache is None and not list(fold.glob("fseft_feature_pool_*"))
    after = trainer.network.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in trunk_before.items())
    assert not torch.equal(head_before, final_head(trainer.network).weight)
