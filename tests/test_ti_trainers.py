"""Transductive (TI) trainers: tiling, the TI step on a toy network (zero inside the band, gradient towards it,
unbiased tile gradient), name lookup through nnU-Net, the size prior from supports only, and training that is
identical when the query cases' labels are corrupted (CPU, tiny)."""
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_fseft.losses.size_prior import SizePriorLoss, estimate_class_sizes
from nnunetv2_fseft.training.transductive import QuerySet, TransductiveMixin, tile_grid

TRAINERS_DIR = Path(__file__).resolve().parents[1] / "trainers"
DATASET_ID, NAME = 991, "Dataset991_TIPhantom"
TEST_TRAINER = "FSEFTLoRATITrainer_citest"
EXT_MODULE = f'''
from nnunetv2_fseft_trainers.fseft_ti_trainers import FSEFTLoRATITrainer


class {TEST_TRAINER}(FSEFTLoRATITrainer):
    epochs, iterations_per_epoch, val_iterations_per_epoch = 2, 2, 1
    ti_warmup_epochs = 1  # epoch 0 supervised only, epoch 1 with the size prior
'''


# ---------------------------------------------------------------- tiling

@pytest.mark.parametrize("shape, patch", [((7, 20, 33), (4, 8, 16)), ((3, 5, 5), (4, 8, 8)), ((8, 8, 8), (4, 4, 4)),
                                          ((1, 9, 10), (1, 4, 4))])
def test_tiles_own_every_voxel_exactly_once(shape, patch):
    owned = np.zeros(shape, int)
    for read, own, pad in tile_grid(shape, patch):
        for r, o, p, length, ps in zip(read, own, pad, shape, patch):
            assert 0 <= r.start and r.stop <= length and (r.stop - r.start) + p == ps  # a full patch after padding
            assert o.stop <= r.stop - r.start                                          # padding is never owned
        owned[tuple(slice(r.start + o.start, r.start + o.stop) for r, o in zip(read, own))] += 1
    assert (owned == 1).all()


# ---------------------------------------------------------------- the TI step on a toy network

class Toy(TransductiveMixin):
    """Just what the TI step needs of a trainer. A 1x1 conv sees in a tile exactly what it sees in the image."""

    def __init__(self, image, patch, sizes, nonlin="softmax", out_channels=3):
        conv = torch.nn.Conv2d if len(patch) == 2 else torch.nn.Conv3d
        torch.manual_seed(0)
        self.network, self.device, self.current_epoch, self.num_epochs = conv(1, out_channels, 1), torch.device("cpu"), 0, 20
        self._ti_queries = QuerySet({"q": image}, patch, voxel_volume_mm3=2.0)
        self._ti_prior = SizePriorLoss(torch.as_tensor(sizes, dtype=torch.float32), gamma=0.3, nonlin=nonlin)
        self._ti_rng = np.random.default_rng(0)

    def whole_image_sizes(self, grad=False):
        image = torch.from_numpy(np.asarray(self._ti_queries.images["q"], np.float32))
        with torch.set_grad_enabled(grad):
            if self._ti_queries.two_d:  # slices as a batch, summed
                return self._ti_prior.predicted_sizes(self.network(image[0][:, None]), 2.0).sum(0, keepdim=True)
            return self._ti_prior.predicted_sizes(self.network(image[None]), 2.0)

    def tile_loss(self, picks):
        loss, fresh = self.ti_loss(self.network(self._ti_queries.batch(picks, "cpu")), picks)
        for (q, t), row in zip(picks, fresh.double().numpy()):
            self._ti_cache[q][t] = row
        return loss


IMAGE = np.random.default_rng(0).normal(0, 1, (1, 7, 20, 33)).astype(np.float32)


@pytest.mark.parametrize("patch", [(4, 8, 16), (8, 16)])
def test_query_pass_adds_tiles_up_to_the_whole_image(patch):
    toy = Toy(IMAGE, patch, [1.0, 1.0])
    toy.ti_refresh()
    assert len(toy._ti_cache["q"]) == toy._ti_queries.n_tiles("q") > 1
    np.testing.assert_allclose(toy._ti_cache["q"].sum(0), toy.whole_image_sizes()[0].numpy(), rtol=1e-5)


def test_warmup_is_a_fraction_of_the_epochs_unless_given():
    toy = Toy(IMAGE, (4, 8, 16), [1.0, 1.0])
    assert toy.ti_warmup() == 10 and not toy.ti_active()
    toy.current_epoch = 10
    assert toy.ti_active()
    toy.ti_warmup_epochs = 12
    assert not toy.ti_active()


def test_ti_term_is_zero_inside_the_band():
    toy = Toy(IMAGE, (4, 8, 16), [1.0, 1.0])
    toy._ti_prior.sizes_mm3[:] = toy.whole_image_sizes()[0] * torch.tensor([1.2, 0.8])  # S_hat within S +- 30%
    toy.ti_refresh()
    for t in range(toy._ti_queries.n_tiles("q")):
        toy.network.zero_grad()
        loss = toy.tile_loss([("q", t)])
        loss.backward()
        assert loss.item() == 0.0
        assert all(float(p.grad.abs().max()) == 0.0 for p in toy.network.parameters())


@pytest.mark.parametrize("nonlin, out_channels", [("softmax", 3), ("sigmoid", 2)])
def test_tile_gradient_is_an_unbiased_whole_image_gradient(nonlin, out_channels):
    """Mean over the tiles of the one-tile TI gradient == gradient of the whole-image penalty."""
    toy = Toy(IMAGE, (4, 8, 16), [1.0, 1.0], nonlin, out_channels)
    s_hat = toy.whole_image_sizes()[0]
    toy._ti_prior.sizes_mm3[:] = s_hat * torch.tensor([3.0, 0.25])  # class 1 below the band, class 2 above
    toy.ti_refresh()
    n = toy._ti_queries.n_tiles("q")
    grads = []
    for t in range(n):
        toy.network.zero_grad()
        toy.tile_loss([("q", t)]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in toy.network.parameters()]))
    toy.network.zero_grad()
    whole = toy._ti_prior.penalty(toy.whole_image_sizes(grad=True))
    whole.backward()
    expected = torch.cat([p.grad.flatten() for p in toy.network.parameters()])
    assert whole.item() > 0
    torch.testing.assert_close(torch.stack(grads).mean(0), expected, rtol=1e-4, atol=1e-7)
    # the value each tile reports is the whole-image penalty
    assert toy.tile_loss([("q", 0)]).item() == pytest.approx(whole.item(), rel=1e-5)


@pytest.mark.parametrize("factor", [3.0, 1 / 3.0])
@pytest.mark.parametrize("nonlin, out_channels, n_classes", [("softmax", 2, 1), ("sigmoid", 2, 2)])
def test_ti_steps_move_the_predicted_size_towards_the_band(factor, nonlin, out_channels, n_classes):
    """S = 3 x S_hat (prediction too small) or S_hat / 3 (too large): steps on random tiles alone move S_hat
    towards the band [0.7 S, 1.3 S] of every class and lower the whole-image penalty."""
    toy = Toy(IMAGE, (4, 8, 16), [1.0] * n_classes, nonlin, out_channels)
    prior = toy.whole_image_sizes()[0] * factor
    toy._ti_prior.sizes_mm3[:] = prior
    optimizer = torch.optim.SGD(toy.network.parameters(), lr=0.5)
    toy.ti_refresh()
    start = toy._ti_prior.penalty(toy.whole_image_sizes()).item()
    for step in range(20):
        optimizer.zero_grad()
        toy.tile_loss(toy.ti_sample()).backward()
        optimizer.step()
        if step % 5 == 4:  # as in training: the pass refreshes every tile, the sampled tiles update in between
            toy.ti_refresh()
    ratio = toy.whole_image_sizes()[0] / prior
    assert toy._ti_prior.penalty(toy.whole_image_sizes()).item() < start
    assert ((ratio > 1 / factor + 0.05) if factor > 1 else (ratio < 1 / factor - 0.05)).all(), ratio


# ---------------------------------------------------------------- nnU-Net finds a TI trainer per method

def test_all_ti_trainers_resolve_through_nnunet(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    from nnunetv2_fseft.peft import METHODS
    from nnunetv2_fseft.trainer_names import plugin_trainers
    monkeypatch.setenv("nnUNet_extTrainer", str(TRAINERS_DIR))
    trainers = plugin_trainers()
    ti_names = [n for n, c in trainers.items() if issubclass(c, TransductiveMixin)]
    assert sorted(trainers[n].peft_method for n in ti_names) == sorted(METHODS)  # one TI twin per method
    for name in ti_names:
        cls = recursive_find_trainer_class_by_name(name)
        parent = trainers[name[:-len("TITrainer")] + "Trainer"]
        assert cls.__name__ == name and issubclass(cls, TransductiveMixin) and issubclass(cls, parent)
        assert (cls.peft_method, cls.learning_rate) == (parent.peft_method, parent.learning_rate)
        assert cls.mro().index(TransductiveMixin) < cls.mro().index(parent)


# ---------------------------------------------------------------- a planned few-shot dataset

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from nnunetv2_fseft.data.fewshot import write_fewshot_splits
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    root = tmp_path_factory.mktemp("ti")
    (root / "ext").mkdir()
    (root / "ext" / "ti_citest_trainers.py").write_text(EXT_MODULE)
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        mp.setenv("nnUNet_extTrainer", os.pathsep.join([str(TRAINERS_DIR), str(root / "ext")]))
        for var, value in (("nnUNet_n_proc_DA", "0"), ("nnUNet_compile", "0"), ("nnUNet_def_n_proc", "1")):
            mp.setenv(var, value)
        write_phantom_dataset(root / "nnUNet_raw", DATASET_ID, "TIPhantom", ["liver", "spleen"], 6, seed=0)
        plan_with_preset(DATASET_ID, "tiny", num_processes=1)
        table = write_fewshot_splits(DATASET_ID, [2], 1, n_query=3)
        yield root, table["folds"][0]["train"], table["query"]


def _trainer():
    from nnunetv2.run.run_training import get_trainer_from_args
    return get_trainer_from_args(str(DATASET_ID), "3d_fullres", 0, TEST_TRAINER, device=torch.device("cpu"))


def _raw_label(root, case):
    image = sitk.ReadImage(str(root / "nnUNet_raw" / NAME / "labelsTr" / f"{case}.nii.gz"))
    return sitk.GetArrayFromImage(image), image.GetSpacing()


def test_size_prior_comes_from_the_supports_only(planned, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    root, supports, queries = planned
    loaded = []
    original = nnUNetDatasetBlosc2.load_case
    monkeypatch.setattr(nnUNetDatasetBlosc2, "load_case", lambda self, k: loaded.append(k) or original(self, k))
    trainer = _trainer()
    trainer.initialize()
    trainer.ti_setup()
    assert sorted(loaded) == sorted(supports)  # nnU-Net's loader (labels + properties) only for the supports
    assert trainer._ti_queries.ids == sorted(queries)

    expected = estimate_class_sizes([_raw_label(root, c) for c in supports], [1, 2])
    assert trainer.ti_sizes_mm3 == pytest.approx(expected, rel=1e-6)
    with_queries = estimate_class_sizes([_raw_label(root, c) for c in supports + queries], [1, 2])
    assert trainer.ti_sizes_mm3[1] != pytest.approx(with_queries[1], rel=1e-3)
    # physical volume: liver ~ (4/3) pi (0.22 * 32 * 1.5)^2 (0.20 * 32 * 1.5) mm^3 = 4.5 ml, give or take the jitter
    assert 3_000 < trainer.ti_sizes_mm3[1] < 7_000


def _corrupt_query_labels(root, queries):
    """Every label-derived file of the query cases: preprocessed label maps, gt_segmentations, raw labelsTr, and
    the class locations in the properties (same counts, so nnU-Net's own val loader draws the same random numbers)."""
    import blosc2
    rng = np.random.default_rng(123)
    pre = root / "nnUNet_preprocessed" / NAME
    for case in queries:
        seg_file = pre / "nnUNetPlans_3d_fullres" / f"{case}_seg.b2nd"
        seg = blosc2.open(str(seg_file), mode="r")[:]
        seg_file.unlink()
        blosc2.asarray(rng.integers(0, 3, seg.shape).astype(seg.dtype), urlpath=str(seg_file), mode="w")
        pkl = pre / "nnUNetPlans_3d_fullres" / f"{case}.pkl"
        properties = pickle.loads(pkl.read_bytes())
        for k, v in properties["class_locations"].items():
            fake = np.concatenate([np.zeros((len(v), 1), v.dtype),
                                   rng.integers(0, np.array(seg.shape[1:]), (len(v), 3))], 1)
            properties["class_locations"][k] = fake
        pkl.write_bytes(pickle.dumps(properties))
        for label_file in (pre / "gt_segmentations" / f"{case}.nii.gz",
                           root / "nnUNet_raw" / NAME / "labelsTr" / f"{case}.nii.gz"):
            image = sitk.ReadImage(str(label_file))
            noise = sitk.GetImageFromArray(rng.integers(0, 3, image.GetSize()[::-1]).astype(np.uint8))
            noise.CopyInformation(image)
            sitk.WriteImage(noise, str(label_file))


def _train():
    import random
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    trainer = _trainer()
    trainer.run_training()
    weights = {k: v.detach().clone() for k, v in trainer.plain_network().state_dict().items()}
    return trainer, weights


def test_training_is_identical_when_query_labels_are_corrupted(planned, monkeypatch, tmp_path):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger
    root, supports, queries = planned
    monkeypatch.setattr(MetaLogger, "plot_progress_png", lambda self, folder: None)  # seconds per epoch on CPU
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backups = [(root / "nnUNet_preprocessed" / NAME, tmp_path / "pre"),
               (root / "nnUNet_raw" / NAME / "labelsTr", tmp_path / "labelsTr")]
    for src, dst in backups:
        shutil.copytree(src, dst)
    try:
        clean, clean_weights = _train()
        assert clean.ti_epoch_penalty > 0  # the size prior was active (a random head is far outside the band)
        _corrupt_query_labels(root, queries)
        corrupted, corrupted_weights = _train()
    finally:
        torch.set_num_threads(threads)
        for src, dst in backups:
            shutil.rmtree(src)
            shutil.copytree(dst, src)

    assert corrupted.ti_sizes_mm3 == clean.ti_sizes_mm3
    assert corrupted.ti_epoch_penalty == clean.ti_epoch_penalty
    assert corrupted.logger.get_value("train_losses", None) == clean.logger.get_value("train_losses", None)
    assert clean_weights.keys() == corrupted_weights.keys()
    for k in clean_weights:
        assert torch.equal(clean_weights[k], corrupted_weights[k]), k
    # the corruption was real: nnU-Net's own validation pass (pseudo-Dice on the query labels) saw other labels
    assert corrupted.logger.get_value("mean_fg_dice", None) != clean.logger.get_value("mean_fg_dice", None)
