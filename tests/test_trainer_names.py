"""Issue 6, unknown trainer names: `nnUNetv2_fseft_ext_path --list`, the benchmark's check of its `methods`, and
`nnUNetv2_train -tr` with a name that differs from a plugin trainer only in case (trainers/name_check.py)."""
import importlib
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunetv2_fseft.benchmark.runner import check_methods
from nnunetv2_fseft.cli import ext_path
from nnunetv2_fseft.errors import FSEFTError
from nnunetv2_fseft.peft import METHODS
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
from nnunetv2_fseft.training.transductive import TransductiveMixin
from nnunetv2_fseft.trainer_names import plugin_trainers, stop_on_case_only_miss, suggestions, trainers_folder

BIN = Path(sys.executable).parent
ERROR = "nnunetv2_fseft: error: "


def test_the_library_lists_and_finds_its_trainers_without_importing_the_trainers_folder():
    """trainers/ re-exports classes the library declares; the library never imports trainers/ (whose name_check
    imports the library back), and `--list` shows no test-only trainer."""
    code = ("import sys\n"
            "from nnunetv2_fseft.trainer_names import plugin_trainers, trainers_folder\n"
            "names = plugin_trainers(); folder = trainers_folder()\n"
            "import nnunetv2_fseft.demo_trainers.fseft_demo_trainers\n"
            "assert 'nnunetv2_fseft_trainers' not in sys.modules, 'imported'\n"
            "assert not any(n.endswith('_tiny') for n in names), names\n"
            "import nnunetv2_fseft_trainers.fseft_trainers as t, nnunetv2_fseft.training.fseft_trainers as lib\n"
            "assert t.FSEFTLoRATrainer is lib.FSEFTLoRATrainer\n"
            "print(folder)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Path(r.stdout.strip()) == Path(__file__).resolve().parents[1] / "trainers"


def test_list_prints_every_trainer_with_method_learning_rate_and_optimizer(capsys):
    ext_path.main(["--list"])
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    trainers = plugin_trainers()
    assert list(rows) == list(trainers)
    assert "FSEFTTrainer" not in rows and "nnUNetTrainer" not in rows  # bases, not choices
    assert {c.peft_method for c in trainers.values() if issubclass(c, FSEFTTrainer)} == set(METHODS)
    for name, cls in trainers.items():  # each row: what it trains, its learning rate, its optimizer
        words, text = rows[name], " ".join(rows[name])
        fseft = issubclass(cls, FSEFTTrainer)
        assert words[-3:] == ["lr", f"{getattr(cls, 'learning_rate', 1e-2):.0e}", "AdamW" if fseft else "SGD"], name
        if fseft:
            assert words[0].rstrip(",") == cls.peft_method
            head_rate = cls.head_learning_rate not in (None, cls.learning_rate)
            assert (f"head lr {cls.head_learning_rate:.0e}" in text) == head_rate, name
            assert ("size prior" in text) == issubclass(cls, TransductiveMixin), name
            assert ("no feature cache" in text) == (not cls.use_feature_cache), name
    assert "pretrained_weights" in " ".join(rows["FSEFTnnUNetFTTrainer"])  # the baseline that differs by its flag
    ext_path.main([])
    assert capsys.readouterr().out.strip() == trainers_folder()


def test_suggestions():
    known = list(plugin_trainers())
    assert suggestions("FSEFTLoraTrainer", known) == ["FSEFTLoRATrainer"]  # case only: that one alone
    assert suggestions("FSEFTLinearProbTrainer", known)[0] == "FSEFTLinearProbeTrainer"
    assert suggestions("FSEFTNoSuchTrainer", known) == []


def _config(*methods):
    return SimpleNamespace(methods=list(methods), scratch_trainer="FSEFTScratchTrainer")


def test_benchmark_methods_unknown_name_is_one_line_with_the_valid_names(monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_extTrainer", trainers_folder())
    check_methods(_config("zeroshot", "scratch", "FSEFTLoRATrainer", "nnUNetTrainer"))  # all valid
    with pytest.raises(FSEFTError) as e:
        check_methods(_config("zeroshot", "FSEFTLoraTrainer"))
    message = str(e.value)
    assert message.startswith("unknown method/trainer 'FSEFTLoraTrainer'; did you mean FSEFTLoRATrainer? valid: "
                              "zeroshot, scratch, atlas, FSEFTAdaptFormerTITrainer, ")
    assert message.endswith(", or a trainer nnU-Net finds (built in or on nnUNet_extTrainer) "
                            "(nnUNetv2_fseft_ext_path --list shows each with its method and learning rate)")
    assert all(name in message for name in plugin_trainers()) and "\n" not in message
    assert "Searching" not in capsys.readouterr().out  # nnU-Net's narration of its search is not shown


def test_name_check_answers_only_case_only_misses(monkeypatch, tmp_path):
    ours = trainers_folder()
    monkeypatch.setenv("nnUNet_extTrainer", ours)
    module = importlib.import_module("nnunetv2_fseft_trainers.name_check")
    assert not hasattr(module, "FSEFTLoRATrainer") and not hasattr(module, "MyTrainer")
    assert not hasattr(module, "__path__")
    with pytest.raises(SystemExit) as e:
        hasattr(module, "FSEFTLoraTrainer")
    assert str(e.value.code) == (f"{ERROR}unknown trainer 'FSEFTLoraTrainer'; did you mean FSEFTLoRATrainer? "
                                 "(trainer names are case-sensitive; nnUNetv2_fseft_ext_path --list shows each with "
                                 "its method and learning rate)")
    # a folder after ours may hold a user's trainer of that name: then nnU-Net keeps looking
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join([ours, str(tmp_path)]))
    stop_on_case_only_miss("FSEFTLoraTrainer")
    assert not hasattr(module, "FSEFTLoraTrainer")


def test_nnunetv2_train_with_a_case_typo_prints_one_line(tmp_path):
    """The exact command of the issue, through nnU-Net's console script (its -tr lookup runs before any dataset
    is read, so empty nnU-Net folders suffice)."""
    exe = BIN / "nnUNetv2_train"
    if not exe.exists():
        pytest.skip("nnUNetv2_train not installed")
    env = dict(os.environ, nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path),
               nnUNet_extTrainer=trainers_folder(), nnUNet_n_proc_DA="0", nnUNet_compile="0")
    r = subprocess.run([str(exe), "4", "3d_fullres", "0", "-tr", "FSEFTLoraTrainer", "-device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"{ERROR}unknown trainer 'FSEFTLoraTrainer'; did you mean FSEFTLoRATrainer? (trainer names are "
        "case-sensitive; nnUNetv2_fseft_ext_path --list shows each with its method and learning rate)")
