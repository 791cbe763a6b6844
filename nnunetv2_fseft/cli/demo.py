"""nnUNetv2_fseft_demo: pre-train a partial-label foundation and adapt it few-shot, end to end, on a CPU.

Without arguments it needs no data and no GPU: synthetic CT-like phantoms, about 5 minutes on 2 CPU cores."""
import argparse
import os

from ..errors import FSEFTError, cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_fseft_demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Output in the work dir: results.md (table), dice_vs_k.png (plot), results.json, logs/ (one log per "
               "step), nnUNet_raw/ nnUNet_preprocessed/ nnUNet_results/ (an ordinary nnU-Net tree). Re-running "
               "skips finished steps. See docs/demo.md.")
    p.add_argument("--workdir", default="fseft_demo",
                   help="folder for everything the demo writes (default ./fseft_demo); must be new, empty or an "
                        "earlier demo's")
    p.add_argument("--quick", action="store_true",
                   help="smaller data, fewer methods and a much shorter schedule (a smoke test: ~3 min)")
    p.add_argument("--data", nargs="+", type=int, metavar="ID",
                   help="run the story on your raw datasets in $nnUNet_raw instead: FOUNDATION_ID [FOUNDATION_ID ...] "
                        "TARGET_ID (the last id is the target). They are linked, not copied, into the work dir")
    p.add_argument("--preset", default="tiny", help="plan preset for the foundation (default tiny: CPU-sized network)")
    p.add_argument("--jobs", type=int, default=None,
                   help="adaptation runs at a time (default: 2 on 2 or more cores, each with half the cores)")
    p.add_argument("--overwrite", action="store_true", help="start over in an earlier demo's work dir")
    return p


@cli_entry
def main(argv=None):
    a = _parser().parse_args(argv)
    data = None
    if a.data is not None:
        if len(a.data) < 2:
            raise FSEFTError("--data needs at least two ids: FOUNDATION_ID [FOUNDATION_ID ...] TARGET_ID")
        if a.data[-1] in a.data[:-1]:
            raise FSEFTError(f"--data: the target {a.data[-1]} is also listed as a foundation dataset; the target "
                             "must be a dataset the foundation does not train on")
        data = (tuple(a.data[:-1]), a.data[-1])
    jobs = a.jobs if a.jobs is not None else (2 if (os.cpu_count() or 1) >= 2 else 1)
    if jobs < 1:
        raise FSEFTError("--jobs must be 1 or more")
    from ..demo import run_demo
    result = run_demo(a.workdir, quick=a.quick, data=data, overwrite=a.overwrite, jobs=jobs, preset=a.preset)
    print()
    print(result["table"])
    print()
    print(f"table: {result['markdown']}")
    print(f"plot:  {result['plot']}")
    print(f"total: {result['total_s'] / 60:.1f} min")
