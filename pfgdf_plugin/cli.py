"""Command line: ``pfgdf-plugin run|validate|trial|search|bench|compare|methods``."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pfgdf-plugin", description="CNN compression recipes for Torch-Pruning and NNI")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe: train -> prune -> fine-tune -> export -> report")
    run.add_argument("recipe")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe key, e.g. --set prune.params.k=1.5 (repeatable)")
    run.add_argument("--quiet", action="store_true", help="print nothing but errors")
    run.add_argument("--resume", action="store_true",
                     help="continue this recipe's interrupted run from its last checkpoint")
    val = sub.add_parser("validate", help="check a recipe and report every problem at once")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    trial = sub.add_parser("trial", help="one NNI trial: apply nni.get_next_parameter() to a recipe, run, report")
    trial.add_argument("recipe")
    trial.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    search = sub.add_parser("search", help="run an NNI experiment YAML to completion, print the trials, stop NNI")
    search.add_argument("experiment", help="an experiment YAML, e.g. recipes/nni/pfgdf_search.yml")
    search.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the trials' recipe")
    search.add_argument("--max-trials", type=int, default=None, help="replace maxTrialNumber")
    search.add_argument("--port", type=int, default=None, help="NNI manager port (default: a free one)")
    search.add_argument("--work-dir", default=None, help="experiment working directory (default: the YAML's)")
    bench = sub.add_parser("bench", help="methods side by side on one model, data set and budget")
    bench.add_argument("--config", default=None,
                       help="a bench YAML (default: the built-in PFGDF vs L1 bench); one with seeds/targets/timing/"
                            "epochs_after_dense is a Pareto bench (docs/pareto.md)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--out", default="docs", help="folder for benchmarks.md and plots (default: docs)")
    bench.add_argument("--render", default=None, metavar="JSON",
                       help="only rewrite the section of a finished bench from its results JSON")
    compare = sub.add_parser("compare", help="runs side by side: one table and an accuracy-vs-latency plot")
    compare.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders written by `pfgdf-plugin run`")
    compare.add_argument("--out", default="compare.png", help="the plot to write (default: compare.png)")
    sub.add_parser("methods", help="list the registered methods, models and data sets")
    return ap


def one_line(error: BaseException) -> str:
    """An error's message on one line; a list of problems is joined with ``; ``.

    Example:
        >>> from pfgdf_plugin.errors import ConfigError
        >>> one_line(ConfigError(["a must be > 0, got -1", "b must be str, got 2"], "r.yaml"))
        'r.yaml: 2 problem(s): a must be > 0, got -1; b must be str, got 2'
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    return f"{lines[0]} " + "; ".join(line[2:] if line.startswith("- ") else line for line in lines[1:])


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import PluginError

    try:
        if args.command == "methods":
            from .data import DATASETS
            from .models import MODELS
            from .pruning import METHODS

            for name in METHODS.names():
                m = METHODS.get(name)
                print(f"{name:8s} [{', '.join(m.run)}] {m.summary}")
            print(f"\nmodels: {', '.join(MODELS.names())} (and any torchvision classification model, "
                  "or timm/NAME for a timm model with timm installed)")
            print(f"data sets: {', '.join(DATASETS.names())}")
            return 0
        if args.command == "validate":
            from .recipe import load_recipe

            load_recipe(args.recipe, args.overrides)
            print(f"{args.recipe}: ok")
            return 0
        if args.command == "run":
            from .recipe import load_recipe
            from .runner import run_recipe

            run_recipe(load_recipe(args.recipe, args.overrides), quiet=args.quiet, resume=args.resume)
            return 0
        if args.command == "trial":
            from .search import run_trial

            print(run_trial(args.recipe, args.overrides))
            return 0
        if args.command == "search":
            from .search import run_search

            out = run_search(args.experiment, args.overrides, args.max_trials, args.work_dir, args.port)
            for t in out["trials"]:
                print(f"{t['trial']}  {t['result']}  {t['parameters']}")
            print(f"experiment {out['id']}: {out['status']}, {len(out['trials'])} trial(s) reported"
                  + (f", {len(out['failed_trials'])} failed" if out["failed_trials"] else ""))
            return 0
        if args.command == "compare":
            from .compare import compare_runs

            table, plot = compare_runs(args.runs, args.out)
            print(table)
            print(f"\nplot: {plot}")
            return 0
        if args.command == "bench":
            from .bench import render, run_bench

            if args.render:
                render(args.render, args.out)
            else:
                run_bench(args.config, args.overrides, args.out)
            return 0
    except (PluginError, ValueError, TypeError) as e:  # the plugin's errors, and bad arguments: one line
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
