"""Cost of each FSEFT method on one network and patch, in one run: trainable parameters; training step time
and peak memory as ratios to full fine-tuning; adapter file vs checkpoint; the feature cache of the black-box
methods (cached vs uncached step, one-off cache build); activation checkpointing ("checkpointed" rows) for the
methods whose gradients run through the network; merged LoRA inference vs the base network.

  python benchmarks/cost.py                                   # tiny preset, hippocampus-like input, CPU
  python benchmarks/cost.py --device cuda
  python benchmarks/cost.py --plans PLANS.json --dataset-json DATASET.json [--patch 40 56 40] [--batch 2]

Step = forward + nnU-Net's DC+CE loss (deep supervision as the trainer uses it) + backward + clipping + AdamW,
on one fixed random patch; warm-up steps are excluded and the methods are interleaved across repetitions
(rotating order) so background load hits them alike; the median over repetitions is reported. Peak memory is
measured in a fresh spawned process per method (CPU: peak RSS, VmHWM; CUDA: max_memory_allocated).
Writes benchmarks/results/cost_<device>.md.
"""
import argparse
import copy
import io
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
BLACK_BOX = ("linear_probe", "spatial_adapter")
CHECKPOINTED = ("full", "lora", "cnn_adapter", "decoder_lora")  # gradients run through most of the network


# ------------------------------------------------------------------ the default network: tiny preset, hippocampus-like

def tiny_hippocampus_plans() -> tuple:
    """nnU-Net's 3d_fullres plans for Dataset004_Hippocampus (patch 40x56x40, 4 stages) narrowed by the
    plugin's tiny preset (features 8-64, batch 2), and a matching dataset.json (3 labels)."""
    n = 4
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": n, "features_per_stage": [8, 16, 32, 64],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * n,
                            "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1), "n_conv_per_stage": [2] * n,
                            "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [40, 56, 40], "spacing": [1.0, 1.0, 1.0],
              "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
              "batch_dice": False, "architecture": arch}
    plans = {"dataset_name": "Dataset004_Hippocampus", "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": config}, "label_manager": "LabelManager",
             "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2]}
    dataset_json = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "Anterior": 1, "Posterior": 2},
                    "numTraining": 260, "file_ending": ".nii.gz"}
    return plans, dataset_json


# ------------------------------------------------------------------ one method's training setup

class Setup:
    """Network, optimizer and loss as FSEFTTrainer builds them, and one fixed random batch."""

    def __init__(self, args, method: str, mode: str = ""):
        """mode: '' (as the trainer runs it uncached), 'cached' (black-box head on pool features) or
        'checkpointed' (activation checkpointing of every stage)."""
        from nnunetv2_fseft.networks import build_adapted_network
        from nnunetv2_fseft.peft import get_method
        from nnunetv2_fseft.training.activation_checkpointing import enable_activation_checkpointing
        from nnunetv2_fseft.training.feature_cache import final_head, trunk_features
        from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
        cached = mode == "cached"
        self.method, self.cached, self.device = method, cached, torch.device(args.device)
        self.deep_supervision = get_method(method).deep_supervision
        torch.manual_seed(0)
        self.network = build_adapted_network(args.plans_dict, args.configuration, args.dataset_dict, method,
                                             deep_supervision=self.deep_supervision).to(self.device)
        if mode == "checkpointed":
            enable_activation_checkpointing(self.network)
        self.params = [p for p in self.network.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=FSEFTTrainer.learning_rate,
                                           weight_decay=FSEFTTrainer.weight_decay_fseft)
        self.scaler = torch.amp.GradScaler("cuda") if self.device.type == "cuda" else None
        self.loss = build_loss(args, self.deep_supervision)
        g = torch.Generator().manual_seed(1)
        n_classes = len(args.dataset_dict["labels"])
        channels = len(args.dataset_dict.get("channel_names", args.dataset_dict.get("modality", {"0": 0})))
        self.data = torch.randn((args.batch, channels, *args.patch), generator=g).to(self.device)
        target = torch.randint(0, n_classes, (args.batch, 1, *args.patch), generator=g).float().to(self.device)
        self.target = deep_supervision_targets(target, args) if self.deep_supervision else target
        self.head = final_head(self.network)
        if cached:  # one pool sample batch, stored as the pool stores it
            with self.amp():
                self.features = trunk_features(self.network, self.data).to(torch.float16)

    def amp(self):
        from nnunetv2.utilities.helpers import dummy_context
        return torch.autocast("cuda") if self.device.type == "cuda" else dummy_context()

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.amp():
            out = self.head(self.features.float()) if self.cached else self.network(self.data)
            loss = self.loss(out, self.target)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 12)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 12)
            self.optimizer.step()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def build_loss(args, deep_supervision: bool):
    """nnUNetTrainer._build_loss (2.8.1) for label (not region) training, no DDP, no compile."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": args.plans_dict["configurations"][args.configuration].get("batch_dice", False),
                           "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                          ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if not deep_supervision:
        return loss
    weights = np.array([1 / (2 ** i) for i in range(len(ds_scales(args)))])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def ds_scales(args) -> list:
    strides = args.plans_dict["configurations"][args.configuration]["architecture"]["arch_kwargs"]["strides"]
    return list(1 / np.cumprod(np.vstack(strides), axis=0))[:-1]


def deep_supervision_targets(target: torch.Tensor, args) -> list:
    out = []
    for scale in ds_scales(args):
        size = [int(round(s * f)) for s, f in zip(target.shape[2:], scale)]
        out.append(target if list(target.shape[2:]) == size else
                   torch.nn.functional.interpolate(target, size=size, mode="nearest"))
    return out


# ------------------------------------------------------------------ peak memory, one fresh process per method

def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_worker(args, method: str, mode: str) -> dict:
    """Peak memory of `warmup + 2` training steps, in bytes, and what the setup alone held before them."""
    torch.set_num_threads(args.threads)
    setup = Setup(args, method, mode)
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import resource
        before = _rss_kib("VmRSS") * 1024
        try:  # reset the peak-RSS mark (Linux >= 4.0) so it covers the steps only
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
    for _ in range(args.warmup + 2):
        setup.step()
    setup.sync()
    if setup.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        try:
            peak = _rss_kib("VmHWM") * 1024
        except (OSError, KeyError):
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"before": before, "peak": peak}


def measure_memory(args, variants) -> dict:
    ctx = multiprocessing.get_context("spawn")
    out = {}
    for method, mode in variants:
        with ProcessPoolExecutor(1, mp_context=ctx) as ex:
            out[(method, mode)] = ex.submit(memory_worker, args, method, mode).result()
        print(f"  memory {label(method, mode)}: peak {out[(method, mode)]['peak'] / 2**20:.0f} MiB", flush=True)
    return out


# ------------------------------------------------------------------ step time, interleaved in this process

def measure_step_times(args, setups: dict) -> dict:
    keys = list(setups)
    for key in keys:
        for _ in range(args.warmup):
            setups[key].step()
        setups[key].sync()
    times = {k: [] for k in keys}
    for rep in range(args.reps):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]  # rotate: no method always runs first
        for key in order:
            s = setups[key]
            s.sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                s.step()
            s.sync()
            times[key].append((time.perf_counter() - t) / args.steps)
        print(f"  step times: repetition {rep + 1}/{args.reps} done", flush=True)
    return {k: statistics.median(v) for k, v in times.items()}


def median_time(fn, sync, reps: int) -> float:
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def inference_times(args, setups: dict) -> dict:
    """Forward of one patch (batch 1, eval, no_grad): base network, LoRA unmerged, LoRA merged; interleaved."""
    from nnunetv2_fseft.networks import build_adapted_network, build_plain_network
    from nnunetv2_fseft.peft import merge_peft
    device = torch.device(args.device)
    torch.manual_seed(0)
    nets = {"base": build_plain_network(args.plans_dict, args.configuration, args.dataset_dict)}
    lora = build_adapted_network(args.plans_dict, args.configuration, args.dataset_dict, "lora")
    with torch.no_grad():  # non-zero LoRA weights, as after training
        for name, p in lora.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.01)
    nets["lora (unmerged)"] = lora
    nets["lora merged"] = merge_peft(copy.deepcopy(lora))
    x = setups[("full", "")].data[:1]
    amp = setups[("full", "")].amp
    sync = setups[("full", "")].sync
    times = {k: [] for k in nets}
    for k, net in nets.items():
        net.to(device).eval()
        with torch.no_grad(), amp():
            net(x)
    for rep in range(args.reps):
        for k in list(nets)[rep % len(nets):] + list(nets)[:rep % len(nets)]:
            with torch.no_grad(), amp():
                times[k].append(median_time(lambda: nets[k](x), sync, args.steps))
    return {k: statistics.median(v) for k, v in times.items()}


def cache_build(args, setup) -> float:
    """Seconds of one trunk pass (no_grad, stops before the head) on one training batch."""
    from nnunetv2_fseft.training.feature_cache import trunk_features

    def encode():
        with setup.amp():
            trunk_features(setup.network, setup.data).to("cpu", torch.float16)
    encode()
    return median_time(encode, setup.sync, args.reps * args.steps)


# ------------------------------------------------------------------ files

def file_sizes(setup) -> tuple:
    """(adapter.safetensors bytes, checkpoint_final.pth bytes) as the FSEFT trainer writes them."""
    from safetensors.torch import save_file
    from nnunetv2_fseft.peft import trainable_state
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable_state(setup.network).items()}, str(adapter))
        buf = io.BytesIO()
        torch.save({"network_weights": setup.network.state_dict(), "optimizer_state": setup.optimizer.state_dict(),
                    "grad_scaler_state": None, "logging": {}, "_best_ema": None, "current_epoch": 0,
                    "trainer_name": "FSEFT", "inference_allowed_mirroring_axes": (0, 1, 2)}, buf)
        return adapter.stat().st_size, buf.getbuffer().nbytes


# ------------------------------------------------------------------ table

def label(method: str, mode: str) -> str:
    return f"{method} ({mode})" if mode else method


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def report(args, rows, mem, steps, sizes, infer, build) -> str:
    from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer
    dev = args.device
    mem_name = "peak RSS" if dev == "cpu" else "max_memory_allocated"
    full_t, full_m = steps[("full", "")], mem[("full", "")]
    full_extra = full_m["peak"] - full_m["before"]
    arch = args.plans_dict["configurations"][args.configuration]["architecture"]
    lines = [f"# Cost per FSEFT method ({dev})", "",
             f"Command: `{args.command}`", "",
             f"Machine: {machine(args)}", "",
             f"Network: {arch['network_class_name'].split('.')[-1]}, features "
             f"{arch['arch_kwargs']['features_per_stage']}, {rows[0][2]:,} parameters, "
             f"{len(args.dataset_dict['labels'])} outputs; patch {'x'.join(map(str, args.patch))}, batch {args.batch}. "
             f"Step times: median of {args.reps} interleaved repetitions x {args.steps} steps after {args.warmup} "
             "warm-up steps.", "",
             f"| method | trainable | step (s) | step / full FT | {mem_name} | / full FT | training extra / full FT "
             "| adapter file | checkpoint_final.pth | adapter / checkpoint |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method, mode, total, trainable in rows:
        key = (method, mode)
        m, t = mem[key], steps[key]
        extra = m["peak"] - m["before"]
        size = sizes.get(method)
        files = (f"{human(size[0])} | {human(size[1])} | 1/{size[1] / size[0]:,.0f}" if size and not mode
                 else "(same) | | ")
        lines.append(f"| {label(method, mode)} | {trainable:,} | {t:.3f} | {t / full_t:.3f} | "
                     f"{human(m['peak'])} | {m['peak'] / full_m['peak']:.2f} | {extra / full_extra:.2f} | {files} |")
    pool = FSEFTTrainer.feature_pool_size
    per_pool = -(-pool // args.batch)
    lines += ["", f"**Feature cache (black-box methods).** Cached step = final head on float16 pool features; "
              f"cache build = one trunk pass (no_grad, stops before the head) per augmented batch; the trainer's "
              f"default pool of {pool} samples takes {per_pool} passes to fill. Amortised = a {1000}-iteration "
              f"run with refresh every {FSEFTTrainer.feature_refresh_every} steps once the pool is full.", "",
              "| method | uncached step (s) | cached step (s) | uncached / cached | full FT / cached | "
              "trunk pass (s) | pool build (s) | amortised step (s) | uncached / amortised |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    refresh = FSEFTTrainer.feature_refresh_every
    passes = per_pool + ((1000 - per_pool) // refresh if refresh else 0)
    for method in BLACK_BOX:
        if (method, "cached") not in steps:
            continue
        u, c = steps[(method, "")], steps[(method, "cached")]
        amortised = c + passes * build[method] / 1000
        lines.append(f"| {method} | {u:.4f} | {c:.4f} | {u / c:.1f}x | {full_t / c:.1f}x | {build[method]:.4f} | "
                     f"{per_pool * build[method]:.2f} | {amortised:.4f} | {u / amortised:.1f}x |")
    base = infer["base"]
    lines += ["", "**Inference** (one patch, batch 1, eval, no_grad; median):", "",
              "| network | time (s) | / base |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.4f} | {v / base:.3f} |" for k, v in infer.items()]
    lines += ["", f"Memory: {mem_name} measured in a fresh spawned process per method over {args.warmup + 2} "
              "training steps; 'training extra' = peak minus what the process held right before the first step "
              "(network, optimizer, batch" + (", imports" if dev == "cpu" else "") + " excluded). "
              "Checkpoint = network_weights + AdamW state of that method, as nnU-Net saves them.", ""]
    return "\n".join(lines)


def machine(args) -> str:
    s = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), torch {torch.__version__}, " \
        f"{args.threads} torch threads"
    if args.device == "cuda":
        s += f", {torch.cuda.get_device_name()}"
    try:
        s += f", load average at start {os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    return s


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", help="plans.json (default: tiny preset, hippocampus-like plans built here)")
    p.add_argument("--dataset-json", help="dataset.json matching --plans")
    p.add_argument("--configuration", default="3d_fullres")
    p.add_argument("--patch", type=int, nargs="+", help="patch size (default: the plans' patch)")
    p.add_argument("--batch", type=int, help="batch size (default: the plans' batch size)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", nargs="+", help="subset of methods ('full' is always included)")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    p.add_argument("--steps", type=int, default=2, help="timed steps per method and repetition")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per method first")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", help="markdown file (default: benchmarks/results/cost_<device>.md)")
    args = p.parse_args(argv)
    if bool(args.plans) != bool(args.dataset_json):
        p.error("--plans and --dataset-json go together")
    if args.plans:
        args.plans_dict = json.loads(Path(args.plans).read_text())
        args.dataset_dict = json.loads(Path(args.dataset_json).read_text())
    else:
        args.plans_dict, args.dataset_dict = tiny_hippocampus_plans()
    config = args.plans_dict["configurations"][args.configuration]
    args.patch = args.patch or config["patch_size"]
    args.batch = args.batch or config["batch_size"]
    args.command = " ".join(["python", "benchmarks/cost.py"] + sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None):
    os.environ.setdefault("nnUNet_compile", "0")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from nnunetv2_fseft.peft import METHODS, count_parameters
    methods = ["full"] + [m for m in (args.methods or METHODS) if m != "full"]
    variants = [(m, "") for m in methods] + [(m, "cached") for m in BLACK_BOX if m in methods] + \
        [(m, "checkpointed") for m in CHECKPOINTED if m in methods]
    print(f"{len(variants)} variants on {args.device}; memory first (one process each), then step times", flush=True)
    mem = measure_memory(args, variants)
    setups = {v: Setup(args, *v) for v in variants}
    steps = measure_step_times(args, setups)
    sizes = {m: file_sizes(setups[(m, "")]) for m in methods}
    build = {m: cache_build(args, setups[(m, "")]) for m in BLACK_BOX if m in methods}
    infer = inference_times(args, setups)
    rows = [(m, c, *reversed(count_parameters(setups[(m, c)].network))) for m, c in variants]
    rows = [(m, c, total, trainable) for m, c, total, trainable in rows]
    text = report(args, rows, mem, steps, sizes, infer, build)
    print(text)
    out = Path(args.out) if args.out else HERE / "results" / f"cost_{args.device}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
