"""Zero-shot baseline and the benchmark harness, on tiny phantoms through nnU-Net's own commands."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from nnunetv2_fseft.benchmark.config import load_config
from nnunetv2_fseft.benchmark.runner import prepare, run_benchmark
from nnunetv2_fseft.cli import benchmark as benchmark_cli
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.synthetic import write_phantom_dataset
from md_tables import row, table_with, tables
from phantom_world import foundation_and_target

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def world(nnunet_env):
    return {"root": nnunet_env, "foundation": foundation_and_target(nnunet_env, 931, 932, prefix="B")}


def _config(world, tmp_path, **extra) -> Path:
    config = {"dataset": 932, "foundation": str(world["foundation"]), "k": [1, 2], "seeds": [0], "query": 3,
              "methods": ["zeroshot", "scratch", "FSEFTLinearProbeTrainer_test"],
              "scratch_trainer": "FSEFTScratchTrainer_test", "output": "out"}
    config.update(extra)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(config))
    return path


def test_zeroshot_keeps_the_foundation_logit_of_a_shared_class_and_never_predicts_a_new_one(world):
    from nnunetv2_fseft.networks import build_plain_network
    from nnunetv2_fseft.zeroshot import build_zeroshot_model
    folder = build_zeroshot_model(world["foundation"], 932, fold=0, overwrite=True)
    plans = json.loads((folder / "plans.json").read_text())
    checkpoint = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer"  # stock nnU-Net predicts with it
    foundation_ckpt = torch.load(world["foundation"] / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                                 weights_only=False)
    target = build_plain_network(plans, "3d_fullres", json.loads((folder / "dataset.json").read_text())).eval()
    found = build_plain_network(plans, "3d_fullres", foundation_ckpt["init_args"]["dataset_json"]).eval()
    target.load_state_dict(checkpoint["network_weights"])
    found.load_state_dict(foundation_ckpt["network_weights"])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        t, f = target(x), found(x)
    # target (background, spleen, pancreas) <- foundation (background, liver, spleen)
    assert torch.equal(t[:, 0], f[:, 0]) and torch.equal(t[:, 1], f[:, 2])
    assert (t.argmax(1) != 2).all()  # pancreas: never seen, never predicted
    assert "'spleen' <- foundation" in (folder / "fold_0" / "zeroshot.log").read_text()


def test_zeroshot_command_prints_the_dice_of_each_class(world, capsys):
    """nnU-Net's compute_metrics_on_folder2 returns None: the command reads the summary it wrote."""
    from nnunetv2_fseft.cli import zeroshot as zeroshot_cli
    zeroshot_cli.main(["-m", str(world["foundation"]), "-d", "932", "--overwrite"])
    out = capsys.readouterr().out
    assert "class 1: Dice" in out and "summary.json" in out


def test_zeroshot_refuses_a_target_without_a_shared_class(world):
    from nnunetv2_fseft.zeroshot import build_zeroshot_model
    write_phantom_dataset(world["root"] / "raw", 933, "BOther", ["pancreas"], 2, shape=(24, 24, 24), seed=3)
    with pytest.raises(FSEFTError, match="zero-shot needs shared class names"):
        build_zeroshot_model(world["foundation"], 933)


def test_benchmark_runs_every_cell_through_nnunet_and_resumes(world, tmp_path, capsys):
    config = load_config(_config(world, tmp_path))
    seen = []

    def on_cell(done):  # the tables are current after every cell: an interrupted run keeps them
        seen.append([(r["method"], r["k"]) for r in done])
        assert done[-1]["method"] in [r["method"] for r in tables((config.output / "results.md").read_text())[0]]

    result = run_benchmark(config, progress=False, on_cell=on_cell)
    records = result["records"]
    # K-major within a seed (seed-major overall): every method is compared on K=1 before K=2 starts
    assert seen[-1] == [(m, k) for k in (1, 2) for m in ("zeroshot", "scratch", "FSEFTLinearProbeTrainer_test")]
    assert [len(s) for s in seen] == list(range(1, 7))
    assert {(r["method"], r["k"]) for r in records} == {(m, k) for m in ("zeroshot", "scratch",
                                                                         "FSEFTLinearProbeTrainer_test")
                                                        for k in (1, 2)}
    # Dice is nnU-Net's own evaluation of the shared query set, per class
    table = json.loads((world["root"] / "pre" / "Dataset932_BTarget" / "fewshot_splits.json").read_text())
    for r in records:
        if r["method"] == "zeroshot":
            continue
        trainer = "FSEFTScratchTrainer_test" if r["method"] == "scratch" else r["method"]
        fold = world["root"] / "res" / "Dataset932_BTarget" / f"{trainer}__nnUNetPlans__3d_fullres" / f"fold_{r['fold']}"
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        assert r["dice"] == summary["foreground_mean"]["Dice"]
        assert set(r["dice_per_class"]) == {"spleen", "pancreas"}
        assert sorted(p.name[:-7] for p in (fold / "validation").glob("*.nii.gz")) == sorted(table["query"])
        assert r["train_seconds"] > 0 and r["peak_rss_mb"] > 50
        logged = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
        assert r["train_losses"] == [round(float(v), 4) for v in logged["train_losses"]]  # one per epoch
    probe = [r for r in records if r["method"] == "FSEFTLinearProbeTrainer_test"]
    scratch = [r for r in records if r["method"] == "scratch"]
    assert 0 < probe[0]["trainable_parameters"] < scratch[0]["trainable_parameters"]
    assert 0 < probe[0]["adapter_bytes"] < probe[0]["checkpoint_bytes"] / 10
    for name in ("results.csv", "results.md", "dice_vs_k.png"):
        assert (config.output / name).stat().st_size > 0
    published = (config.output / "results.md").read_text()
    assert row(table_with(published, "K=2"), method="FSEFTLinearProbeTrainer_test")["K=2"]
    assert row(table_with(published, "epochs"), method="FSEFTLinearProbeTrainer_test", K="2")["last"]  # its curve

    # a re-run trains nothing and reports the same numbers
    mtimes = {p: p.stat().st_mtime for p in (world["root"] / "res").rglob("checkpoint_final.pth")}
    again = run_benchmark(config, progress=False, on_cell=on_cell)
    assert again["records"] == records and len(seen) == 6
    assert mtimes == {p: p.stat().st_mtime for p in (world["root"] / "res").rglob("checkpoint_final.pth")}


@pytest.mark.parametrize("change, message", [
    ({"methods": ["FSEFTNoSuchTrainer"]}, "unknown method/trainer 'FSEFTNoSuchTrainer'"),
    ({"k": [0]}, "k must be shot counts >= 1"),
    ({"colour": "red"}, "unknown key 'colour'"),
    ({"foundation": "/nonexistent/A__B__3d_fullres"}, "foundation checkpoint .* does not exist"),
    ({"methods": ["atlas"]}, "method 'atlas' needs \"unlabelled\""),
    ({"methods": ["FSEFTLoRATrainer+cotraining"], "unlabelled": "."}, "must be one of registration, self, both"),
])
def test_benchmark_bad_config_gives_one_line(world, tmp_path, capsys, change, message):
    with pytest.raises(SystemExit) as exit_info:
        benchmark_cli.main([str(_config(world, tmp_path, **change)), "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re
    assert re.search(message, err), err


def test_cells_are_paired_on_one_initialisation_per_seed(world, monkeypatch):
    """The harness runs each cell with nnUNet_fseft_seed=<seed>: every method of a seed starts from the same new
    head, so cached vs uncached or TI on vs off differ by the method only."""
    from nnunetv2_fseft.benchmark import cells
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTLinearProbeNoCacheTrainer, FSEFTLinearProbeTrainer
    seen = {}
    monkeypatch.setattr(cells, "run_logged", lambda cmd, log, env: seen.setdefault("seed", env["nnUNet_fseft_seed"]))
    config = load_config(_config(world, Path(world["root"])))
    cells.train_cell(config, "Dataset932_BTarget", cells.Cell("FSEFTLinearProbeTrainer", 1, 2, 7, "X"), Path("log"), {})
    assert seen["seed"] == "2"

    pre = world["root"] / "pre" / "Dataset931_BFound"
    plans, dataset_json = (json.loads((pre / n).read_text()) for n in ("nnUNetPlans.json", "dataset.json"))

    def initial_head(cls, seed):
        monkeypatch.setenv("nnUNet_fseft_seed", seed)
        # nnUNetv2_train adds continue_training to the plans and the trainer pops it
        trainer = cls(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json, device=CPU)
        trainer.initialize()
        return trainer.network.decoder.seg_layers[-1].weight.detach().clone()

    assert torch.equal(initial_head(FSEFTLinearProbeTrainer, "3"), initial_head(FSEFTLinearProbeNoCacheTrainer, "3"))
    assert not torch.equal(initial_head(FSEFTLinearProbeTrainer, "3"), initial_head(FSEFTLinearProbeTrainer, "4"))


def test_peak_rss_is_the_commands_own_not_the_drivers(tmp_path):
    """A forked child inherits its parent's peak RSS on Linux: a driver holding 600 MB must not make a command of a
    few MB look like 600 MB, and what the command allocates must show."""
    import sys
    from nnunetv2_fseft.benchmark.cells import run_logged
    held_mb, allocated_mb = 600, 300
    held = bytearray(held_mb * 2**20)
    held[::4096] = b"\1" * len(held[::4096])  # touch every page: resident
    small = run_logged([sys.executable, "-c", "pass"], tmp_path / "small.log", {})
    touch = f"b = bytearray({allocated_mb} * 2**20); b[::4096] = b'1' * len(b[::4096])"
    big = run_logged([sys.executable, "-c", touch], tmp_path / "big.log", {})
    del held
    assert small["peak_rss_mb"] < held_mb  # an interpreter that does nothing: not the driver's peak
    assert big["peak_rss_mb"] - small["peak_rss_mb"] >= 0.9 * allocated_mb  # what the command itself touched
    with pytest.raises(FSEFTError, match="exit code 3"):
        run_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "fail.log", {})


def test_learning_curves_table_reads_the_supports_loss_at_five_points_mean_over_seeds():
    from nnunetv2_fseft.benchmark.report import markdown
    curve = [1.0, 0.8, 0.6, 0.5, 0.4, 0.35, 0.3, 0.28, 0.26]  # 9 epochs: points at epochs 1, 3, 5, 7, 9
    records = [{"method": "M", "k": 5, "seed": s, "fold": s, "dice": 0.5, "dice_per_class": {"a": 0.5},
                "train_losses": [v + s / 10 for v in curve]} for s in (0, 2)]  # seeds 0.0 and 0.2 apart
    records.append({"method": "zeroshot", "k": 5, "seed": 0, "fold": 0, "dice": 0.1, "dice_per_class": {"a": 0.1}})
    curves = table_with(markdown(records, ["a"], "t"), "epochs")
    points = {k: float(v) for k, v in row(curves, method="M", K="5").items() if k not in ("method", "K")}
    assert points == pytest.approx({"epochs": 9, "first": 1.1, "25 %": 0.7, "50 %": 0.5, "75 %": 0.4, "last": 0.36,
                                    "last quarter": -0.04})
    assert "zeroshot" not in [r["method"] for r in curves]  # nothing trained, no curve
    assert not any("epochs" in t[0] for t in tables(markdown(records[2:], ["a"], "t")))  # nothing trained


def test_a_cell_on_fewer_seeds_than_the_table_says_how_many():
    from nnunetv2_fseft.benchmark.report import markdown
    records = [{"method": m, "k": 5, "seed": s, "fold": s, "dice": 0.5 + s / 10, "dice_per_class": {"a": 0.5}}
               for m, seeds in (("A", (0, 1, 2)), ("B", (0,)), ("C", (0, 2))) for s in seeds]
    rows = {r["method"]: r["K=5"] for r in tables(markdown(records, ["a"], "t"))[0]}
    assert rows["A"] == "0.600 ± 0.100"  # all of the table's seeds [0, 1, 2]: nothing added
    assert rows["B"] == "0.500 (1 seed)"
    assert rows["C"] == "0.600 ± 0.141 (2 seeds)"


def test_finished_cells_reads_the_records_and_trains_nothing(tmp_path, monkeypatch):
    from types import SimpleNamespace
    from nnunetv2_fseft.benchmark import runner
    from nnunetv2_fseft.errors import FSEFTError
    table = {"folds": [{"k": k, "seed": s, "fold": i} for i, (k, s) in enumerate([(1, 0), (5, 0)])]}
    monkeypatch.setattr(runner, "prepare", lambda config: ("D", {}, table))
    config = SimpleNamespace(output=tmp_path / "exp3", seeds=[0], ks=[1, 5], methods=["scratch", "M"],
                             scratch_trainer="S")
    (config.output / "cells").mkdir(parents=True)
    with pytest.raises(FSEFTError, match="no finished cells"):
        runner.finished_cells(config)
    for key in ("M_k5_s0", "scratch_k1_s0", "other_k1_s0"):
        (config.output / "cells" / f"{key}.json").write_text(json.dumps({"method": key.split("_k")[0]}))
    # a record from before learning curves were kept gets its curve from the cell's checkpoint, if there is one
    monkeypatch.setattr(runner, "model_folder", lambda config, name, trainer: tmp_path / name / trainer)
    (tmp_path / "D" / "S" / "fold_0").mkdir(parents=True)
    torch.save({"logging": {"train_losses": [1.0, 0.5]}}, tmp_path / "D" / "S" / "fold_0" / "checkpoint_final.pth")
    records = runner.finished_cells(config)
    assert [r["method"] for r in records] == ["scratch", "M"]  # the config's, in order
    assert [r["train_losses"] for r in records] == [[1.0, 0.5], None]


def test_a_stock_checkpoint_counts_each_parameter_once(tmp_path):
    """nnU-Net's state dict names conv weights several times (the network alias trap); the trainable-parameter
    column of a stock (from scratch) cell must still be the network's own count."""
    from nnunetv2_fseft.benchmark.cells import count_checkpoint_parameters
    from networks import tiny_unet
    network = tiny_unet()
    assert len(network.state_dict()) > len(list(network.parameters())) + len(list(network.buffers()))  # aliased
    torch.save({"network_weights": network.state_dict()}, tmp_path / "checkpoint_final.pth")
    assert count_checkpoint_parameters(tmp_path) == sum(p.numel() for p in network.parameters())


def test_nnunet_fine_tuning_baseline_gets_the_foundation_but_a_fresh_head(world, monkeypatch):
    """FSEFTnnUNetFTTrainer is nnU-Net's own fine-tuning: the harness hands it -pretrained_weights (scratch gets
    none), and nnU-Net's loader accepts the foundation for a target prepared with its plans, head excepted."""
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2_fseft.benchmark import cells
    from nnunetv2_fseft_trainers.fseft_trainers import FSEFTnnUNetFTTrainer
    commands = []
    monkeypatch.setattr(cells, "run_logged", lambda cmd, log, env: commands.append(cmd))
    config = load_config(_config(world, Path(world["root"])))
    for method, trainer in (("FSEFTnnUNetFTTrainer", "FSEFTnnUNetFTTrainer"), ("scratch", "FSEFTScratchTrainer")):
        cells.train_cell(config, "Dataset932_BTarget", cells.Cell(method, 1, 0, 0, trainer), Path("log"), {})
    assert commands[0][-2:] == ["-pretrained_weights", str(config.checkpoint)]
    assert "-pretrained_weights" not in commands[1]

    name, dataset_json, _ = prepare(config)  # the target, preprocessed with the foundation's plans
    plans = json.loads((world["root"] / "pre" / name / "nnUNetPlans.json").read_text())
    trainer = FSEFTnnUNetFTTrainer(dict(plans, continue_training=False), "3d_fullres", 0, dataset_json, device=CPU)
    trainer.initialize()
    head_before = trainer.network.decoder.seg_layers[-1].weight.detach().clone()
    load_pretrained_weights(trainer.network, str(config.checkpoint))
    foundation = torch.load(config.checkpoint, map_location="cpu", weights_only=False)["network_weights"]
    mine = trainer.network.state_dict()
    encoder = [k for k in foundation if k.startswith("encoder.")]
    assert encoder and all(torch.equal(mine[k], foundation[k]) for k in encoder)
    assert torch.equal(trainer.network.decoder.seg_layers[-1].weight, head_before)  # nnU-Net leaves the head


def test_a_grid_asked_for_after_a_partial_one_gets_every_k_seed_pair(world, tmp_path):
    """K=1 x seeds 0-1 then K=2 x seed 0 hold both K and both seeds, but not (K=2, seed 1): asking for the whole
    grid must add that fold rather than fail on it."""
    prepare(load_config(_config(world, tmp_path, k=[1], seeds=[0, 1])))
    prepare(load_config(_config(world, tmp_path, k=[2], seeds=[0])))
    _, _, table = prepare(load_config(_config(world, tmp_path, k=[1, 2], seeds=[0, 1])))
    assert {(k, s) for k in (1, 2) for s in (0, 1)} <= {(f["k"], f["seed"]) for f in table["folds"]}


def test_a_later_seed_gets_new_folds_beside_trained_ones_and_another_query_is_refused(world, tmp_path):
    """A later sitting adds seeds without moving a trained model's fold; a query change would, so it stops."""
    name, _, before = prepare(load_config(_config(world, tmp_path)))
    trained = world["root"] / "res" / name / "SomeTrainer__nnUNetPlans__3d_fullres" / "fold_0"
    trained.mkdir(parents=True)
    try:
        _, _, after = prepare(load_config(_config(world, tmp_path, seeds=[0, 1, 2])))
        assert after["folds"][:len(before["folds"])] == before["folds"]
        assert {(k, s) for k in (1, 2) for s in (0, 1, 2)} <= {(f["k"], f["seed"]) for f in after["folds"]}
        splits = (world["root"] / "pre" / name / "splits_final.json").read_text()
        with pytest.raises(FSEFTError, match=f"another query set.*move nnUNet_results/{name} away"):
            prepare(load_config(_config(world, tmp_path, query=2)))
        assert (world["root"] / "pre" / name / "splits_final.json").read_text() == splits
    finally:
        shutil.rmtree(trained.parent)


def test_atlas_and_pseudo_label_methods_run_as_cells(world, tmp_path):
    """'atlas' and 'TRAINER+registration' (nnUNetv2_fseft_pseudolabel) sit in the grid beside the other methods,
    scored on the same query cases by nnU-Net's evaluation."""
    raw = world["root"] / "raw" / "Dataset932_BTarget"
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    for image in sorted((raw / "imagesTr").iterdir())[:2]:  # the scans to segment may be the unlabelled pool
        shutil.copy(image, unlabelled)
    config = load_config(_config(world, tmp_path, k=[1], methods=["atlas", "FSEFTLinearProbeTrainer_test+registration"],
                                 unlabelled=str(unlabelled), pseudo_ids=940, output="pseudo_out"))
    records = run_benchmark(config, progress=False)["records"]
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"atlas", "FSEFTLinearProbeTrainer_test+registration"}
    assert by_method["atlas"]["trainable_parameters"] == 0 and 0 <= by_method["atlas"]["dice"] <= 1
    assert by_method["atlas"]["dice_per_class"]["spleen"] > 0.3  # registration finds the spleen with no training
    pseudo = by_method["FSEFTLinearProbeTrainer_test+registration"]
    assert 0 <= pseudo["dice"] <= 1 and pseudo["adapter_bytes"] > 0
    fold = pseudo["fold"]
    dataset = world["root"] / "pre" / "Dataset940_BTargetPseudoRegistration"
    assert json.loads((dataset / "splits_final.json").read_text())[0]["val"] == \
        json.loads((world["root"] / "pre" / "Dataset932_BTarget" / "splits_final.json").read_text())[fold]["val"]
