"""nnUNetv2_fseft_benchmark CONFIG: the few-shot protocol as a resumable grid of methods x K x seeds.

Each cell is nnUNetv2_train on one few-shot fold (-pretrained_weights from the foundation, except 'scratch')
followed by nnU-Net's own final validation on the shared query set; 'zeroshot' predicts with no training.
Finished cells are kept (OUTPUT/cells/*.json) and skipped on a re-run. Needs nnUNet_raw, nnUNet_preprocessed
and nnUNet_results; the plugin's trainers are added to nnUNet_extTrainer. Writes OUTPUT/results.csv,
results.md and dice_vs_k.png.

Example config (JSON; YAML with PyYAML installed):
  {"dataset": 105, "foundation": "/data/nnUNet_results/Dataset104_X/MultiTalentTrainer__nnUNetPlans__3d_fullres",
   "methods": ["zeroshot", "scratch", "FSEFTLinearProbeTrainer", "FSEFTDecoderLoRATrainer"],
   "k": [1, 5, 10], "seeds": 3, "query": 50, "device": "cpu", "output": "results/hippo"}
"""
import argparse

from ..errors import cli_entry


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="benchmark config (.json, or .yaml with PyYAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    a = p.parse_args(argv)
    from ..benchmark.config import load_config
    from ..benchmark.runner import run_benchmark
    result = run_benchmark(load_config(a.config), progress=not a.no_progress)
    print(result["markdown"].read_text())
    print(f"written: {result['csv']}, {result['markdown']}, {result['plot']}")
