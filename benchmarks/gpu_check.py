"""The device check: what the plugin's methods cost on a GPU, under nnU-Net's GPU settings (AMP float16 +
GradScaler, torch.compile of the network), in one run of at most ~8 minutes on one GPU.

  python benchmarks/gpu_check.py                          # CUDA; writes benchmarks/results/cost_cuda.md
  python benchmarks/gpu_check.py --device cpu --tiny      # smoke run: tiny phantoms, tiny networks, 2 steps

Plans: nnU-Net's *default* plans (ExperimentPlanner) and the ResEnc M preset (nnUNetPlannerResEncM), both
planned here by nnU-Net for Dataset004_Hippocampus from ../shared/data when it is present (otherwise for phantom
volumes of the same size and spacing, said in the table). --tiny plans tiny phantoms and narrows the networks
with the plugin's tiny preset.
Methods: full fine-tuning, LoRA, decoder + LoRA, the cached linear probe (head on float16 pool features).
Per plans and method, one fixed random batch of the plans' batch and patch size: the first step (it compiles),
then --iterations timed steps; peak CUDA memory of those steps (max_memory_allocated, the method alone:
everything of the method before is freed); adapter file and checkpoint bytes as the trainer writes them;
inference of one patch: the base network, LoRA unmerged and merged. Ratios are to full fine-tuning.
The step, loss, files and inference are benchmarks/cost.py's (Setup, file_sizes, inference_times).
"""
import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import cost  # noqa: E402  (benchmarks/cost.py: the step, loss, file sizes and inference timing)

HIPPOCAMPUS = HERE.parents[1] / "shared" / "data" / "hippocampus" / "Dataset004_Hippocampus"
METHODS = [("full", ""), ("lora", ""), ("decoder_lora", ""), ("linear_probe", "cached")]
PLANNERS = {"nnU-Net default": ("ExperimentPlanner", "nnUNetPlans"),
            "ResEnc M": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans")}
COLUMNS = ["plans", "method", "trainable", "compile + first step (s)", "step (ms)", "step / full FT",
           "peak CUDA memory", "memory / full FT", "adapter file", "checkpoint_final.pth", "adapter / checkpoint"]
INFERENCE_COLUMNS = ["plans", "base (ms)", "LoRA unmerged (ms)", "LoRA merged (ms)", "merged / base"]


def versions() -> str:
    cuda = torch.version.cuda or "none"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    return (f"torch {torch.__version__}, CUDA {cuda}, cuDNN {torch.backends.cudnn.version()}, {device}, "
            f"Python {platform.python_version()}, {os.cpu_count()} CPU cores")


# ------------------------------------------------------------------ plans, by nnU-Net's planners

def _source_dataset(work: Path, tiny: bool) -> tuple:
    """(raw dataset folder, what it is): the hippocampus when present and not tiny, else phantoms."""
    if HIPPOCAMPUS.is_dir() and not tiny:
        return HIPPOCAMPUS, "Dataset004_Hippocampus (../shared/data)"
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    shape, n = ((20, 20, 20), 4) if tiny else ((36, 50, 35), 20)  # the hippocampus: ~35x50x36 voxels at 1 mm
    folder = write_phantom_dataset(work / "phantoms", 4, "Hippocampus", ["spleen", "liver"], n, shape=shape,
                                   spacing=(1.0, 1.0, 1.0), seed=0)
    return folder, f"{n} phantom volumes of {'x'.join(map(str, shape))} voxels at 1 mm " \
                   f"({'--tiny' if tiny else 'hippocampus-sized; ../shared/data absent'})"


def plan(work: Path, tiny: bool, processes: int) -> tuple:
    """{plans label: (plans, dataset_json)} from nnU-Net's planners, and a line saying which data they saw."""
    source, what = _source_dataset(work, tiny)
    for name in ("raw", "pre", "res"):
        (work / name).mkdir(parents=True, exist_ok=True)
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "pre"),
                      nnUNet_results=str(work / "res"))
    link = work / "raw" / "Dataset004_Hippocampus"
    if not link.exists():
        link.symlink_to(source, target_is_directory=True)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    extract_fingerprints([4], num_processes=processes, check_dataset_integrity=False, clean=True, verbose=False)
    out = {}
    for label, (planner, plans_name) in PLANNERS.items():
        plan_experiments([4], planner)
        plans = json.loads((work / "pre" / "Dataset004_Hippocampus" / f"{plans_name}.json").read_text())
        if tiny:
            from nnunetv2_fseft.planning import apply_preset, load_preset
            plans = apply_preset(plans, load_preset("tiny"))
        out[label] = (plans, json.loads((source / "dataset.json").read_text()))
    return out, what


# ------------------------------------------------------------------ one plans' measurements

def _args(plans: dict, dataset_json: dict, device: str, tiny: bool) -> SimpleNamespace:
    """What cost.py's Setup, build_loss and inference_times read (reps x steps: the inference timing)."""
    config = plans["configurations"]["3d_fullres"]
    return SimpleNamespace(plans_dict=plans, dataset_dict=dataset_json, configuration="3d_fullres", device=device,
                           patch=config["patch_size"], batch=config["batch_size"], reps=1 if tiny else 5,
                           steps=1 if tiny else 10)


def _free(device: torch.device) -> None:
    torch._dynamo.reset()  # compiled graphs hold on to their networks
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def measure_method(args, method: str, mode: str, iterations: int, compile_on: bool) -> dict:
    device = torch.device(args.device)
    _free(device)
    setup = cost.Setup(args, method, mode)
    trainable, total = sum(p.numel() for p in setup.params), sum(p.numel() for p in setup.network.parameters())
    adapter_bytes, checkpoint_bytes = cost.file_sizes(setup)  # before compiling: the names nnU-Net saves
    if compile_on:  # as nnUNetTrainer.initialize (the cached probe runs only its head)
        if setup.cached:
            setup.head = torch.compile(setup.head)
        else:
            setup.network = torch.compile(setup.network)
    setup.sync()
    start = time.perf_counter()
    setup.step()
    setup.sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iterations):
        setup.step()
    setup.sync()
    step = (time.perf_counter() - start) / iterations
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del setup
    _free(device)
    return {"trainable": trainable, "total": total, "first": first, "step": step, "peak": peak,
            "adapter": adapter_bytes, "checkpoint": checkpoint_bytes}


class _Patch:
    """What cost.inference_times reads of the full-FT setup: one input patch, its AMP context and sync."""
    amp, sync = cost.Setup.amp, cost.Setup.sync

    def __init__(self, args):
        self.device = torch.device(args.device)
        channels = len(args.dataset_dict["channel_names"])
        self.data = torch.randn((1, channels, *args.patch), generator=torch.Generator().manual_seed(1)).to(self.device)


def measure_inference(args) -> dict:
    """cost.inference_times: base network, LoRA unmerged and merged (one patch, eval, no_grad, AMP on CUDA)."""
    times = cost.inference_times(args, {("full", ""): _Patch(args)})
    _free(torch.device(args.device))
    return times


# ------------------------------------------------------------------ the table

def describe(plans: dict) -> str:
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]
    return (f"{arch['network_class_name'].split('.')[-1]}, {arch['arch_kwargs']['n_stages']} stages, features "
            f"{arch['arch_kwargs']['features_per_stage']}, patch {'x'.join(map(str, config['patch_size']))}, "
            f"batch {config['batch_size']}")


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(results: dict, inference: dict, header: dict) -> str:
    lines = [f"# The plugin's methods under nnU-Net's GPU settings ({header['device_type']})", "",
             f"Device: {header['device']}", "", f"Command: `{header['command']}`", "",
             f"Date: {header['date']}; plans planned by nnU-Net for {header['data']}; {header['iterations']} timed "
             f"iterations per method after the first (compiling) step; compile {'on' if header['compile'] else 'off'}.",
             ""] + [f"- {label}: {network}" for label, network in header["networks"].items()] + \
            ["", _row(COLUMNS), _row(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2))]
    for plans_label, rows in results.items():
        full = rows["full"]
        for name, r in rows.items():
            peak = cost.human(r["peak"]) if r["peak"] is not None else "n/a (CPU)"
            peak_ratio = f"{r['peak'] / full['peak']:.2f}" if r["peak"] is not None else "n/a"
            lines.append(_row([plans_label, name, f"{r['trainable']:,} of {r['total']:,}", f"{r['first']:.1f}",
                               f"{r['step'] * 1e3:.1f}", f"{r['step'] / full['step']:.3f}", peak, peak_ratio,
                               cost.human(r["adapter"]), cost.human(r["checkpoint"]),
                               f"1/{r['checkpoint'] / r['adapter']:,.0f}"]))
    lines += ["", "Inference of one patch (batch 1, eval, no_grad; median of interleaved repetitions):", "",
              _row(INFERENCE_COLUMNS), _row(["---"] + ["---:"] * (len(INFERENCE_COLUMNS) - 1))]
    for plans_label, t in inference.items():
        lines.append(_row([plans_label, f"{t['base'] * 1e3:.2f}", f"{t['lora (unmerged)'] * 1e3:.2f}",
                           f"{t['lora merged'] * 1e3:.2f}", f"{t['lora merged'] / t['base']:.3f}"]))
    return "\n".join(lines) + "\n"


def _label(method: str, mode: str) -> str:
    return "linear_probe (cached)" if mode == "cached" else method


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny phantoms and networks, 2 iterations: a smoke run")
    p.add_argument("--iterations", type=int, help="timed steps per method (default 100; 2 with --tiny)")
    p.add_argument("--no-compile", action="store_true", help="eager networks (default: compiled, as nnU-Net does "
                                                                "on CUDA; with --device cpu the default is eager)")
    p.add_argument("--out", help="markdown file (default: benchmarks/results/cost_cuda.md on CUDA)")
    p.add_argument("--processes", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help="processes for nnU-Net's fingerprint extraction")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu --tiny for the smoke run)")
    args.iterations = args.iterations or (2 if args.tiny else 100)
    args.compile = not args.no_compile and args.device == "cuda"
    default = HERE / "results" / ("cost_cuda.md" if args.device == "cuda" and not args.tiny
                                  else f"gpu_check_{args.device}{'_tiny' if args.tiny else ''}.md")
    args.out = Path(args.out) if args.out else default
    args.command = " ".join(["python", "benchmarks/gpu_check.py"] + (sys.argv[1:] if argv is None else list(argv)))
    return args


def main(argv=None):
    print(versions(), flush=True)  # first: which machine this is, before anything can fail
    args = parse_args(argv)
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="fseft_gpu_check_"))
    try:
        all_plans, data = plan(work, args.tiny, args.processes)
        print(f"plans ready after {time.perf_counter() - started:.0f} s", flush=True)
        results, inference = {}, {}
        for plans_label, (plans, dataset_json) in all_plans.items():
            margs = _args(plans, dataset_json, args.device, args.tiny)
            results[plans_label] = {}
            for method, mode in METHODS:
                r = measure_method(margs, method, mode, args.iterations, args.compile)
                results[plans_label][_label(method, mode)] = r
                print(f"{plans_label}, {_label(method, mode)}: first step {r['first']:.1f} s, step "
                      f"{r['step'] * 1e3:.1f} ms, peak {r['peak']} ({time.perf_counter() - started:.0f} s)", flush=True)
            inference[plans_label] = measure_inference(margs)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    header = {"device": versions(), "command": args.command, "data": data, "iterations": args.iterations,
              "compile": args.compile, "date": datetime.date.today().isoformat(), "device_type":
              "CUDA: AMP float16 + GradScaler, torch.compile" if args.device == "cuda" else "CPU smoke run: no AMP",
              "networks": {label: describe(plans) for label, (plans, _) in all_plans.items()}}
    text = table(results, inference, header)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"written: {args.out} ({time.perf_counter() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
