"""Trainable parameters and adapter file size per FSEFT method on the network a plans file describes.

  python benchmarks/parameters.py PLANS.json DATASET.json [--configuration 3d_fullres]
"""
import argparse
import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from nnunetv2_fseft.networks import build_adapted_network, build_plain_network
from nnunetv2_fseft.peft import METHODS, count_parameters, is_mergeable, trainable_state


def table(plans: dict, dataset_json: dict, configuration: str) -> list:
    full = build_plain_network(plans, configuration, dataset_json)
    base_total = count_parameters(full)[1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            net = build_adapted_network(plans, configuration, dataset_json, method)
            trainable, total = count_parameters(net)
            path = Path(tmp) / f"{method}.safetensors"
            save_file({k: v.contiguous() for k, v in trainable_state(net).items()}, str(path))
            rows.append((method, trainable, 100 * trainable / base_total, path.stat().st_size, is_mergeable(net)))
    return rows, base_total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plans")
    p.add_argument("dataset_json")
    p.add_argument("--configuration", default="3d_fullres")
    a = p.parse_args()
    plans, dataset_json = json.loads(Path(a.plans).read_text()), json.loads(Path(a.dataset_json).read_text())
    rows, total = table(plans, dataset_json, a.configuration)
    arch = plans["configurations"][a.configuration]["architecture"]
    print(f"network: {arch['network_class_name'].split('.')[-1]} features {arch['arch_kwargs']['features_per_stage']}, "
          f"{total:,} parameters, {len(dataset_json['labels'])} outputs")
    print("| method | trainable | % of network | adapter file | merges into stock |")
    print("|---|---:|---:|---:|---|")
    for method, trainable, pct, size, mergeable in rows:
        print(f"| {method} | {trainable:,} | {pct:.3f} | {size / 1024:,.1f} KiB | {'yes' if mergeable else 'no'} |")


if __name__ == "__main__":
    main()
