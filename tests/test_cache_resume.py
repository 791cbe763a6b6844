"""Issue 6: `nnUNetv2_train ... --c` resumes the feature cache of the black-box methods. Each checkpoint gets a
sidecar `<stem>.feature_cache.pt` (nnunetv2_fseft/training/cache_resume.py); resuming refills the pool with the
same samples, oldest-slot pointer, RNG state and counters; a sidecar that is missing, inconsistent or foreign is
ignored with one log line and the pool is rebuilt."""
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from nnunetv2_fseft.training.cache_resume import remove_sidecars, restore_sidecar, save_sidecar, sidecar_path
from nnunetv2_fseft.training.feature_cache import FeatureCache, FeaturePool

SHAPE = (2, 4, 4, 4)  # one feature sample: channels x patch
ONE = 2 * 64 * 2 + 64 * 2  # bytes of one float16 feature sample + its int16 target


def fingerprint(cache: FeatureCache) -> dict:
    """Everything resuming must carry: each slot's contents (hashed), pointer, RNG, counters."""
    pool = cache.pool
    pairs = [pool._get(i) for i in range(len(pool))]
    return {"samples": [hashlib.sha256(f.numpy().tobytes() + t.numpy().tobytes()).hexdigest() for f, t in pairs],
            "oldest": pool._oldest, "rng": pool._rng.getstate(), "target_dtype": pool._target_dtype,
            "steps": cache.steps, "encoded_batches": cache.encoded_batches}


def _cache(tmp_path, capacity=5, dtype=torch.float16, memory_samples=2, folder="fold") -> FeatureCache:
    spill = tmp_path / folder
    spill.mkdir(exist_ok=True)
    return FeatureCache(FeaturePool(capacity, dtype, memory_samples * ONE, spill_dir=spill), refresh_every=2)


def _used_cache(tmp_path, **kwargs) -> FeatureCache:
    """A pool that wrapped around (7 samples into 5 slots), spilled 3 of 5 and drew from its RNG. It spills to
    its own folder: resuming deletes the spill folders it finds next to the checkpoint (a killed run's)."""
    cache = _cache(tmp_path, folder="run1", **kwargs)
    (tmp_path / "fold").mkdir(exist_ok=True)  # the checkpoints' folder
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        cache.pool.add(torch.randn((1, *SHAPE), generator=g), torch.randint(0, 3, (1, 1, *SHAPE[1:]), generator=g).float())
    cache.pool.sample(3)
    cache.steps, cache.encoded_batches, cache.encode_seconds = 11, 7, 1.25
    return cache


def test_sidecar_round_trip_restores_contents_pointer_rng_and_counters(tmp_path):
    cache = _used_cache(tmp_path)
    assert cache.pool.spilled == 3 and cache.pool._oldest == 2
    checkpoint = tmp_path / "fold" / "checkpoint_latest.pth"
    save_sidecar(cache, checkpoint, epoch=4)
    assert sidecar_path(checkpoint).name == "checkpoint_latest.feature_cache.pt"
    torch.load(sidecar_path(checkpoint), weights_only=True)  # plain data: loads without unpickling objects

    resumed = _cache(tmp_path)
    line = restore_sidecar(resumed, checkpoint, 4, SHAPE)
    assert line == ("feature cache: restored 5 samples from checkpoint_latest.feature_cache.pt (11 steps, "
                    "7 trunk passes so far)")
    assert fingerprint(resumed) == fingerprint(cache) and resumed.encode_seconds == 1.25
    assert resumed.pool.spilled == 3 and resumed.pool.bytes_in_memory == 2 * ONE  # same memory limit kept
    a, b = cache.pool.sample(4), resumed.pool.sample(4)  # same RNG: the same draws from here on
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[1].dtype == torch.float32
    cache.pool.add(torch.zeros((1, *SHAPE)), torch.zeros((1, 1, *SHAPE[1:])))
    resumed.pool.add(torch.zeros((1, *SHAPE)), torch.zeros((1, 1, *SHAPE[1:])))
    assert fingerprint(resumed) == fingerprint(cache)  # the same slot (the oldest) was replaced
    cache.close()
    resumed.close()


def test_latest_and_best_of_one_epoch_share_one_file_and_no_cache_removes_the_sidecar(tmp_path):
    cache = _used_cache(tmp_path)
    latest, best = tmp_path / "fold" / "checkpoint_latest.pth", tmp_path / "fold" / "checkpoint_best.pth"
    save_sidecar(cache, latest, 2)
    save_sidecar(cache, best, 2)
    assert os.path.samefile(sidecar_path(latest), sidecar_path(best))  # a hard link, not a second copy
    cache.steps += 1
    save_sidecar(cache, latest, 3)  # a new state replaces latest's file; best keeps its own
    assert not os.path.samefile(sidecar_path(latest), sidecar_path(best))
    assert torch.load(sidecar_path(best), weights_only=True)["epoch"] == 2
    save_sidecar(None, best, 4)  # a checkpoint written without a cache leaves no stale sidecar
    assert not sidecar_path(best).exists()
    remove_sidecars(tmp_path / "fold")
    assert not list((tmp_path / "fold").glob("*.feature_cache.pt"))
    cache.close()


def _overwrite(path: Path, **changes):
    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save(state, path)


MISMATCHES = {  # how to spoil the sidecar (or the new cache), and the reason the log line gives
    "capacity": (dict(capacity=4), None, "pool capacity 5 saved, 4 now"),
    "dtype": (dict(dtype=torch.bfloat16), None, "feature dtype torch.float16 saved, torch.bfloat16 now"),
    "feature shape": ({}, lambda p: None, "feature shape (2, 4, 4, 4) saved, (3, 4, 4, 4) now"),
    "epoch": ({}, lambda p: _overwrite(p, epoch=1), "written at epoch 1, the checkpoint is at epoch 4"),
    "truncated": ({}, lambda p: p.write_bytes(p.read_bytes()[:200]), "unreadable or malformed: "),
    "foreign": ({}, lambda p: torch.save({"weights": torch.ones(2)}, p), "not a feature-cache file of this plugin"),
}


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_inconsistent_sidecar_is_ignored_with_one_log_line(tmp_path, case):
    new_cache, spoil, reason = MISMATCHES[case]
    checkpoint = tmp_path / "fold" / "checkpoint_latest.pth"
    save_sidecar(_used_cache(tmp_path), checkpoint, epoch=4)
    if spoil:
        spoil(sidecar_path(checkpoint))
    resumed = _cache(tmp_path, **new_cache)
    shape = (3, 4, 4, 4) if case == "feature shape" else SHAPE
    line = restore_sidecar(resumed, checkpoint, 4, shape)
    assert line.startswith("feature cache: checkpoint_latest.feature_cache.pt not used (") and reason in line, line
    assert line.endswith("); rebuilding the pool") and "\n" not in line
    assert len(resumed.pool) == 0 and resumed.steps == 0 and resumed.encoded_batches == 0


def test_missing_sidecar_rebuilds_and_stale_spill_folders_go(tmp_path):
    killed = tmp_path / "fold" / "fseft_feature_pool_abc"  # what a killed run leaves behind
    killed.mkdir(parents=True)
    (killed / "0.pt").write_bytes(b"x")
    resumed = _cache(tmp_path)
    line = restore_sidecar(resumed, tmp_path / "fold" / "checkpoint_latest.pth", 4, SHAPE)
    assert line == "feature cache: no saved pool next to checkpoint_latest.pth; rebuilding it"
    assert len(resumed.pool) == 0 and not list((tmp_path / "fold").glob("fseft_feature_pool_*"))


class Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_malicious_pickle_as_sidecar_is_not_run(tmp_path):
    checkpoint = tmp_path / "fold" / "checkpoint_latest.pth"
    checkpoint.parent.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"format": Marker(marker)}, sidecar_path(checkpoint))
    line = restore_sidecar(_cache(tmp_path), checkpoint, 1, SHAPE)
    assert "not used (unreadable or malformed: UnpicklingError)" in line and not marker.exists()
    pickle.loads(pickle.dumps(Marker(marker)))  # the payload is live
    assert marker.exists()


# ------------------------------------------------------------------------------------------------------------
# through nnU-Net's loop: a cached linear probe interrupted after 2 of 3 epochs, then resumed as --c does
# ------------------------------------------------------------------------------------------------------------

class Interrupted(Exception):
    pass


def _trainer_class():
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTLinearProbeTrainer

    class FSEFTLinearProbeTrainer_resumetest(FSEFTLinearProbeTrainer):
        epochs, iterations_per_epoch, val_iterations_per_epoch = 3, 4, 1  # save_every = 1: latest after 0 and 1
        feature_pool_size, feature_refresh_every = 6, 2
        feature_pool_memory_mb = 0.5  # a few samples in memory, the others spilled
        interrupt_after_epoch = None
        saved, started = {}, None  # fingerprints when each checkpoint was written / when training (re)started

        def save_checkpoint(self, filename):
            super().save_checkpoint(filename)
            if self.feature_cache is not None:
                self.saved[os.path.basename(filename)] = fingerprint(self.feature_cache)

        def on_train_start(self):
            super().on_train_start()
            self.started = fingerprint(self.feature_cache)

        def on_epoch_end(self):
            super().on_epoch_end()
            if self.current_epoch - 1 == self.interrupt_after_epoch:  # after that epoch's checkpoints
                raise Interrupted()

        def perform_actual_validation(self, save_probabilities: bool = False):
            pass

    return FSEFTLinearProbeTrainer_resumetest


@pytest.fixture(scope="module")
def interrupted(nnunet_env):
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset

    write_phantom_dataset(nnunet_env / "raw", 952, "Resume", ["spleen"], 4, shape=(24, 24, 24), seed=0)
    plan_with_preset(952, "tiny", num_processes=1)
    pre = nnunet_env / "pre" / "Dataset952_Resume"
    cases = sorted(p.stem for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl"))
    (pre / "splits_final.json").write_text(json.dumps([{"train": cases[:3], "val": cases[3:]}]))
    args = (json.loads((pre / "nnUNetPlans.json").read_text()), "3d_fullres", 0,
            json.loads((pre / "dataset.json").read_text()))
    cls = _trainer_class()
    trainer = _new(cls, args, resume=False)
    trainer.interrupt_after_epoch = 1
    with pytest.raises(Interrupted):
        trainer.run_training()
    fold = Path(trainer.output_folder)
    assert (fold / "checkpoint_latest.pth").is_file() and (fold / "checkpoint_latest.feature_cache.pt").is_file()
    assert list(fold.glob("fseft_feature_pool_*")), "the test needs spilled samples"
    return cls, args, fold, dict(cls.saved)


def _new(cls, args, resume=True):
    """A trainer as nnU-Net's run_training builds it (it passes --c in the plans, which the trainer pops)."""
    plans, configuration, fold, dataset_json = args
    return cls(dict(plans, continue_training=resume), configuration, fold, dataset_json, device=torch.device("cpu"))


def _log(trainer) -> str:
    return Path(trainer.log_file).read_text()


def test_inconsistent_sidecar_is_ignored_by_the_trainer(interrupted, tmp_path):
    cls, args, fold, _ = interrupted
    trainer = _new(cls, args)
    trainer.feature_pool_size = 5
    shutil.copy(fold / "checkpoint_latest.pth", tmp_path / "checkpoint_latest.pth")
    shutil.copy(fold / "checkpoint_latest.feature_cache.pt", tmp_path / "checkpoint_latest.feature_cache.pt")
    trainer.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    trainer.on_train_start()
    trainer.feature_cache.close()
    assert ("feature cache: checkpoint_latest.feature_cache.pt not used (pool capacity 6 saved, 5 now); "
            "rebuilding the pool") in _log(trainer)
    assert trainer.started["samples"] == [] and trainer.started["steps"] == 0


def test_missing_sidecar_rebuilds_the_pool(interrupted, tmp_path):
    cls, args, fold, _ = interrupted
    trainer = _new(cls, args)
    shutil.copy(fold / "checkpoint_latest.pth", tmp_path / "checkpoint_latest.pth")
    trainer.load_checkpoint(str(tmp_path / "checkpoint_latest.pth"))
    trainer.on_train_start()
    trainer.feature_cache.close()
    assert "feature cache: no saved pool next to checkpoint_latest.pth; rebuilding it" in _log(trainer)
    assert trainer.started["samples"] == [] and trainer.started["steps"] == 0


def test_resume_restores_the_pool_and_finishes(interrupted):
    """What nnUNetv2_train ... --c does: load checkpoint_latest.pth, then run_training()."""
    cls, args, fold, saved = interrupted
    trainer = _new(cls, args)
    trainer.load_checkpoint(str(fold / "checkpoint_latest.pth"))
    assert trainer.current_epoch == 2
    trainer.run_training()
    expected = saved["checkpoint_latest.pth"]  # as written after epoch 1: 8 steps
    assert trainer.started == expected and len(expected["samples"]) == 6
    assert (expected["steps"], expected["encoded_batches"], expected["oldest"]) == (8, 5, 4)
    log = _log(trainer)
    assert ("feature cache: restored 6 samples from checkpoint_latest.feature_cache.pt (8 steps, "
            "5 trunk passes so far)") in log
    assert "feature cache: 7 trunk passes in 12 steps" in log  # the counters went on from the interrupted run
    assert (fold / "checkpoint_final.pth").is_file() and not list(fold.glob("*.feature_cache.pt"))
    assert not list(fold.glob("fseft_feature_pool_*")) and not list(fold.glob("*.tmp*"))
