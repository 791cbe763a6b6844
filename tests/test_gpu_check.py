"""benchmarks/gpu_check.py in its CPU smoke mode (--device cpu --tiny): nnU-Net plans two tiny phantom datasets'
worth of plans (default and ResEnc M, narrowed by the tiny preset), every method takes a few steps, and the
table has its rows and columns (the numbers are the GPU run's business); the checkpoint holds AdamW's state;
the time guard skips what does not fit and says so; the cached probe's average step follows the trainer's
schedule."""
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def gpu_check(monkeypatch):
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # the script points them at its tmp dir
        monkeypatch.setenv(key, os.environ.get(key, ""))
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_check
    return gpu_check


def _bytes(text: str) -> float:
    number, unit = text.split()
    return float(number.replace(",", "")) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]


def _cells(line: str) -> list:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_smoke_run_writes_the_table(gpu_check, tmp_path, capsys):
    out = tmp_path / "cost.md"
    gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out), "--processes", "1"])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("torch ") and ", CUDA " in first  # the machine is named before anything runs
    text = out.read_text()
    assert "Command: `python benchmarks/gpu_check.py --device cpu --tiny" in text and "Device: torch " in text
    lines = text.splitlines()
    header = lines.index(gpu_check._row(gpu_check.COLUMNS))
    rows = [_cells(line) for line in lines[header + 2:header + 2 + 8]]
    assert all(len(r) == len(gpu_check.COLUMNS) for r in rows)
    methods = ["full", "lora", "decoder_lora", "linear_probe (cached)"]
    assert [(r[0], r[1]) for r in rows] == [(p, m) for p in gpu_check.PLANNERS for m in methods]
    for r in rows:
        assert r[6] == "n/a (CPU)" and r[10].startswith("1/")
        float(r[3]), float(r[4]), float(r[5])
    assert [r[5] for r in rows[::4]] == ["1.000", "1.000"]  # ratios are to full FT of the same plans
    for r in rows[::4]:  # full FT after its steps: weights + AdamW's two moments, about 3 x 4 bytes a parameter
        trainable = int(r[2].split(" of ")[0].replace(",", ""))
        assert _bytes(r[9]) > 2.5 * 4 * trainable, r
    assert sum(line.startswith("- ") and "linear_probe (cached): fresh step" in line for line in lines) == 2
    assert "Skipped by the time guard" not in text
    assert any(line.startswith("- nnU-Net default: PlainConvUNet,") for line in lines)
    assert any(line.startswith("- ResEnc M: ResidualEncoderUNet,") for line in lines)
    inference = lines.index(gpu_check._row(gpu_check.INFERENCE_COLUMNS))
    inf_rows = [_cells(line) for line in lines[inference + 2:]]
    assert [r[0] for r in inf_rows if r != [""]] == list(gpu_check.PLANNERS)


def test_time_guard_skips_what_no_longer_fits_and_says_so(gpu_check):
    guard = gpu_check.TimeGuard(budget_s=3600)
    assert guard.allows("a")
    guard.took(3600)  # the longest piece so far no longer fits in what is left
    assert not guard.allows("ResEnc M, lora") and guard.skipped == ["ResEnc M, lora"]
    header = {"device_type": "CPU", "device": "d", "command": "c", "date": "today", "data": "x", "iterations": 2,
              "compile": False, "networks": {}, "skipped": guard.skipped, "budget_s": 480, "elapsed_s": 470}
    text = gpu_check.table({"nnU-Net default": {}}, {}, header)
    assert "Skipped by the time guard (--budget-s 480; 470 s used): ResEnc M, lora" in text


def test_cached_average_step_follows_the_trainers_schedule(gpu_check):
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer as T
    n = T.epochs * T.iterations_per_epoch
    fill = T.feature_pool_size // 2  # batch 2
    fresh_steps = fill + len([i for i in range(fill, n) if i % T.feature_refresh_every == 0])
    assert gpu_check.cached_average_step(1.0, 0.0, 2) == pytest.approx(fresh_steps / n)
    assert gpu_check.cached_average_step(1.0, 1.0, 2) == pytest.approx(1.0)
