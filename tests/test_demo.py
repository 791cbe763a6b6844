"""nnUNetv2_fseft_demo: the quick story end to end as a subprocess (slow), and its refusals and report (fast)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_fseft.cli.demo import main as demo_main
from nnunetv2_fseft.demo import MARKER, plot, results_table

DEMO = Path(sys.executable).parent / "nnUNetv2_fseft_demo"


def _clean_env() -> dict:
    """The user's environment without nnU-Net's variables: the demo must set everything it needs itself."""
    return {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_") and k != "FSEFT_DEMO_TORCH_THREADS"}


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FSEFT_SLOW_TESTS") != "1", reason="minutes of nnU-Net training; set FSEFT_SLOW_TESTS=1")
def test_quick_demo_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    r = subprocess.run([str(DEMO), "--quick", "--workdir", str(workdir)], capture_output=True, text=True,
                       cwd=tmp_path, env=_clean_env(), timeout=3600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    for name in ("results.md", "results.json", "dice_vs_k.png", MARKER):
        assert (workdir / name).is_file(), name
    assert (workdir / "dice_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot:  {workdir / 'dice_vs_k.png'}" in r.stdout

    runs = json.loads((workdir / "results.json").read_text())["runs"]
    methods = {run["method"] for run in runs}
    assert {"linear probe", "decoder + encoder LoRA", "from scratch (nnU-Net)"} <= methods
    assert sorted({run["k"] for run in runs}) == [1, 5]
    for run in runs:
        assert 0.0 <= run["dice"] <= 1.0, run
        assert run["trainable_parameters"] > 0, run
        assert run["file_bytes"] > 0, run
    adapters = [run for run in runs if run["trainer"].startswith("FSEFT")]
    assert adapters and all(run["file"] == "adapter.safetensors" for run in adapters)
    # a PEFT method trains far fewer parameters than the stock baseline
    scratch = next(run for run in runs if run["trainer"].startswith("nnUNetTrainer"))
    assert all(run["trainable_parameters"] < scratch["trainable_parameters"] for run in adapters)
    table = (workdir / "results.md").read_text()
    assert table.count("| linear probe |") == 2 and "dice_vs_k.png" in table
    for run in runs:  # every nnU-Net step left its log
        assert (workdir / "logs" / f"adapt_{run['trainer']}_K{run['k']}.log").is_file()

    # a second run reuses every finished step
    again = subprocess.run([str(DEMO), "--quick", "--workdir", str(workdir)], capture_output=True, text=True,
                           cwd=tmp_path, env=_clean_env(), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("(done earlier)") == 5 + len(runs)


def _run_main(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        demo_main(argv)
    err = capsys.readouterr().err
    return exit_info.value.code, err


def test_refuses_a_folder_that_is_not_a_demo(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    code, err = _run_main(["--quick", "--workdir", str(tmp_path), "--overwrite"], capsys)
    assert code == 2 and "is not a demo folder" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_refuses_other_options_without_overwrite(tmp_path, capsys):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / MARKER).write_text(json.dumps({"tool": "nnUNetv2_fseft_demo", "version": 1,
                                              "settings": {"schedule": "demo", "data": None}}))
    code, err = _run_main(["--quick", "--workdir", str(workdir)], capsys)
    assert code == 2 and "other options" in err and "--overwrite" in err


@pytest.mark.parametrize("argv, message", [
    (["--data", "5"], "at least two ids"),
    (["--data", "5", "5"], "also listed as a foundation"),
    (["--jobs", "0"], "--jobs"),
])
def test_bad_arguments_are_one_line(tmp_path, capsys, argv, message):
    code, err = _run_main(argv + ["--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_data_mode_needs_nnunet_raw(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    code, err = _run_main(["--data", "1", "2", "--workdir", str(tmp_path / "w")], capsys)
    assert code == 2 and "nnUNet_raw" in err


def test_report_table_and_plot(tmp_path):
    records = [{"method": m, "trainer": f"{t}_demo", "k": k, "dice": d, "trainable_parameters": p,
                "file_bytes": b, "file": f, "train_s": 12.0, "predict_s": 5.0}
               for m, t, p, b, f in (("linear probe", "FSEFTLinearProbeTrainer", 18, 400, "adapter.safetensors"),
                                     ("from scratch (nnU-Net)", "nnUNetTrainer", 351388, 4_300_000,
                                      "checkpoint_final.pth"))
               for k, d in ((1, 0.25), (5, 0.5))]
    table = results_table(records)
    assert table.count("\n") == 1 + len(records)
    assert "| linear probe | FSEFTLinearProbeTrainer_demo | 5 | 0.500 | 18 | 400 B (adapter.safetensors) |" in table
    assert "4.3 MB (checkpoint_final.pth)" in table
    png = plot(records, tmp_path / "p.png", "test")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_report_table_has_a_column_per_class_for_a_multi_class_target():
    records = [{"method": "LoRA", "trainer": "FSEFTLoRATrainer_demo", "k": 1, "dice": 0.5,
                "dice_per_class": {"liver": 0.9, "pancreas": 0.1}, "trainable_parameters": 10, "file_bytes": 100,
                "file": "adapter.safetensors", "train_s": 1.0, "predict_s": 1.0}]
    table = results_table(records)
    assert "| Dice (query) | liver | pancreas |" in table
    assert "| 1 | 0.500 | 0.900 | 0.100 | 10 |" in table
