"""The benchmarks' CPU schedules (benchmarks/ext): nnU-Net finds them by name, as nnUNetv2_train -tr would, and
each is its method at the documented budget. The hippocampus shift is reproducible."""
import contextlib
import io
import os
from pathlib import Path

import pytest
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from md_tables import row, tables
from nnunetv2_fseft.trainer_names import trainers_folder
from nnunetv2_fseft_trainers import fseft_ti_trainers, fseft_trainers

EXT = Path(__file__).resolve().parents[1] / "benchmarks" / "ext"


def find(name: str):
    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
        return recursive_find_trainer_class_by_name(name)


@pytest.mark.parametrize("name, parent, iterations", [
    ("FSEFTLoRATrainer_hip", fseft_trainers.FSEFTLoRATrainer, 250),
    ("FSEFTLinearProbeTITrainer_hip", fseft_ti_trainers.FSEFTLinearProbeTITrainer, 250),
    ("FSEFTScratchTrainer_hip", fseft_trainers.FSEFTScratchTrainer, 250),
    ("FSEFTDecoderLoRATrainer_abd", fseft_trainers.FSEFTDecoderLoRATrainer, 250),
    ("FSEFTDecoderLoRATrainer_abdlong", fseft_trainers.FSEFTDecoderLoRATrainer, 1000),
])
def test_schedule_variants_are_found_and_keep_their_method(name, parent, iterations, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([trainers_folder(), str(EXT)]))
    trainer = find(name)
    # the same method and learning rate, only the budget differs (nnU-Net's search imports its own copy of the
    # plugin's modules, so compare by name)
    assert parent.__name__ in [c.__name__ for c in trainer.__mro__]
    assert trainer.learning_rate == parent.learning_rate
    assert trainer.epochs * trainer.iterations_per_epoch == iterations


def test_hippocampus_scanner_b_is_deterministic_per_case_and_leaves_the_source_alone(monkeypatch):
    import numpy as np
    monkeypatch.syspath_prepend(str(EXT.parent))
    from hippocampus_common import shift_intensities
    source = np.random.default_rng(0).uniform(0, 500, (12, 16, 10)).astype(np.float32)
    before = source.copy()
    a, again, other = (shift_intensities(source, c) for c in ("hippocampus_001", "hippocampus_001", "hippocampus_002"))
    assert np.array_equal(source, before)
    assert np.array_equal(a, again) and not np.array_equal(a, other)
    assert a.shape == source.shape and a.dtype == np.float32
    assert np.corrcoef(a.ravel(), source.ravel())[0, 1] > 0.5  # the same anatomy, another look


def test_hippocampus_tables_gather_every_finished_method_in_a_fixed_order(tmp_path, monkeypatch):
    # a sitting that runs one K or a few methods must not drop the other methods' rows from the published table
    monkeypatch.syspath_prepend(str(EXT.parent))
    from hippocampus_fewshot import table_methods
    for key in ("FSEFTLoRATITrainer_hip_k1_s0", "zeroshot_k5_s2", "FSEFTLoRATrainer_hip_k10_s0", "MyTrainer_k1_s0",
                "FSEFTLinearProbeTrainer_hip_k1_s1", "scratch_k1_s0", "FSEFTnnUNetFTTrainer_hip_k5_s0"):
        (tmp_path / f"{key}.json").write_text("{}")
    (tmp_path / "zeroshot.json").write_text("{}")  # the shared zero-shot evaluation is not a cell
    assert table_methods(tmp_path, short=True) == [
        "zeroshot", "scratch", "FSEFTnnUNetFTTrainer_hip", "FSEFTLinearProbeTrainer_hip", "FSEFTLoRATrainer_hip",
        "FSEFTLoRATITrainer_hip", "MyTrainer"]


def test_hippocampus_tables_go_to_the_results_folder_asked_for(tmp_path, monkeypatch):
    # a sitting on a new foundation publishes into its own folder and leaves the committed tables alone
    monkeypatch.syspath_prepend(str(EXT.parent))
    from hippocampus_fewshot import publish_tables
    committed = EXT.parent / "results" / "hippocampus_novel_1000its_cpu.md"
    before = committed.read_text() if committed.is_file() else None
    records = [{"method": "FSEFTLoRATrainer", "k": 1, "seed": 0, "fold": 0, "dice": 0.7,
                "dice_per_class": {"anterior": 0.7}}]
    publish_tables(tmp_path / "sitting", "novel", False, records, "python benchmarks/hippocampus_fewshot.py W")
    table = (tmp_path / "sitting" / "hippocampus_novel_1000its_cpu.md").read_text()
    assert row(tables(table)[0], method="FSEFTLoRATrainer")["K=1"] == "0.700"
    assert "python benchmarks/hippocampus_fewshot.py W" in table  # the command that made it
    assert (tmp_path / "sitting" / "hippocampus_novel_1000its_cpu.csv").is_file()
    assert (committed.read_text() if committed.is_file() else None) == before
