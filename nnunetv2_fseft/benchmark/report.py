"""results.csv (one row per cell), results.md (mean ± std over seeds, as the FSEFT study's tables) and
dice_vs_k.png (Dice vs K per method)."""
import csv
import statistics
import textwrap
from pathlib import Path

COST_COLUMNS = ("trainable_parameters", "adapter_bytes", "checkpoint_bytes", "train_seconds", "peak_rss_mb",
                "peak_cuda_mb")


def _mean_std(values, of: int = 0) -> str:
    """mean ± std; with `of` (the table's seed count), a cell resting on fewer seeds says how many."""
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    text = f"{values[0]:.3f}" if len(values) == 1 else f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    return text + (f" ({len(values)} seed{'s' if len(values) > 1 else ''})" if len(values) < of else "")


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def write_csv(path: Path, records: list, classes: list) -> None:
    columns = ["method", "k", "seed", "fold", "dice"] + [f"dice_{c}" for c in classes] + list(COST_COLUMNS)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            per_class = r.get("dice_per_class", {})
            writer.writerow([r["method"], r["k"], r["seed"], r["fold"], r["dice"]]
                            + [per_class.get(c) for c in classes] + [r.get(c) for c in COST_COLUMNS])


def markdown(records: list, classes: list, title: str) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records))
    ks = sorted({r["k"] for r in records})
    seeds = sorted({r["seed"] for r in records})
    lines = [f"# {title}", "",
             f"Dice on the shared query set (nnU-Net's evaluation), mean ± std over seeds {seeds}; "
             f"cost columns are medians over the method's cells.", "",
             "| method | " + " | ".join(f"K={k}" for k in ks) + " | trainable params | adapter file | "
             "train time | peak RSS |",
             "|---|" + "---:|" * (len(ks) + 4)]
    for m in methods:
        mine = [r for r in records if r["method"] == m]
        cells = [_mean_std([r["dice"] for r in mine if r["k"] == k], of=len(seeds)) for k in ks]
        params, adapter = _median([r.get("trainable_parameters") for r in mine]), _median(
            [r.get("adapter_bytes") for r in mine])
        seconds, rss = _median([r.get("train_seconds") for r in mine]), _median([r.get("peak_rss_mb") for r in mine])
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {'' if params is None else f'{params:,.0f}'} | "
                     f"{'' if not adapter else f'{adapter / 1024:,.0f} KB'} | "
                     f"{'' if seconds is None else f'{seconds:.0f} s'} | {'' if rss is None else f'{rss:,.0f} MB'} |")
    if len(classes) > 1:
        lines += ["", "Per class (mean ± std over seeds):", "",
                  "| method | K | " + " | ".join(classes) + " |", "|---|---:|" + "---:|" * len(classes)]
        for m in methods:
            for k in ks:
                mine = [r for r in records if r["method"] == m and r["k"] == k]
                lines.append(f"| {m} | {k} | " + " | ".join(
                    _mean_std([r["dice_per_class"].get(c) for r in mine]) for c in classes) + " |")
    return "\n".join(lines + _learning_curves(records, methods, ks)) + "\n"


CURVE_POINTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _learning_curves(records: list, methods: list, ks: list) -> list:
    """nnU-Net's train_loss on the supports at five points of training, mean over seeds: whether the budget
    sufficed (a loss still falling in the last quarter says it did not), read without the query set."""
    rows = []
    for m in methods:
        for k in ks:
            curves = [r["train_losses"] for r in records if r["method"] == m and r["k"] == k and r.get("train_losses")]
            if curves:
                points = [statistics.mean(c[round(f * (len(c) - 1))] for c in curves) for f in CURVE_POINTS]
                rows.append(f"| {m} | {k} | {max(len(c) for c in curves)} | "
                            + " | ".join(f"{v:.3f}" for v in points) + f" | {points[-1] - points[-2]:+.3f} |")
    if not rows:
        return []
    return ["", "Learning curves: nnU-Net's train_loss (the trainer's own loss, with the size prior's term for TI, on "
            "augmented support patches) at the first epoch, 25 / 50 / 75 % of the epochs and the last, mean over "
            "seeds. Losses differ between trainers; compare a curve with itself.", "",
            "| method | K | epochs | first | 25 % | 50 % | 75 % | last | last quarter |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows]


MARKERS = "os^D"


def plot(path: Path, records: list, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ks = sorted({r["k"] for r in records})
    for i, m in enumerate(dict.fromkeys(r["method"] for r in records)):
        values = [[r["dice"] for r in records if r["method"] == m and r["k"] == k] for k in ks]
        means = [statistics.mean(v) if v else float("nan") for v in values]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        # matplotlib has 10 colours: the 11th method reuses the 1st's colour, so it gets another marker
        style = {"linestyle": "--"} if m == "zeroshot" else {"marker": MARKERS[i // 10 % len(MARKERS)]}
        ax.errorbar(ks, means, yerr=stds, label=m, capsize=3, **style)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.minorticks_off()  # a log axis would label 2x10^0, 3x10^0 ... between the K values
    ax.set_xlabel("K (labelled support scans)")
    ax.set_ylabel("Dice on the query set")
    ax.set_ylim(0, 1)
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # never over the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(config, dataset_name: str, records: list) -> dict:
    classes = list(dict.fromkeys(c for r in records for c in r.get("dice_per_class", {})))
    title = f"{dataset_name}: few-shot adaptation from {config.foundation.parent.name}"
    out = config.output
    write_csv(out / "results.csv", records, classes)
    (out / "results.md").write_text(markdown(records, classes, title))
    plot(out / "dice_vs_k.png", records, title)
    return {"records": records, "csv": out / "results.csv", "markdown": out / "results.md",
            "plot": out / "dice_vs_k.png"}
