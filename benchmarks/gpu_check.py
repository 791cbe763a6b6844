"""The device check: what the plugin's methods cost on a GPU, under nnU-Net's GPU settings (AMP float16 +
GradScaler, torch.compile of the network), in one run of at most --budget-s seconds (default 8 minutes) on one GPU.

  python benchmarks/gpu_check.py                          # CUDA; writes benchmarks/results/cost_cuda.md
  python benchmarks/gpu_check.py --device cpu --tiny      # smoke run: tiny phantoms, tiny networks, 2 steps

Plans: nnU-Net's *default* plans (ExperimentPlanner) and the ResEnc M preset (nnUNetPlannerResEncM), both
planned here by nnU-Net for Dataset004_Hippocampus from ../shared/data when it is present (otherwise for phantom
volumes of the same size and spacing, said in the table). --tiny plans tiny phantoms and narrows the networks
with the plugin's tiny preset.
Methods: full fine-tuning, LoRA, decoder + LoRA, the cached linear probe (head on float16 pool features).
Per plans and method, one fixed random batch of the plans' batch and patch size: the first step (it compiles),
then --iterations timed steps; peak CUDA memory of the training steps (max_memory_allocated, reset after the
set-up, so the set-up's own passes do not count; the method alone: everything of the method before is freed);
adapter file and checkpoint bytes as the trainer writes them, taken after the timed steps (AdamW's state is then
full, as in a real checkpoint) from the network without its compile wrapper (the names nnU-Net saves);
inference of one patch: the base network, LoRA unmerged and merged. Ratios are to full fine-tuning.
The cached linear probe runs the trainer's own cached step (FeatureCache + head_train_step: the head eager on the
unwrapped network, as FSEFTTrainer runs it, the pool filled by trunk passes and refreshed every
feature_refresh_every steps); its step time is the trainer's average step over its default schedule (epochs x
iterations_per_epoch), from the measured trunk-pass ("fresh") and pool steps.
Time guard: a plans' method starts only while the time left (--budget-s from the start) exceeds the longest method
so far; the table is rewritten after every method, and it lists what was skipped, so a short lease still returns one.
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
BUDGET_S = 480  # "about 8 minutes" on one GPU, planning included
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


class _CachedTrainer:
    """What the trainer's cached step (FeatureCache.batch_for_step + head_train_step) reads of FSEFTTrainer."""
    is_ddp = False

    def __init__(self, setup):
        self.network, self.optimizer, self.loss, self.grad_scaler = setup.network, setup.optimizer, setup.loss, \
            setup.scaler

    def plain_network(self):
        return self.network


def cached_average_step(fresh: float, pool: float, batch: int) -> float:
    """The cached trainer's mean step over its default schedule: every step fresh (a trunk pass) until the pool is
    full, then one in feature_refresh_every (FeatureCache.needs_fresh)."""
    import math
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer as T
    n = T.epochs * T.iterations_per_epoch
    fill = min(n, math.ceil(T.feature_pool_size / batch))
    refresh = sum(1 for i in range(fill, n) if T.feature_refresh_every and i % T.feature_refresh_every == 0)
    n_fresh = fill + refresh
    return (n_fresh * fresh + (n - n_fresh) * pool) / n


def _cached_steps(setup, args, iterations: int, work: Path) -> tuple:
    """(first step s, average step s, fresh step s, pool step s): the trainer's cached step on a real pool, timed
    step by step until both kinds were seen (at least `iterations` steps)."""
    from nnunetv2_fseft.training.feature_cache import FeatureCache, FeaturePool, head_train_step
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer as T
    pool = FeaturePool(T.feature_pool_size, T.feature_dtype, T.feature_pool_memory_mb * 2 ** 20, spill_dir=work)
    cache, trainer = FeatureCache(pool, T.feature_refresh_every), _CachedTrainer(setup)
    batch = {"data": setup.data, "target": setup.target}
    times = {True: [], False: []}
    try:
        while len(times[True]) + len(times[False]) < iterations + 1 or not times[False]:
            fresh = cache.needs_fresh()
            setup.sync()
            start = time.perf_counter()
            features, target = cache.batch_for_step(setup.network, batch, args.batch, setup.device, setup.amp)
            head_train_step(trainer, features, target, setup.amp)
            setup.sync()
            times[fresh].append(time.perf_counter() - start)
    finally:
        cache.close()
    first = times[True].pop(0)
    fresh = sum(times[True]) / len(times[True]) if times[True] else first
    pool_step = sum(times[False]) / len(times[False])
    return first, cached_average_step(fresh, pool_step, args.batch), fresh, pool_step


def measure_method(args, method: str, mode: str, iterations: int, compile_on: bool, work: Path) -> dict:
    device = torch.device(args.device)
    _free(device)
    setup = cost.Setup(args, method, mode)
    trainable, total = sum(p.numel() for p in setup.params), sum(p.numel() for p in setup.network.parameters())
    plain = setup.network
    if compile_on and not setup.cached:  # as nnUNetTrainer.initialize; the cached step runs its head eager
        setup.network = torch.compile(setup.network)
    setup.sync()
    if device.type == "cuda":  # the set-up (the cached row's no-grad pass included) is not training
        torch.cuda.reset_peak_memory_stats(device)
    extra = {}
    if setup.cached:
        first, step, extra["fresh"], extra["pool"] = _cached_steps(setup, args, iterations, work)
    else:
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
    # after the steps, so AdamW's state is in the checkpoint; from the network without the compile wrapper
    adapter_bytes, checkpoint_bytes = cost.file_sizes(SimpleNamespace(network=plain, optimizer=setup.optimizer))
    del setup, plain
    _free(device)
    return {"trainable": trainable, "total": total, "first": first, "step": step, "peak": peak,
            "adapter": adapter_bytes, "checkpoint": checkpoint_bytes, **extra}


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
             "Checkpoint and adapter bytes after the timed steps (AdamW state included). Cached linear probe: the "
             "trainer's own cached step (head eager), its step time the average over the trainer's default "
             "schedule (pool fill, then a trunk pass every feature_refresh_every steps; fresh and pool steps in "
             "the notes below). Peak memory: the training steps only (reset after the set-up).",
             ""] + [f"- {label}: {network}" for label, network in header["networks"].items()] + \
            ["", _row(COLUMNS), _row(["---"] * 2 + ["---:"] * (len(COLUMNS) - 2))]
    notes = []
    for plans_label, rows in results.items():
        full = rows.get("full")
        for name, r in rows.items():
            peak = cost.human(r["peak"]) if r["peak"] is not None else "n/a (CPU)"
            peak_ratio = f"{r['peak'] / full['peak']:.2f}" if r["peak"] is not None and full else "n/a"
            step_ratio = f"{r['step'] / full['step']:.3f}" if full else "n/a"
            lines.append(_row([plans_label, name, f"{r['trainable']:,} of {r['total']:,}", f"{r['first']:.1f}",
                               f"{r['step'] * 1e3:.1f}", step_ratio, peak, peak_ratio,
                               cost.human(r["adapter"]), cost.human(r["checkpoint"]),
                               f"1/{r['checkpoint'] / r['adapter']:,.0f}"]))
            if "pool" in r:
                notes.append(f"- {plans_label}, {name}: fresh step (trunk pass + head) {r['fresh'] * 1e3:.1f} ms, "
                             f"pool step {r['pool'] * 1e3:.1f} ms")
    lines += ([""] + notes if notes else [])
    lines += ["", "Inference of one patch (batch 1, eval, no_grad; median of interleaved repetitions):", "",
              _row(INFERENCE_COLUMNS), _row(["---"] + ["---:"] * (len(INFERENCE_COLUMNS) - 1))]
    for plans_label, t in inference.items():
        lines.append(_row([plans_label, f"{t['base'] * 1e3:.2f}", f"{t['lora (unmerged)'] * 1e3:.2f}",
                           f"{t['lora merged'] * 1e3:.2f}", f"{t['lora merged'] / t['base']:.3f}"]))
    if header.get("skipped"):
        lines += ["", f"Skipped by the time guard (--budget-s {header['budget_s']:.0f}; "
                      f"{header['elapsed_s']:.0f} s used): " + "; ".join(header["skipped"])]
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
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help=f"time guard: no method starts once the time left is below the longest method so far; the "
                        f"table says what was skipped (default {BUDGET_S} s, planning included)")
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


class TimeGuard:
    """Starts a piece of work only while the time left exceeds the longest piece so far."""

    def __init__(self, budget_s: float):
        self.started, self.budget_s, self.longest, self.skipped = time.perf_counter(), budget_s, 0.0, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, what: str) -> bool:
        if self.budget_s - self.elapsed() > self.longest:
            return True
        self.skipped.append(what)
        print(f"time guard: skipped {what} ({self.elapsed():.0f} of {self.budget_s:.0f} s used)", flush=True)
        return False

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def _write(args, results, inference, header, guard) -> str:
    text = table(results, inference, dict(header, skipped=guard.skipped, budget_s=guard.budget_s,
                                          elapsed_s=guard.elapsed()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return text


def main(argv=None):
    print(versions(), flush=True)  # first: which machine this is, before anything can fail
    args = parse_args(argv)
    guard = TimeGuard(args.budget_s)
    work = Path(tempfile.mkdtemp(prefix="fseft_gpu_check_"))
    results, inference = {}, {}
    try:
        all_plans, data = plan(work, args.tiny, args.processes)
        print(f"plans ready after {guard.elapsed():.0f} s", flush=True)
        header = {"device": versions(), "command": args.command, "data": data, "iterations": args.iterations,
                  "compile": args.compile, "date": datetime.date.today().isoformat(), "device_type":
                  "CUDA: AMP float16 + GradScaler, torch.compile" if args.device == "cuda" else "CPU smoke run: no AMP",
                  "networks": {label: describe(plans) for label, (plans, _) in all_plans.items()}}
        for plans_label, (plans, dataset_json) in all_plans.items():
            margs = _args(plans, dataset_json, args.device, args.tiny)
            results[plans_label] = {}
            for method, mode in METHODS:
                if not guard.allows(f"{plans_label}, {_label(method, mode)}"):
                    continue
                start = time.perf_counter()
                r = measure_method(margs, method, mode, args.iterations, args.compile, work)
                guard.took(time.perf_counter() - start)
                results[plans_label][_label(method, mode)] = r
                print(f"{plans_label}, {_label(method, mode)}: first step {r['first']:.1f} s, step "
                      f"{r['step'] * 1e3:.1f} ms, peak {r['peak']} ({guard.elapsed():.0f} s)", flush=True)
                _write(args, results, inference, header, guard)  # a cut-off run keeps what it finished
            if guard.allows(f"{plans_label}, inference"):
                start = time.perf_counter()
                inference[plans_label] = measure_inference(margs)
                guard.took(time.perf_counter() - start)
        text = _write(args, results, inference, header, guard)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    print(f"written: {args.out} ({guard.elapsed():.0f} s in all)")


if __name__ == "__main__":
    main()
