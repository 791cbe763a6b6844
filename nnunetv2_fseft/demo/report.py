"""The demo's report: the Dice / parameters / time table, the Dice-vs-K plot, results.md and results.json."""
import json
from pathlib import Path
from typing import List, Tuple

from .settings import SCRATCH
from .workdir import Workdir


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def results_table(records: List[dict]) -> str:
    """Markdown table, one row per (method, K); a Dice column per class when the target has several."""
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    classes = classes if len(classes) > 1 else []
    header = ("| method | trainer | K | Dice (query) | " + "".join(f"{c} | " for c in classes)
              + "trainable params | saved file | train (s) | predict (s) |\n"
              "|---|---|---:|---:|" + "---:|" * len(classes) + "---:|---|---:|---:|")
    rows = [f"| {r['method']} | {r['trainer']} | {r['k']} | {r['dice']:.3f} | "
            + "".join(f"{r['dice_per_class'].get(c, float('nan')):.3f} | " for c in classes)
            + f"{r['trainable_parameters']:,} | {_size(r['file_bytes'])} ({r['file']}) | {r['train_s']:.0f} | "
            f"{r['predict_s']:.0f} |" for r in records]
    return "\n".join([header, *rows])


def plot(records: List[dict], path: Path, title: str) -> Path:
    """Dice vs K per method: one panel per target class when there are several, else the mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    panels = classes if len(classes) > 1 else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=120, squeeze=False)
    ks = sorted({r["k"] for r in records})
    for ax, cls in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in records):
            points = sorted((r["k"], r["dice"] if cls is None else r["dice_per_class"].get(cls, float("nan")))
                            for r in records if r["method"] == method)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    linestyle="--" if method == SCRATCH[0] else "-", label=method)
        ax.set_xticks(ks)
        ax.set_xlabel("K (support cases)")
        ax.set_ylabel("Dice on the query cases" + ("" if cls is None else f": {cls}"))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_report(wd: Workdir, records: List[dict], context: dict, total_s: float) -> Tuple[Path, Path, str]:
    table = results_table(records)
    target = context["target"]
    title = f"{target['dataset']}: {', '.join(context['target_classes'])}"
    png = plot(records, wd.root / "dice_vs_k.png", f"Few-shot adaptation, {title}")
    found = context.get("foundation_scores") or {}
    lines = ["# nnUNetv2_fseft_demo results", "",
             f"- foundation: `{context['foundation']['dataset']}` ({context['foundation']['n_cases']} cases, classes "
             f"{', '.join(context['foundation']['classes'])}), trained with `{context['foundation_trainer']}`; "
             f"held-out Dice (annotated classes): "
             + (", ".join(f"{k} {v:.3f}" for k, v in found.items() if v is not None) or "n/a"),
             f"- target: `{target['dataset']}` ({', '.join(context['target_classes'])}); "
             f"{len(target['query'])} query cases (the val set of every fold, never trained on)",
             "- Dice: nnU-Net's `compute_metrics_on_folder` on `nnUNetv2_predict -device cpu --disable_tta` output, "
             "mean over the query cases and the target's foreground classes",
             "- trainable params: tensors in `fold_X/adapter.safetensors` (FSEFT trainers) or unique parameters of "
             "`checkpoint_final.pth` (stock nnU-Net)",
             f"- total wall time: {total_s / 60:.1f} min; train/predict times include each command's start-up", "",
             table, "", f"![Dice vs K]({png.name})", ""]
    md = wd.root / "results.md"
    md.write_text("\n".join(lines))
    (wd.root / "results.json").write_text(json.dumps({"context": context, "runs": records, "total_s": total_s},
                                                     indent=2))
    return md, png, table
