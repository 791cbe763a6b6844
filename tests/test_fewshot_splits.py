"""K-shot splits: fold layout, refusals, class warnings, CLI errors, and nnU-Net's own do_split on the result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_fseft.cli.fewshot_splits import main as cli_main
from nnunetv2_fseft.data.fewshot import BACKUP_SUFFIX, write_fewshot_splits
from nnunetv2_fseft.errors import FSEFTError

NAME = "Dataset987_FewShotTiny"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(arr, path, spacing=(1.0, 1.0, 1.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


def make_raw_dataset(root: Path, n_cases=8, shape=(16, 16, 16), with_images=False, lacking_b=(3,)):
    """Tiny nnU-Net raw dataset: organ_a in every case, organ_b missing from the cases in lacking_b."""
    d = root / NAME
    (d / "labelsTr").mkdir(parents=True)
    (d / "imagesTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        seg = np.zeros(shape, np.uint8)
        seg[2:8, 2:8, 2:8] = 1
        if i not in lacking_b:
            seg[10:13, 10:13, 10:13] = 2
        _write(seg, d / "labelsTr" / f"case_{i:03d}.nii.gz")
        if with_images:
            _write(rng.normal(0, 1, shape).astype(np.float32) + 3 * seg, d / "imagesTr" / f"case_{i:03d}_0000.nii.gz")
    (d / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ_a": 1, "organ_b": 2},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))
    return d


@pytest.fixture
def raw_env(tmp_path, monkeypatch):
    """Raw-only dataset (no preprocessing): case ids come from labelsTr."""
    make_raw_dataset(tmp_path / "raw")
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pp"), ("nnUNet_results", "res")):
        (tmp_path / sub).mkdir(exist_ok=True)
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "pp" / NAME


def test_folds_are_nested_supports_with_one_shared_query(raw_env, capsys):
    r = write_fewshot_splits(987, [5, 1, 3], 2, n_query=3)
    assert [(f["fold"], f["k"], f["seed"]) for f in r["folds"]] == [
        (0, 1, 0), (1, 1, 1), (2, 3, 0), (3, 3, 1), (4, 5, 0), (5, 5, 1)]
    assert r["source"] == "raw labelsTr" and len(r["query"]) == 3
    by = {(f["k"], f["seed"]): f["train"] for f in r["folds"]}
    for seed in (0, 1):
        assert by[(1, seed)] == by[(3, seed)][:1] and by[(3, seed)] == by[(5, seed)][:3]  # nested
        assert not set(by[(5, seed)]) & set(r["query"]) and len(set(by[(5, seed)])) == 5
    assert by[(5, 0)] != by[(5, 1)]  # seeds give different draws
    splits = json.loads((raw_env / "splits_final.json").read_text())
    assert splits == [{"train": f["train"], "val": r["query"]} for f in r["folds"]]
    saved = json.loads((raw_env / "fewshot_splits.json").read_text())
    assert saved["folds"] == r["folds"] and saved["query"] == r["query"]
    # deterministic, and re-running over our own splits needs no --overwrite
    assert write_fewshot_splits("Dataset987_FewShotTiny", [1, 3, 5], [0, 1], n_query=3)["folds"] == r["folds"]
    assert "replacing" not in capsys.readouterr().err


def test_later_k_and_seeds_are_appended_so_trained_folds_keep_their_meaning(raw_env, capsys):
    """fold_X of a trained model must stay the same (K, seed) when a later sitting asks for more."""
    first = write_fewshot_splits(987, [1, 3], [0], n_query=3)["folds"]
    assert write_fewshot_splits(987, [1], [0], n_query=3)["folds"] == first  # a subset changes nothing
    r = write_fewshot_splits(987, [1, 3, 5], [0, 2], n_query=3)
    assert r["folds"][:2] == first
    assert [(f["fold"], f["k"], f["seed"]) for f in r["folds"][2:]] == [(2, 1, 2), (3, 3, 2), (4, 5, 0), (5, 5, 2)]
    assert r["ks"] == [1, 3, 5] and r["seeds"] == [0, 2]
    by = {(f["k"], f["seed"]): f["train"] for f in r["folds"]}
    assert by[(1, 0)] == by[(5, 0)][:1] and by[(3, 2)] == by[(5, 2)][:3]  # still nested across sittings
    assert "replacing" not in capsys.readouterr().err
    splits = json.loads((raw_env / "splits_final.json").read_text())
    assert splits == [{"train": f["train"], "val": r["query"]} for f in r["folds"]]
    # another query set moves the supports: the earlier folds cannot be kept
    with pytest.raises(FSEFTError, match="would change the earlier folds"):
        write_fewshot_splits(987, [1], [0], n_query=2, keep_earlier=True)
    assert json.loads((raw_env / "splits_final.json").read_text()) == splits  # refused: nothing written
    assert len(write_fewshot_splits(987, [1], [0], n_query=2)["folds"]) == 1  # replaced, and said
    assert "replacing the earlier few-shot splits" in capsys.readouterr().err


def test_refuses_more_cases_than_exist(raw_env):
    with pytest.raises(FSEFTError, match=r"has 8 cases .* K can be at most 4 or with K=5 at most 3 query"):
        write_fewshot_splits(987, [1, 5], 3, n_query=4)
    with pytest.raises(FSEFTError, match="--query"):
        write_fewshot_splits(987, [1], 3)
    with pytest.raises(FSEFTError, match="dataset 986"):
        write_fewshot_splits(986, [1], 3, n_query=2)
    assert not (raw_env / "splits_final.json").exists()


def test_query_file_pins_the_query(raw_env, tmp_path):
    qf = tmp_path / "query.json"
    qf.write_text(json.dumps(["case_007", "case_000"]))
    r = write_fewshot_splits(987, [1, 2], 3, query_file=str(qf))
    assert r["query"] == ["case_000", "case_007"] and r["query_seed"] is None
    assert all(not set(f["train"]) & {"case_000", "case_007"} for f in r["folds"])
    with pytest.raises(FSEFTError, match="disagrees"):
        write_fewshot_splits(987, [1], 3, n_query=5, query_file=str(qf))
    qf.write_text(json.dumps(["case_000", "nope_1"]))
    with pytest.raises(FSEFTError, match="nope_1"):
        write_fewshot_splits(987, [1], 3, query_file=str(qf))


def test_does_not_replace_a_foreign_split_without_overwrite(raw_env):
    raw_env.mkdir(parents=True)
    foreign = [{"train": ["case_000"], "val": ["case_001"]}]
    (raw_env / "splits_final.json").write_text(json.dumps(foreign))
    with pytest.raises(FSEFTError, match="--overwrite"):
        write_fewshot_splits(987, [1], 2, n_query=2)
    assert json.loads((raw_env / "splits_final.json").read_text()) == foreign
    write_fewshot_splits(987, [1], 2, n_query=2, overwrite=True)
    assert json.loads((raw_env / ("splits_final.json" + BACKUP_SUFFIX)).read_text()) == foreign
    # someone edits our file afterwards: it is no longer ours
    (raw_env / "splits_final.json").write_text(json.dumps(foreign))
    with pytest.raises(FSEFTError, match="not written by this tool"):
        write_fewshot_splits(987, [1], 2, n_query=2)


def test_warns_once_per_support_lacking_a_class(raw_env, tmp_path, capsys):
    qf = tmp_path / "query.json"
    qf.write_text(json.dumps(["case_000", "case_001"]))
    r = write_fewshot_splits(987, [6], [0, 1], query_file=str(qf))  # all 6 others, case_003 included, are supports
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "case_003" in err[0] and "organ_b" in err[0] and "warning" in err[0]
    assert r["missing_classes"] == {"case_003": ["organ_b"]}
    write_fewshot_splits(987, [6], [0, 1], query_file=str(qf), target_class="Organ A")  # restricted: no warning
    assert capsys.readouterr().err == ""
    with pytest.raises(FSEFTError, match="organ_a, organ_b"):
        write_fewshot_splits(987, [6], [0, 1], query_file=str(qf), target_class="liver")


def test_cli_prints_table_and_errors_are_one_line(raw_env, capsys):
    assert cli_main(["-d", "987", "-k", "1", "2", "--seeds", "2", "--query", "3"]) == 0
    out = capsys.readouterr().out
    assert "fold" in out and "query (3 cases" in out and "splits_final.json (4 folds)" in out
    with pytest.raises(SystemExit) as e:
        cli_main(["-d", "987", "-k", "9", "--query", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("nnunetv2_fseft: error:") and "Traceback" not in err


def test_data_module_does_not_import_torch(raw_env):
    code = ("import sys; from nnunetv2_fseft.data.fewshot import write_fewshot_splits; "
            "write_fewshot_splits(987, [1], 1, n_query=2); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))


@pytest.mark.skipif(not (SHARED_DATA / "hippocampus").is_dir(), reason="real data (../shared/data) not available")
def test_real_hippocampus_raw(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_raw", str(SHARED_DATA / "hippocampus"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    r = write_fewshot_splits(4, [1, 5, 10], 3, n_query=20)
    assert len(r["folds"]) == 9 and len(r["query"]) == 20
    assert r["missing_classes"] == {} and capsys.readouterr().err == ""
    assert (tmp_path / "Dataset004_Hippocampus" / "splits_final.json").is_file()


def test_nnunet_do_split_returns_supports_and_query(tmp_path, monkeypatch):
    """Plan+preprocess a tiny dataset with nnU-Net, write our splits, ask nnU-Net's trainer for each fold."""
    make_raw_dataset(tmp_path / "raw", with_images=True)
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pp"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_def_n_proc="1")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, env[var])
    # nnU-Net 2.8.1's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for 0
    env.pop("nnUNet_n_proc_DA", None)
    exe = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    subprocess.run([str(exe), "-d", "987", "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    r = write_fewshot_splits(987, [1, 3], 2, n_query=3)
    assert r["source"] == "preprocessed"

    import torch
    from nnunetv2.run.run_training import get_trainer_from_args
    for f in r["folds"]:
        trainer = get_trainer_from_args("987", "3d_fullres", f["fold"], "nnUNetTrainer", device=torch.device("cpu"))
        tr, val = trainer.do_split()
        assert list(tr) == f["train"] and list(val) == r["query"]
