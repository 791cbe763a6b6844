"""Load once, predict many (issue 59): one nnUNetv2_fseft_predict pass against one nnUNetv2_predict per adapter, on
the CPU, side by side (A B A B): wall time and peak RSS.

    python benchmarks/serving.py WORKDIR [--foundation MODEL_FOLDER] [--cases 20] [--reps 2]

Set-ups, built in WORKDIR/serving once (a second call reuses them):
- hippocampus: the Posterior-only foundation (hippocampus_common.posterior_foundation; never trained here: pass
  --foundation to use one trained elsewhere, only read), adapters for a 2-class target (anterior, posterior) on its
  plans, the first `--cases` query cases of hippocampus_split.json;
- phantoms: the demo's phantoms (nnunetv2_fseft.demo.settings: its first foundation dataset and its target
  PhantomScannerB, 24^3 voxels of 2 mm), planned with the demo's tiny preset; this foundation's weights are nnU-Net's
  random initialisation (no training run: timing does not depend on the values).
Adapters: LoRA, decoder + LoRA, decoder and linear probe (and FT-last and spatial adapter for the shared-encoder
rows), written as nnUNetv2_fseft_export writes adapter folders, with random tensors in place of a training run
(quality is irrelevant to timing; a training run would add minutes and change no timing). Each separate run predicts
with the model folder that nnUNetv2_fseft_export --apply rebuilds, through nnUNetv2_predict -d -tr.

Every command runs in one process (-npp 0 -nps 0, nnU-Net's sequential mode: on 2 cores worker processes only add
their start-up) with nnU-Net's default thread count; its peak RSS is the process's (/usr/bin/time). Both sides run
without mirroring (--disable_tta, as CPU users run nnU-Net: MIC-DKFZ/nnUNet #1434), the A B A B rows on every
case; with mirroring (8 network passes per window, which then dominate) one more pair runs on the first
--tta_cases cases, once, to keep the whole run within about 15 minutes on 2 cores.
Results: benchmarks/results/serving_cpu.{md,json}.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import hippocampus_common as hip

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MAIN = (("lora", "FSEFTLoRATrainer"), ("decoder_lora", "FSEFTDecoderLoRATrainer"), ("decoder", "FSEFTDecoderTrainer"),
        ("linear_probe", "FSEFTLinearProbeTrainer"))
DECODER_SIDE = (("decoder", "FSEFTDecoderTrainer"), ("ft_last", "FSEFTFTLastTrainer"),
                ("linear_probe", "FSEFTLinearProbeTrainer"), ("spatial_adapter", "FSEFTSpatialAdapterTrainer"))
EVERY = MAIN + tuple(m for m in DECODER_SIDE if m not in MAIN)
PHANTOM_FOUNDATION_ID, PHANTOM_TARGET_ID = 591, 592


# ----------------------------------------------------------------------------------------------------- set-ups
def synthetic_adapter(foundation_folder: Path, plans: dict, dataset_json: dict, method: str, trainer: str,
                      folder: Path, seed: int) -> None:
    """An adapter folder as nnUNetv2_fseft_export writes one, its tensors drawn at random on the foundation."""
    import torch
    from nnunetv2_fseft.checkpoints import apply_foundation, is_head_key, save_adapter
    from nnunetv2_fseft.files import sha256, write_json
    from nnunetv2_fseft.foundations import read_foundation
    from nnunetv2_fseft.networks import build_adapted_network
    from nnunetv2_fseft.peft import resolved_options
    foundation = read_foundation(foundation_folder)
    options = resolved_options(method)
    network = build_adapted_network(plans, foundation.configuration, dataset_json, method, options)
    apply_foundation(network, foundation, dataset_json)
    torch.manual_seed(seed)
    with torch.no_grad():
        for key, p in network.named_parameters():
            if p.requires_grad:
                p.copy_(torch.zeros_like(p) if is_head_key(key) and key.endswith("bias") else
                        p + torch.randn_like(p) * 0.1)
    (folder / "fold_0").mkdir(parents=True)
    write_json(folder / "plans.json", plans)
    write_json(folder / "dataset.json", dataset_json)
    config = {"format": "nnunetv2_fseft.adapter/1", "trainer_name": trainer, "method": method, "options": options,
              "plans_name": plans["plans_name"], "configuration": foundation.configuration, "fold": 0,
              "labels": dataset_json["labels"], "inference_allowed_mirroring_axes": [0, 1, 2],
              "foundation": {"path": str(foundation.path), "sha256": sha256(foundation.path),
                             "weights_sha256": foundation.weights_sha256, "source": foundation.source,
                             "parts": foundation.parts},
              "note": "benchmarks/serving.py: random tensors in place of a training run (timing only)"}
    save_adapter(network, folder / "fold_0", config)


def adapters_for(work: Path, foundation: Path, plans: dict, dataset_json: dict, methods) -> dict:
    """{method: (adapter folder, trainer, rebuilt model folder in nnUNet_results)}, built once."""
    from nnunetv2_fseft.export import apply_adapter
    out = {}
    for seed, (method, trainer) in enumerate(methods):
        adapter = work / "adapters" / method
        model = (Path(os.environ["nnUNet_results"]) / plans["dataset_name"] /
                 f"{trainer}__{plans['plans_name']}__{foundation_configuration(foundation)}")
        if not (model / "fold_0" / "checkpoint_final.pth").is_file():
            shutil.rmtree(adapter, ignore_errors=True)
            synthetic_adapter(foundation, plans, dataset_json, method, trainer, adapter, seed)
            apply_adapter(adapter, foundation, model, overwrite=True)
        out[method] = (adapter, trainer, model)
    return out


def foundation_configuration(foundation: Path) -> str:
    return foundation.name.split("__")[-1]


def hippocampus_setup(work: Path, foundation: Path, n_cases: int) -> dict:
    if not (foundation / "fold_0" / "checkpoint_final.pth").is_file():
        sys.exit(f"{foundation} has no fold_0/checkpoint_final.pth: this benchmark never trains a foundation; pass "
                 "--foundation with the Posterior-only foundation's model folder (benchmarks/hippocampus_common.py)")
    base = work / "serving" / "hippocampus"
    plans = dict(json.loads((foundation / "plans.json").read_text()), dataset_name="Dataset159_HippoServe")
    dataset_json = dict(json.loads((foundation / "dataset.json").read_text()),
                        labels={"background": 0, "anterior": 1, "posterior": 2})
    query = base / "query"
    if not query.is_dir():
        query.mkdir(parents=True)
        for case in hip.SPLIT["query"][:n_cases]:
            shutil.copy(hip.SOURCE / "imagesTr" / f"{case}_0000.nii.gz", query)
    return {"name": "hippocampus", "foundation": foundation, "query": query, "base": base,
            "adapters": adapters_for(base, foundation, plans, dataset_json, EVERY),
            "describe": f"{n_cases} query cases of the hippocampus (Dataset004), Posterior-only "
                        f"foundation {foundation}"}


def phantom_setup(work: Path, n_cases: int) -> dict:
    """The demo's phantoms: its first foundation dataset, planned with its preset, and its target."""
    import torch
    from nnunetv2_fseft.demo.settings import PRESET, SOURCES, TARGET, default_settings
    from nnunetv2_fseft.demo.stages import phantom_spacing
    from nnunetv2_fseft.files import write_json
    from nnunetv2_fseft.networks import build_plain_network
    from nnunetv2_fseft.planning import plan_with_preset
    from nnunetv2_fseft.synthetic import write_phantom_dataset
    base = work / "serving" / "phantoms"
    settings = default_settings()
    size = {"shape": settings.phantom_shape, "spacing": phantom_spacing(settings)}
    _, source_name, organs, seed, shift = SOURCES[0]
    found_name = f"Dataset{PHANTOM_FOUNDATION_ID}_{source_name}"
    foundation = work / "res" / found_name / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    if not (foundation / "fold_0" / "checkpoint_final.pth").is_file():
        raw = write_phantom_dataset(work / "raw", PHANTOM_FOUNDATION_ID, source_name, list(organs),
                                    settings.n_source_cases, seed=seed, intensity_shift=shift, **size)
        plan_with_preset(PHANTOM_FOUNDATION_ID, PRESET, num_processes=1, overwrite=True)
        plans = json.loads((work / "pre" / found_name / "nnUNetPlans.json").read_text())
        dataset_json = json.loads((raw / "dataset.json").read_text())
        torch.manual_seed(0)
        network = build_plain_network(plans, "3d_fullres", dataset_json)
        (foundation / "fold_0").mkdir(parents=True, exist_ok=True)
        write_json(foundation / "plans.json", plans)
        write_json(foundation / "dataset.json", dataset_json)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 0,
                    "optimizer_state": None, "grad_scaler_state": None, "logging": None, "_best_ema": None,
                    "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0,
                                  "dataset_json": dataset_json, "device": torch.device("cpu")},
                    "inference_allowed_mirroring_axes": (0, 1, 2)}, foundation / "fold_0" / "checkpoint_final.pth")
    target_id, target_name, target_organs, target_seed, target_shift = TARGET
    target = work / "raw" / f"Dataset{PHANTOM_TARGET_ID}_{target_name}"
    if not target.is_dir():
        write_phantom_dataset(work / "raw", PHANTOM_TARGET_ID, target_name, list(target_organs), n_cases,
                              seed=target_seed, intensity_shift=target_shift, **size)
    plans = dict(json.loads((foundation / "plans.json").read_text()), dataset_name=target.name)
    dataset_json = json.loads((target / "dataset.json").read_text())
    return {"name": "phantoms", "foundation": foundation, "query": target / "imagesTr", "base": base,
            "adapters": adapters_for(base, foundation, plans, dataset_json, EVERY),
            "describe": f"{n_cases} phantoms of the demo's target {target_name} "
                        f"({'x'.join(map(str, settings.phantom_shape))} voxels), foundation of random weights on the "
                        f"demo's {PRESET} plans"}


# ----------------------------------------------------------------------------------------------------- timing
def timed(cmd: list, log: Path, env: dict) -> dict:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one command, by /usr/bin/time: the command is its child, so
    its peak is its own (a child of this process would inherit this process's peak through fork and exec)."""
    usage = log.parent / "time.txt"
    t = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", str(usage)] + [str(c) for c in cmd],
                           stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, cmd))} (see {log})")
    user, system, peak_kib = usage.read_text().split()[-3:]
    return {"wall_s": wall, "cpu_s": float(user) + float(system), "peak_rss_mib": int(peak_kib) / 1024}


COMMON = ["-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]
NO_TTA = ["--disable_tta"]


def one_pass(setup: dict, methods, out: Path, log: Path, env: dict, extra=NO_TTA, query=None) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    adapters = [str(setup["adapters"][m][0]) for m in methods]
    return timed([BIN / "nnUNetv2_fseft_predict", "-i", query or setup["query"], "-o", out, "-m",
                  setup["foundation"], "-a", *adapters, *COMMON, *extra], log, env)


def separate_runs(setup: dict, methods, out: Path, log: Path, env: dict, extra=NO_TTA, query=None) -> dict:
    runs = []
    for m in methods:
        shutil.rmtree(out / m, ignore_errors=True)
        _, trainer, model = setup["adapters"][m]
        plans_name, configuration = model.name.split("__")[1:]
        runs.append(timed([BIN / "nnUNetv2_predict", "-i", query or setup["query"], "-o", out / m, "-d",
                           model.parent.name, "-c", configuration, "-p", plans_name, "-tr", trainer, "-f", "0",
                           *COMMON, *extra], log, env))
    return {"wall_s": sum(r["wall_s"] for r in runs), "cpu_s": sum(r["cpu_s"] for r in runs),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs), "runs": runs}


def same_labels(a: Path, b: Path, methods) -> int:
    """Voxels whose label differs between the one-pass outputs and the separate runs, over all cases."""
    import numpy as np
    import SimpleITK as sitk
    differ = 0
    for m in methods:
        for f in sorted((b / m).glob("*.nii.gz")):
            x, y = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (a / m / f.name, f))
            differ += int(np.sum(x != y))
    return differ


def tensor_mib(adapter: Path) -> float:
    return (adapter / "fold_0" / "adapter.safetensors").stat().st_size / 2 ** 20


def measure(setup: dict, reps: int, env: dict, tta_cases: int) -> dict:
    base, log = setup["base"], setup["base"] / "timing_log.txt"
    main_methods, side = [m for m, _ in MAIN], [m for m, _ in DECODER_SIDE]
    rows = {"one_pass": [], "separate": [], "shared": [], "not_shared": [], "tta_one_pass": [], "tta_separate": []}
    for rep in range(reps):  # A B A B, then C D C D
        rows["one_pass"].append(one_pass(setup, main_methods, base / "out_one_pass", log, env))
        rows["separate"].append(separate_runs(setup, main_methods, base / "out_separate", log, env))
        print(f"{setup['name']} rep {rep + 1}: one pass {rows['one_pass'][-1]['wall_s']:.1f} s, separate "
              f"{rows['separate'][-1]['wall_s']:.1f} s", flush=True)
    differ = same_labels(base / "out_one_pass", base / "out_separate", main_methods)
    for rep in range(reps):
        rows["shared"].append(one_pass(setup, side, base / "out_shared", log, env))
        rows["not_shared"].append(one_pass(setup, side, base / "out_not_shared", log, env,
                                           NO_TTA + ["--no_shared_encoder"]))
        print(f"{setup['name']} rep {rep + 1}: shared encoder {rows['shared'][-1]['wall_s']:.1f} s, not shared "
              f"{rows['not_shared'][-1]['wall_s']:.1f} s", flush=True)
    if tta_cases:  # nnU-Net's default mirroring (8 passes per window in 3d) on the first cases, once
        query = base / f"query_{tta_cases}"
        if not query.is_dir():
            query.mkdir()
            for f in sorted(Path(setup["query"]).glob("*_0000.nii.gz"))[:tta_cases]:
                shutil.copy(f, query)
        rows["tta_one_pass"].append(one_pass(setup, main_methods, base / "out_tta_one", log, env, [], query))
        rows["tta_separate"].append(separate_runs(setup, main_methods, base / "out_tta_sep", log, env, [], query))
        print(f"{setup['name']} with mirroring, {tta_cases} cases: one pass {rows['tta_one_pass'][-1]['wall_s']:.1f} "
              f"s, separate {rows['tta_separate'][-1]['wall_s']:.1f} s", flush=True)
    sizes = {m: tensor_mib(setup["adapters"][m][0]) for m in set(main_methods + side)}
    foundation_mib = (setup["foundation"] / "fold_0" / "checkpoint_final.pth").stat().st_size / 2 ** 20
    return {"describe": setup["describe"], "rows": rows, "labels_differ_voxels": differ, "adapter_mib": sizes,
            "foundation_checkpoint_mib": foundation_mib, "tta_cases": tta_cases}


# ----------------------------------------------------------------------------------------------------- report
def _walls(runs) -> str:
    return ", ".join(f"{r['wall_s']:.1f}" for r in runs)


def _median(runs, key="wall_s") -> float:
    values = sorted(r[key] for r in runs)
    return values[len(values) // 2] if len(values) % 2 else sum(values[len(values) // 2 - 1:][:2]) / 2


def report(results: dict, command: str, reps: int) -> str:
    import bench_env
    lines = ["# Load once, predict many: one pass against one nnUNetv2_predict per adapter (CPU)", "",
             *bench_env.provenance(command, "each command alone in one process (-npp 0 -nps 0), nnU-Net's default "
                                            "threads; without mirroring (--disable_tta) on both sides unless a row "
                                            "says otherwise"),
             "Adapters: random tensors on the foundation in place of a training run (timing does not depend on "
             "their values). Separate runs: `nnUNetv2_predict -d TARGET -tr TRAINER` on the model folder that "
             "`nnUNetv2_fseft_export --apply` rebuilds per adapter, one after the other. Wall times are per "
             f"repetition, run alternately (A B A B); ratios use the medians of {reps}.", ""]
    for name, r in results.items():
        rows = r["rows"]
        one, sep = _median(rows["one_pass"]), _median(rows["separate"])
        shared, not_shared = _median(rows["shared"]), _median(rows["not_shared"])
        bound = max(x["peak_rss_mib"] for x in rows["separate"]) + sum(r["adapter_mib"][m] for m, _ in MAIN)
        one_rss = max(x["peak_rss_mib"] for x in rows["one_pass"])
        lines += [f"## {name}: {r['describe']}", "",
                  "| run | adapters | wall s | CPU s | peak RSS MiB | wall vs separate |", "|---|---|---|---|---|---|",
                  f"| one pass (`nnUNetv2_fseft_predict`) | LoRA, decoder + LoRA, decoder, linear probe | "
                  f"{_walls(rows['one_pass'])} | {_median(rows['one_pass'], 'cpu_s'):.1f} | {one_rss:.0f} | "
                  f"**{one / sep:.2f}x** |",
                  f"| 4 x `nnUNetv2_predict` | the same | {_walls(rows['separate'])} | "
                  f"{_median(rows['separate'], 'cpu_s'):.1f} | "
                  f"{max(x['peak_rss_mib'] for x in rows['separate']):.0f} (largest run) | 1 |",
                  f"| one pass, shared encoder | decoder, FT-last, linear probe, spatial adapter | "
                  f"{_walls(rows['shared'])} | {_median(rows['shared'], 'cpu_s'):.1f} | "
                  f"{max(x['peak_rss_mib'] for x in rows['shared']):.0f} | |",
                  f"| one pass, `--no_shared_encoder` | the same | {_walls(rows['not_shared'])} | "
                  f"{_median(rows['not_shared'], 'cpu_s'):.1f} | "
                  f"{max(x['peak_rss_mib'] for x in rows['not_shared']):.0f} | |"]
        if rows["tta_one_pass"]:
            tta = _median(rows["tta_one_pass"]) / _median(rows["tta_separate"])
            lines += [f"| one pass, mirroring on, first {r['tta_cases']} cases | LoRA, decoder + LoRA, decoder, linear "
                      f"probe | {_walls(rows['tta_one_pass'])} | {_median(rows['tta_one_pass'], 'cpu_s'):.1f} | "
                      f"{max(x['peak_rss_mib'] for x in rows['tta_one_pass']):.0f} | **{tta:.2f}x** |",
                      f"| 4 x `nnUNetv2_predict`, mirroring on, first {r['tta_cases']} cases | the same | "
                      f"{_walls(rows['tta_separate'])} | {_median(rows['tta_separate'], 'cpu_s'):.1f} | "
                      f"{max(x['peak_rss_mib'] for x in rows['tta_separate']):.0f} (largest run) | 1 |"]
        lines += ["",
                  f"- one pass / separate runs: {one / sep:.2f}x wall time (goal <= 0.4x).",
                  f"- shared encoder / not shared: {shared / not_shared:.2f}x wall time.",
                  f"- peak RSS: one pass {one_rss:.0f} MiB; bound {bound:.0f} MiB = the largest separate run "
                  f"(foundation + one working set + one adapter) + the 4 adapters' tensors "
                  f"({sum(r['adapter_mib'][m] for m, _ in MAIN):.1f} MiB; foundation checkpoint "
                  f"{r['foundation_checkpoint_mib']:.1f} MiB).",
                  f"- labels of the one pass vs the separate runs: {r['labels_differ_voxels']} voxels differ.", ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", type=Path)
    p.add_argument("--foundation", type=Path, default=None,
                   help="the Posterior-only foundation's model folder (default: WORKDIR's, never trained here)")
    p.add_argument("--cases", type=int, default=20)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--tta_cases", type=int, default=5,
                   help="one more pair with nnU-Net's mirroring on the first N cases (0: none)")
    p.add_argument("--only", choices=["hippocampus", "phantoms"], default=None)
    p.add_argument("--results", type=Path, default=HERE / "results" / "serving_cpu", help="results stem (.md, .json)")
    a = p.parse_args()
    work = a.workdir.resolve()
    hip.setup_env(work)
    env = dict(os.environ)
    env.pop("nnUNet_def_n_proc", None)  # nnU-Net's default thread count for prediction, on both sides
    foundation = (a.foundation or hip.posterior_foundation(work, train=False)).resolve()
    setups = []
    if a.only in (None, "hippocampus"):
        setups.append(hippocampus_setup(work, foundation, a.cases))
    if a.only in (None, "phantoms"):
        setups.append(phantom_setup(work, a.cases))
    results = {s["name"]: measure(s, a.reps, env, a.tta_cases) for s in setups}
    command = "python benchmarks/serving.py " + " ".join(sys.argv[1:])
    out = a.results
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    out.with_suffix(".md").write_text(report(results, command, a.reps))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
