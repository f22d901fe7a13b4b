"""Everything a run checks and sets up before its first heavy step.

In order: the configuration (preset + flags, or the stored run for ``--resume``) and the checks that
need no data loaded (:mod:`prospr_jax.experiment.checks`); that ``--out`` can be created and written;
the lock on ``--out``; what ``--out`` already holds (finished cells, checkpoints of an interrupted
run); the configuration stored in ``run.json``. Any failure is a :class:`UsageError` raised before
the data is loaded.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
from typing import Any, Mapping, Optional

from prospr_jax.experiment.cells import Cell, checkpoint_dirs, checkpoint_path, cells_of
from prospr_jax.experiment.checks import check_before_loading
from prospr_jax.experiment.config import (
    RunConfig,
    UsageError,
    differences,
    given_settings,
    resolve_config,
    resume_config,
)
from prospr_jax.experiment.presets import DEFAULT_PRESET
from prospr_jax.experiment.results import RESULTS_FILE, finished_cell_ids, read_records
from prospr_jax.experiment.distributed import barrier, is_main
from prospr_jax.experiment.rundir import RUN_FILE, NoLock, RunLock, check_writable, read_run, stored_config, write_run


@dataclasses.dataclass
class Launch:
    """A run ready to load its data: configuration, cells, what is finished, the held lock.

    Attributes:
      config: the resolved configuration.
      out: the run directory.
      cells: the run's cells, in order.
      done: ids of the cells of this configuration already in ``results.jsonl``.
      resume: continue cells from their checkpoints and skip the finished ones.
      keep_checkpoints: keep each finished cell's last checkpoint.
      progress: show progress bars.
      lock: the lock on ``out``, held until released (process 0; the others hold a ``NoLock``).
      num_devices: ``--num-devices`` (``None``: every device).
      data_workers: ``--data-workers`` (0: one prefetch thread).
    """

    config: RunConfig
    out: str
    cells: list[Cell]
    done: set[str]
    resume: bool
    keep_checkpoints: bool
    progress: bool
    lock: Any
    num_devices: Optional[int] = None
    data_workers: int = 0

    @property
    def results_path(self) -> str:
        return os.path.join(self.out, RESULTS_FILE)


def default_out(preset: Optional[str]) -> str:
    """``runs/<preset>``, the run directory when no ``--out`` is given."""
    return os.path.join("runs", preset or DEFAULT_PRESET)


def resume_command(prog: str, out: str) -> str:
    """The command line that resumes the run in ``out``."""
    return f"{prog} --out {shlex.quote(out)} --resume"


def _describe(diffs: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"`{flag}`: stored {old!r}, given {new!r}" for flag, old, new in diffs)


def _newest_stored_config(records: list[dict]) -> Optional[RunConfig]:
    for record in reversed(records):
        if isinstance(record.get("config"), dict):
            try:
                return RunConfig.from_dict(record["config"])
            except ValueError:
                return None
    return None


def _resumed_config(out: str, given: Mapping[str, Any], records: list[dict]) -> RunConfig:
    """The configuration ``--resume`` continues: the stored run's, with the given settings checked."""
    run = read_run(out)
    if run is not None:
        config, diffs = resume_config(stored_config(run), given)
        if diffs:
            raise UsageError(
                f"`--resume`: the run in {out!r} was started with other settings: {_describe(diffs)}. Give only "
                f"--out and --resume to continue it as it was started, or start a new run in another --out"
            )
        return config
    config = resolve_config(given)
    has_checkpoints = any(c.cell_id(config.config_id) in checkpoint_dirs(out) for c in cells_of(config))
    if has_checkpoints or finished_cell_ids(records, config.config_id):
        return config
    hint = ""
    newest = _newest_stored_config(records)
    if newest is not None and differences(newest, config):
        hint = f" The newest record in {RESULTS_FILE} was made with other settings: {_describe(differences(newest, config))}."
    raise UsageError(
        f"`--resume`: nothing to resume in {out!r}: no {RUN_FILE}, no checkpoint and no finished cell of this "
        f"configuration (same preset/flags and seed).{hint} Run without --resume to start."
    )


def _cell_dir_name(path: str) -> str:
    return os.path.basename(path).rsplit("-", 1)[0]


def _check_leftovers(out: str, config: RunConfig, cells: list[Cell], records: list[dict], *, restart: bool,
                     delete: bool = True) -> None:
    """A run that does not resume refuses an ``--out`` holding what it would discard (unless ``restart``,
    which discards the checkpoints: only where ``delete``, i.e. in process 0)."""
    finished = finished_cell_ids(records)
    interrupted = {cid: path for cid, path in checkpoint_dirs(out).items() if cid not in finished}
    mine_done = [c for c in cells if c.cell_id(config.config_id) in finished_cell_ids(records, config.config_id)]
    if restart:
        if not delete:
            return
        for path in interrupted.values():
            shutil.rmtree(path)
        for cell in cells:
            shutil.rmtree(checkpoint_path(out, cell, config.config_id), ignore_errors=True)
        return
    held = []
    if interrupted:
        names = ", ".join(_cell_dir_name(p) for p in interrupted.values())
        held.append(f"the checkpoints of {len(interrupted)} unfinished cell(s) of an interrupted run ({names})")
    if mine_done:
        names = ", ".join(c.name for c in mine_done)
        held.append(f"{len(mine_done)} finished cell(s) of this configuration in {RESULTS_FILE} ({names})")
    if held:
        raise UsageError(
            f"`--out` {out!r} holds {' and '.join(held)}: continue that run with --resume, or pass --restart to "
            "discard its checkpoints and run the cells again"
        )


def launch(args: argparse.Namespace, command: list[str]) -> Launch:
    """Check and set up the run ``args`` asks for, up to (not including) loading its data.

    Args:
      args: the parsed command line (:func:`prospr_jax.experiment.config.build_parser`).
      command: the command-line arguments, stored in ``run.json``.

    Returns:
      The :class:`Launch`, holding the lock on ``--out`` (release it when the run ends).

    Raises:
      UsageError: anything that keeps the run from starting as asked.
    """
    given = given_settings(args)
    if not args.resume:  # A resumed run's configuration is known once the stored run is read.
        config = resolve_config(given)
        check_before_loading(config)
    out = args.out or default_out(given.get("preset"))
    if args.resume and not os.path.isdir(out):
        raise UsageError(f"`--resume`: nothing to resume: `--out` {out!r} does not exist")
    check_writable(out)
    results_path = os.path.join(out, RESULTS_FILE)
    if os.path.exists(results_path) and not os.path.isfile(results_path):
        raise UsageError(f"`--out` {out!r}: {RESULTS_FILE} exists and is not a file")
    main = is_main()
    lock = RunLock(out).acquire() if main else NoLock()  # process 0 holds the lock for every process
    try:
        records = read_records(results_path)
        if args.resume:
            config = _resumed_config(out, given, records)
            check_before_loading(config)
        cells = cells_of(config)
        barrier("prospr_jax.experiment: --out read")  # every process has read --out before process 0 changes it
        if not args.resume:
            _check_leftovers(out, config, cells, records, restart=args.restart, delete=main)
        if main:
            write_run(out, config, command)
        barrier("prospr_jax.experiment: --out ready")
    except BaseException:
        lock.release()
        raise
    return Launch(
        config=config,
        out=out,
        cells=cells,
        done=finished_cell_ids(records, config.config_id),
        resume=bool(args.resume),
        keep_checkpoints=bool(args.keep_checkpoints),
        progress=not args.no_progress and main,
        lock=lock,
        num_devices=args.num_devices,
        data_workers=args.data_workers or 0,
    )


__all__ = ["Launch", "default_out", "launch", "resume_command"]
