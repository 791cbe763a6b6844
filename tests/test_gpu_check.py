"""benchmarks/gpu_check.py in its CPU smoke mode (--device cpu --tiny): nnU-Net plans two tiny phantom datasets'
worth of plans (default and ResEnc M, narrowed by the tiny preset), every method takes a few steps, and the
table has its rows and columns (the numbers are the GPU run's business)."""
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
    assert any(line.startswith("- nnU-Net default: PlainConvUNet,") for line in lines)
    assert any(line.startswith("- ResEnc M: ResidualEncoderUNet,") for line in lines)
    inference = lines.index(gpu_check._row(gpu_check.INFERENCE_COLUMNS))
    inf_rows = [_cells(line) for line in lines[inference + 2:]]
    assert [r[0] for r in inf_rows if r != [""]] == list(gpu_check.PLANNERS)
