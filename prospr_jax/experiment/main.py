"""The runner's entry point: ``python -m experiments.prune_train``, ``prospr-prune-train``.

Exit status: :data:`EXIT_OK` (0) every cell finished; :data:`EXIT_FAILED` (1) a cell failed with an
error (it has no record; the others ran); 2 the run could not start (argparse-style message: bad
flags, ``--out`` busy, not writable or holding a run it would discard); :data:`EXIT_DIVERGED` (3)
every cell finished but at least one diverged (its record and the table say so; a diverged cell is
a result, the run went to its end); 130 or 143 interrupted by SIGINT (Ctrl-C) or SIGTERM, with the
last checkpoint of the running cell kept and the command that resumes the run printed.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from typing import Optional, Sequence

from absl import logging as absl_logging

from prospr_jax import data, describe_mesh
from prospr_jax.experiment import distributed
from prospr_jax.experiment.cells import checkpoint_path
from prospr_jax.experiment.checks import check_loaded
from prospr_jax.experiment.config import UsageError, build_parser, import_modules
from prospr_jax.experiment.distributed import is_main
from prospr_jax.experiment.launch import Launch, launch, resume_command
from prospr_jax.experiment.results import latest_records, read_records, summary_line, write_report
from prospr_jax.experiment.interrupts import Terminated, signals_as_interrupts
from prospr_jax.experiment.runner import Experiment, Progress, run_cell

EXIT_OK, EXIT_FAILED, EXIT_DIVERGED = 0, 1, 3


def _program() -> str:
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if script.startswith("prospr-prune-train"):
        return script
    if sys.argv and sys.argv[0].endswith(os.path.join("experiment", "__main__.py")):
        return "python -m prospr_jax.experiment"
    return "python -m experiments.prune_train"


def _quiet_logs() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)


def load_experiment(run: Launch) -> Experiment:
    """Load the data, check the run against it, build the :class:`Experiment`.

    Raises:
      UsageError: the data set cannot be loaded or does not suit the run.
    """
    config = run.config
    try:
        dataset = data.load(config.dataset, data_dir=config.data_dir, cache_dir=config.cache_dir,
                            subset=config.subset, seed=config.seed, image_size=config.image_size,
                            in_memory=config.in_memory)
    except (ValueError, data.DatasetNotPreparedError, FileNotFoundError, NotADirectoryError) as e:
        raise UsageError(f"`--dataset` {config.dataset!r}: {e}") from None
    check_loaded(config, dataset)
    _quiet_logs()
    try:
        experiment = Experiment(config, dataset, run.out, progress=run.progress, num_devices=run.num_devices,
                                data_workers=run.data_workers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(
        f"prune_train: {config.model} on {dataset.name} ({len(dataset.train):,} train / {len(dataset.test):,} test, "
        f"{dataset.num_classes} classes), {config.recipe.epochs} epochs of {experiment.steps_per_epoch} steps, "
        f"{len(run.cells)} cells -> {run.out}\n{describe_mesh(experiment.mesh)}",
        flush=True,
    )
    return experiment


def run_cells(experiment: Experiment, run: Launch) -> tuple[list[str], list[str]]:
    """Run every cell not finished yet; returns the names of the failed and of the diverged cells."""
    failed, diverged = [], []
    for cell in run.cells:
        if run.resume and cell.cell_id(run.config.config_id) in run.done:
            print(f"[{cell.name}] already in results.jsonl: skipped")
            leftover = checkpoint_path(run.out, cell, run.config.config_id)
            if not run.keep_checkpoints and os.path.isdir(leftover) and is_main():  # Killed after the record was written.
                shutil.rmtree(leftover)
            continue
        try:
            record = run_cell(experiment, cell, resume=run.resume, keep_checkpoints=run.keep_checkpoints)
        except (ValueError, TypeError, ImportError, NotImplementedError) as e:
            failed.append(cell.name)
            print(f"ERROR [{cell.name}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        print(summary_line(record), flush=True)
        if record["diverged"]:
            diverged.append(cell.name)
    return failed, diverged


def report(run: Launch, experiment: Experiment, failed: list[str], diverged: list[str]) -> int:
    """Write and print the table of the configuration's cells; returns the exit status."""
    config = run.config
    if is_main():
        seeds = config.cell_seeds
        seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
        title = f"{config.model} on {experiment.dataset.name}, {config.recipe.epochs} epochs, {seed_text}"
        records = latest_records(read_records(run.results_path), run.config.config_id)
        text, md_path, png_path = write_report(run.out, records, title)
        print(f"\n{text}\nresults: {run.results_path}\ntable:   {md_path}\nplot:    {png_path}")
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    if diverged:
        print(f"WARNING: {len(diverged)} cell(s) diverged (non-finite training loss; their records say where, "
              f"with null test metrics): {', '.join(diverged)}", file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK


def interrupted_line(run: Launch, now: Optional[Progress], prog: str, signame: str) -> str:
    """The one line printed when the run is interrupted (``now``: ``None`` while loading the data)."""
    resume = resume_command(prog, run.out)
    if now is None:
        return f"interrupted ({signame}) while loading the data, before any cell; resume with: {resume}"
    if now.cell is None:
        return f"interrupted ({signame}) between cells; finished cells are in {run.results_path}; resume with: {resume}"
    where = "while pruning" if now.epoch is None else f"epoch {now.epoch} of {run.config.recipe.epochs}"
    saved = now.saved_epoch()
    kept = "no checkpoint of it yet" if saved is None else f"kept its checkpoint of epoch {saved}"
    return f"interrupted ({signame}) in cell {now.cell.name}, {where}: {kept}; resume with: {resume}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the experiment the command line asks for; returns the exit status (module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import_modules(argv)
    except UsageError as e:
        build_parser(_program()).error(str(e))
    parser = build_parser(_program())
    args = parser.parse_args(argv)
    try:
        distributed.initialize(args)
        run = launch(args, argv)
    except UsageError as e:
        parser.error(str(e))
    with run.lock, signals_as_interrupts(), distributed.quiet_unless_main():
        experiment = None
        try:
            experiment = load_experiment(run)
            failed, diverged = run_cells(experiment, run)
            return report(run, experiment, failed, diverged)
        except UsageError as e:
            parser.error(str(e))
        except KeyboardInterrupt as e:
            signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
            line = interrupted_line(run, None if experiment is None else experiment.now, parser.prog, signum.name)
            print(line, file=sys.stderr, flush=True)
            return 128 + signum


__all__ = ["EXIT_DIVERGED", "EXIT_FAILED", "EXIT_OK", "main"]
