"""Running the cells of an experiment: prune, train under the mask, checkpoint, evaluate, record.

:class:`Experiment` holds what every cell of a run shares (data, model, theta_0, the compiled train
and eval steps, the pruning problem). :func:`run_cell` runs one cell in four steps, each a function
of its own: :func:`start_cell` (prune, or :func:`restore_cell` from the last checkpoint),
:func:`train_cell` (the epochs, a checkpoint after each, divergence detection), :func:`cell_record`
and the append to ``results.jsonl``.

Divergence: every :data:`DIVERGENCE_CHECK_EVERY` steps (and at the end of each epoch) the training
losses of the steps since the last check are read back from the device; the first non-finite one
stops the cell's training. Its record carries ``diverged = {'epoch', 'epoch_step', 'step', 'loss'}``
(1-based epoch, step within that epoch and step of the run; the loss as a string such as ``'nan'``)
and ``null`` test metrics; the checkpoint of the last finite epoch is not replaced.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from prospr_jax import PruningProblem, data, data_mesh, dense_masks, models, process_rows, replicate, shard_batch, sparsity_report
from prospr_jax.checkpoint import Checkpointer
from prospr_jax.experiment import metrics, paradigms, pruning, structured_cells
from prospr_jax.experiment.ablations import ablate
from prospr_jax.experiment.cells import Cell, checkpoint_path
from prospr_jax.experiment.interrupts import uninterrupted
from prospr_jax.experiment.config import DENSE, RunConfig
from prospr_jax.experiment.distributed import is_main
from prospr_jax.experiment.results import RESULTS_FILE, append_record, jsonable
from prospr_jax.experiment.training import batch_at_step, make_train_fn
from prospr_jax.methods import PruneResult
from prospr_jax.train import Trainer, TrainState

DIVERGENCE_CHECK_EVERY = 10


@dataclasses.dataclass
class Progress:
    """Where the run is, for the message of an interrupted run.

    Attributes:
      cell: the cell being run (``None`` between cells).
      epoch: the epoch being trained (1-based; ``None`` while pruning).
      checkpoint_dir: the cell's checkpoint directory.
    """

    cell: Optional[Cell] = None
    epoch: Optional[int] = None
    checkpoint_dir: Optional[str] = None

    def saved_epoch(self) -> Optional[int]:
        """The epoch of the cell's newest complete checkpoint on disk (``None``: none)."""
        if self.checkpoint_dir is None:
            return None
        with Checkpointer(self.checkpoint_dir) as ckpt:
            return ckpt.latest_step()


class Experiment:
    """What every cell of a run shares: data, model, theta_0, the compiled train/eval steps.

    Args:
      config: the run's configuration.
      dataset: the loaded data set (its train split already the subset).
      out: the run directory.
      progress: show progress bars.
      num_devices: the first N devices of the data mesh (``None``: every device of every process).
      data_workers: 0, or the threads of a grain pipeline reading the training batches.

    Raises:
      ValueError: the training split has fewer examples than one batch, or a batch that does not
        split over the devices.
    """

    def __init__(self, config: RunConfig, dataset: data.Dataset, out: str, *, progress: bool,
                 num_devices: Optional[int] = None, data_workers: int = 0):
        self.config, self.dataset, self.out, self.progress = config, dataset, out, progress
        self.data_workers = data_workers
        self.mesh = data_mesh(num_devices)
        for flag, batch_size in (("--batch-size", config.recipe.batch_size), ("--prune-batch-size", config.prune_batch_size)):
            try:
                process_rows(batch_size, self.mesh)
            except ValueError as e:
                raise ValueError(f"`{flag}` {batch_size}: {e}") from None
        # Evaluation sums over examples, so its batch size does not change a result: it is rounded
        # down to a multiple of the device count (at least one example per device).
        devices = self.mesh.devices.size
        self.eval_batch_size = max(devices, config.eval_batch_size // devices * devices)
        self.config_id = config.config_id
        self.num_classes = dataset.num_classes
        self.input_shape = tuple(dataset.image_shape)
        self.model = models.get(config.model, self.num_classes, **config.model_options)
        self.params0, self.batch_stats0 = models.init(
            self.model, jax.random.PRNGKey(config.seed), (1,) + self.input_shape
        )
        self.steps_per_epoch = data.steps_per_epoch(dataset, config.recipe.batch_size)
        for flag, batch_size in (("--batch-size", config.recipe.batch_size), ("--prune-batch-size", config.prune_batch_size)):
            if data.steps_per_epoch(dataset, batch_size) < 1:
                raise ValueError(
                    f"the training split has {len(dataset.train)} examples, fewer than one batch of "
                    f"`{flag}` {batch_size}"
                )
        self.trainer = Trainer(self.model, config.recipe, self.steps_per_epoch, mesh=self.mesh)
        self.train_fn = make_train_fn(self.trainer, dataset, batch_stats=self.batch_stats0, seed=config.seed)
        self.now = Progress()
        self._prune_batches: dict[int, Any] = {}
        self._problem: Optional[PruningProblem] = None
        self.scores = pruning.ScoreCache()
        self._seeded: dict[int, "Experiment"] = {}
        self._trace: dict[str, Any] = {}  # shared with the seeded copies: one trace per run
        self.pretrained: dict[int, TrainState] = {}  # dense training before pruning (--prune-at), by steps
        self.paradigm_trainers: dict[str, Trainer] = {}  # --after finetune's trainer

    def layer_trace(self) -> tuple[Any, Optional[str]]:
        """``(trace, None)``: the model's layer trace (:mod:`prospr_jax.experiment.metrics`), taken
        once per run; ``(None, reason)`` when the model cannot be traced."""
        if not self._trace:
            try:
                self._trace["trace"] = (metrics.flax_trace(self.model, self.params0, self.batch_stats0, self.input_shape), None)
            except Exception as e:  # noqa: BLE001 - any tracing failure leaves the metrics None, with the reason
                self._trace["trace"] = (None, f"{type(e).__name__}: {e}")
        return self._trace["trace"]

    def for_seed(self, seed: Optional[int]) -> "Experiment":
        """The experiment of a cell with seed ``seed`` (``None`` or the configuration's seed: this one).

        It shares the data, the model, the mesh and the compiled train/eval steps, and has its own
        theta_0, data order, scoring batches, pruning key and train_fn, all drawn from ``seed`` as
        this one's are from ``--seed``; the training subset is this one's. Cell ids stay those of
        this configuration (:attr:`config_id`). Built once per seed.
        """
        if seed is None or seed == self.config.seed:
            return self
        if seed not in self._seeded:
            other = copy.copy(self)
            other.config = dataclasses.replace(self.config, seed=seed)
            other.params0, other.batch_stats0 = models.init(self.model, jax.random.PRNGKey(seed), (1,) + self.input_shape)
            other.train_fn = make_train_fn(self.trainer, self.dataset, batch_stats=other.batch_stats0, seed=seed)
            other._prune_batches, other._problem, other._seeded = {}, None, {}
            other.pretrained = {}  # its own dense training (--prune-at); the fine-tuning trainer is shared
            other.scores = pruning.ScoreCache()
            self._seeded[seed] = other
        return self._seeded[seed]

    def init_params(self, key: jax.Array) -> Any:
        """A fresh draw of the model's parameters from ``key`` (the ``reinit`` ablation)."""
        return models.init(self.model, key, (1,) + self.input_shape)[0]

    def batch_fn(self, i: int) -> Any:
        """The i-th scoring batch: step i of the (unaugmented) training stream, as jax arrays."""
        if i not in self._prune_batches:
            batch = batch_at_step(
                self.dataset, i, batch_size=self.config.prune_batch_size, seed=self.config.seed,
                augment=self.config.prune_augment,
            )
            rows = process_rows(self.config.prune_batch_size, self.mesh)  # this process's share
            self._prune_batches[i] = shard_batch({"image": batch["image"][rows], "label": batch["label"][rows]}, self.mesh)
        return self._prune_batches[i]

    def problem(self) -> PruningProblem:
        """The run's PruningProblem, built once: its functions keep their identity across cells, so
        the pruners' jitted computations compile once per run, not once per cell."""
        if self._problem is None:
            variables = {"params": self.params0}
            if self.batch_stats0:
                variables["batch_stats"] = self.batch_stats0
            variables = replicate(variables, self.mesh)
            self._problem = PruningProblem.from_flax(
                self.model,
                variables,
                self.batch_fn,
                input_shape=self.input_shape,
                num_classes=self.num_classes,
                train_fn=self.train_fn,
                key=jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 1),
            )
        return self._problem

    def prune(self, cell: Cell) -> PruneResult:
        """The :class:`prospr_jax.methods.PruneResult` of ``cell`` (``seconds``: the pruning wall time).

        Training starts from ``start_params`` at ``start_step``: theta_0 and 0, or the rewound weights
        of the methods that train while pruning (IMP: theta_k and k; DRIVE: its start params). The
        method scores the problem of the cell's ``prune_at`` (:func:`paradigms.scoring_problem`).

        Single-shot score methods score once per method, options and ``prune_at``
        (:class:`pruning.ScoreCache`): the other sparsities (and the ablation cells) reuse the scores;
        ``extras['scores_reused']`` says which cells did. The cell's ablation, if any, is applied to the
        result.
        """
        if cell.seed is not None and cell.seed != self.config.seed:
            raise ValueError(f"cell {cell.name} has seed {cell.seed}; prune it with experiment.for_seed({cell.seed})")
        if cell.method == DENSE:
            masks = dense_masks(self.params0, self.problem().prunable_tree())
            return PruneResult(masks=masks, start_params=self.params0, method=DENSE)
        cfg = self.config
        if cell.granularity == structured_cells.CHANNEL:
            return structured_cells.prune_cell(self.problem(), cell.method, cell.sparsity, cell.options)
        result, reused = self.scores.prune(
            cell.method, paradigms.scoring_problem(self, cell), cell.sparsity, density_rule=cfg.density_rule,
            scope=cfg.scope, min_per_layer=cfg.min_per_layer, options=cell.options, invert=cell.ablation == "invert",
            problem_key=cell.prune_at,
        )
        result = dataclasses.replace(result, extras={**result.extras, "scores_reused": reused})
        return ablate(cell.ablation, result, seed=cfg.seed, init_params=self.init_params)

    def evaluate(self, state: TrainState) -> dict:
        """Test metrics of ``state`` on the evaluation split."""
        rows = None if jax.process_count() == 1 else process_rows(self.eval_batch_size, self.mesh)
        batches = data.eval_batches(self.dataset, batch_size=self.eval_batch_size, pad_remainder=True, rows=rows)
        return self.trainer.evaluate(state, batches)


# --------------------------------------------------------------------------- one cell


@dataclasses.dataclass
class CellStart:
    """Where the training of a cell starts: after pruning, or at its last checkpoint."""

    masks: Any
    state: TrainState
    start_epoch: int
    history: list
    prune_info: dict
    train_seconds: float
    mask_updates: Optional[paradigms.MaskUpdateHook] = None  # dynamic sparse training


class Diverged(Exception):
    """The training loss became non-finite (raised out of the epoch loop to stop it)."""

    def __init__(self, epoch: int, epoch_step: int, step: int, loss: float):
        super().__init__(f"non-finite training loss {loss} at epoch {epoch}, step {epoch_step}")
        self.info = {"epoch": epoch, "epoch_step": epoch_step, "step": step, "loss": str(loss)}


class _LossWatch:
    """Collects the training losses of one pass over an epoch; raises :class:`Diverged` at the first
    non-finite one (checked every :data:`DIVERGENCE_CHECK_EVERY` steps and by :meth:`flush`)."""

    def __init__(self, epoch: int, first_step: int, steps_per_epoch: int):
        self.epoch, self.steps_per_epoch = epoch, steps_per_epoch
        self.next_step = first_step  # 0-based run step of the first pending loss
        self.pending: list = []

    def add(self, loss: Any) -> None:
        self.pending.append(loss)
        if len(self.pending) >= DIVERGENCE_CHECK_EVERY:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        losses = np.asarray(jax.device_get(self.pending), np.float64)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            step = self.next_step + int(bad[0])
            raise Diverged(self.epoch + 1, step - self.epoch * self.steps_per_epoch + 1, step + 1, float(losses[bad[0]]))
        self.next_step += len(self.pending)
        self.pending = []


def restore_cell(exp: Experiment, cell: Cell, ckpt: Checkpointer) -> Optional[CellStart]:
    """The cell's state at its newest checkpoint (``None`` if it has none)."""
    step = ckpt.latest_step()
    if step is None:
        return None
    restored, meta = ckpt.restore(step, {"masks": None})
    masks = restored["masks"]
    target = paradigms.trainer_for(exp, cell).init(exp.params0, exp.batch_stats0, masks, rng=_train_rng(exp))
    restored, meta = ckpt.restore(step, {"state": target})
    start = CellStart(masks, restored["state"], int(meta["epoch"]), list(meta["history"]), meta["prune_info"],
                      float(meta["train_seconds"]))
    print(f"[{cell.name}] resumed from the checkpoint of epoch {start.start_epoch}")
    return start


def start_cell(exp: Experiment, cell: Cell) -> CellStart:
    """Prune ``cell`` and set up the training state at its first step.

    Raises:
      ValueError: the method's rewind step lies beyond the recipe's last step.
    """
    print(f"[{cell.name}] pruning ...", flush=True)
    result = exp.prune(cell)
    masks = result.masks
    prune_info = jsonable(result.summary())
    # IMP rewound to theta_k (k > 0) continues the schedule and the data stream from step k
    # (Frankle et al. 2020): the ticket trains the remaining T - k steps; so does --prune-at step:K.
    start_params, batch_stats, first_step = paradigms.training_start(exp, cell, result)
    trainer = paradigms.trainer_for(exp, cell)
    total = trainer.total_steps
    if first_step >= total:
        raise ValueError(
            f"{cell.label}: training would start at step {first_step} (rewind step), but the recipe has only {total} steps"
        )
    state = trainer.init(start_params, batch_stats, masks, rng=_train_rng(exp), start_step=first_step)
    return CellStart(masks, state, first_step // exp.steps_per_epoch, [], prune_info, 0.0)


def _train_rng(exp: Experiment) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), 2)


def _progress_bar(exp: Experiment, cell: Cell, state: TrainState) -> Optional[tqdm]:
    if not exp.progress:
        return None
    total = paradigms.trainer_for(exp, cell).total_steps
    return tqdm(total=total, initial=int(state.step), desc=cell.name, unit="step", dynamic_ncols=True, leave=False)


def train_cell(exp: Experiment, cell: Cell, start: CellStart, ckpt: Checkpointer) -> tuple[list, float, Optional[dict]]:
    """Train from ``start`` to the end of the recipe, checkpointing every epoch.

    Returns:
      ``(history, train seconds, diverged)``: one history entry per epoch trained (with the test
      metrics of the evaluated epochs); ``diverged`` is ``None`` or where the loss became non-finite.
    """
    cfg, spe = exp.config, exp.steps_per_epoch
    trainer = paradigms.trainer_for(exp, cell)
    epochs = trainer.recipe.epochs
    state, history, seconds = start.state, list(start.history), start.train_seconds
    last_eval: dict = history[-1].get("test", {}) if history else {}
    bar = _progress_bar(exp, cell, state)

    def on_step(i: int, metrics: dict) -> None:
        watch.add(metrics["loss"])
        if bar is not None:
            bar.update(1)
            if i % 5 == 0 or i == spe:
                postfix = {"loss": f"{float(metrics['loss']):.3f}", "acc": f"{float(metrics['top1']):.3f}"}
                if last_eval:
                    postfix["test"] = f"{last_eval['top1']:.3f}"
                bar.set_postfix(postfix, refresh=False)

    try:
        for epoch in range(start.start_epoch, epochs):
            exp.now.epoch = epoch + 1
            began = time.perf_counter()
            first = int(state.step)
            watch = _LossWatch(epoch, first, spe)
            batches = data.train_batches(
                exp.dataset, batch_size=cfg.recipe.batch_size, epoch=epoch, seed=cfg.seed,
                augment=cfg.recipe.augment, start_step=first - epoch * spe, rows=exp.trainer.rows,
                workers=exp.data_workers,
            )
            try:
                state, train_metrics = trainer.train_epoch(state, batches, on_step=on_step, after_step=start.mask_updates)
                watch.flush()
            except Diverged as d:
                seconds += time.perf_counter() - began
                history.append({"epoch": epoch + 1, "train_loss": None, "train_top1": None, "diverged": d.info})
                return history, seconds, d.info
            jax.block_until_ready(state.params)
            seconds += time.perf_counter() - began
            entry = {"epoch": epoch + 1, "train_loss": train_metrics["loss"], "train_top1": train_metrics["top1"]}
            if epoch + 1 == epochs or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                last_eval = exp.evaluate(state)
                entry["test"] = last_eval
            history.append(entry)
            meta = {
                "epoch": epoch + 1,
                "history": history,
                "prune_info": start.prune_info,
                "train_seconds": seconds,
                "cell": {"method": cell.method, "sparsity": cell.sparsity, "options": cell.options,
                         "seed": cell.seed, "ablation": cell.ablation},
                "config_id": exp.config_id,
            }
            with uninterrupted():  # a signal waits for the write to finish
                ckpt.save(epoch + 1, {"state": state, "masks": start.masks}, jsonable(meta))
    finally:
        if bar is not None:
            bar.close()
    return history, seconds, None


def cell_record(exp: Experiment, cell: Cell, start: CellStart, history: list, seconds: float,
                diverged: Optional[dict]) -> dict:
    """The record of a finished (or diverged) cell, as ``results.jsonl`` stores it."""
    cfg = exp.config
    report = sparsity_report(start.masks, exp.params0)
    final = {} if diverged else history[-1]["test"]
    return {
        "label": cell.label,
        "method": cell.method,
        "method_options": cell.options,
        "sparsity": cell.sparsity,
        "achieved_sparsity": report.sparsity,
        "dataset": cfg.dataset,
        "model": cfg.model,
        "seed": cfg.seed,
        "ablation": cell.ablation,
        "scores_reused": bool(start.prune_info.get("extras", {}).get("scores_reused", False)),
        "test_top1": final.get("top1"),
        "test_top5": final.get("top5"),
        "test_loss": final.get("loss"),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "diverged": diverged,
        "kept_prunable": report.prunable_kept,
        "total_prunable": report.prunable_total,
        "kept_all": report.all_kept,
        "total_all": report.all_total,
        "empty_layers": list(report.empty_layers),
        "layers": [{"name": l.name, "kept": l.kept, "total": l.total} for l in report.layers],
        "prune_seconds": float(start.prune_info.get("seconds", 0.0)),
        "train_seconds": seconds,
        "epochs": cfg.recipe.epochs,
        "history": history,
        "prune_info": start.prune_info,
        "config": cfg.as_dict(),
        "config_id": exp.config_id,
        "cell_id": cell.cell_id(exp.config_id),
        "num_devices": int(exp.mesh.devices.size),
        "num_processes": jax.process_count(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **metrics.cell_metrics(start.masks, exp.params0, *exp.layer_trace()),
    }


def run_cell(exp: Experiment, cell: Cell, *, resume: bool, keep_checkpoints: bool) -> dict:
    """Run ``cell`` to the end (or to its divergence) and append its record to ``results.jsonl``.

    Args:
      exp: the experiment.
      cell: the cell.
      resume: continue from the cell's newest checkpoint if it has one.
      keep_checkpoints: keep the cell's checkpoints once its record is written.

    Returns:
      The record.
    """
    base, exp = exp, exp.for_seed(cell.seed)
    ckpt = Checkpointer(checkpoint_path(exp.out, cell, exp.config_id))
    exp.now = base.now = Progress(cell=cell, checkpoint_dir=ckpt.directory)
    try:
        if not resume:
            ckpt.delete_all()  # Only what --restart allowed to discard can be there.
        start = restore_cell(exp, cell, ckpt) if resume else None
        if start is None:
            start = start_cell(exp, cell)
        start.mask_updates = paradigms.mask_update_hook(exp, cell, start.state)
        report = sparsity_report(start.masks, exp.params0)
        if report.empty_layers:
            print(f"WARNING [{cell.name}] empty layers: {', '.join(report.empty_layers)}")
        history, seconds, diverged = train_cell(exp, cell, start, ckpt)
        record = cell_record(exp, cell, start, history, seconds, diverged)
        record.update(paradigms.record_fields(exp, cell, start))
        if exp.config.granularity == structured_cells.CHANNEL and not diverged:
            step = ckpt.latest_step()
            target = exp.trainer.init(exp.params0, exp.batch_stats0, start.masks, rng=_train_rng(exp))
            trained = ckpt.restore(step, {"state": target})[0]["state"]
            save_to = structured_cells.compact_variables_path(record["cell_id"]) if is_main() else None
            record.update(structured_cells.compaction_record(exp, start.masks, trained, save_to))
        if is_main():
            append_record(os.path.join(exp.out, RESULTS_FILE), record)
        if not keep_checkpoints:
            ckpt.delete_all()
    finally:
        ckpt.close()
    exp.now = base.now = Progress()
    return record


__all__ = ["CellStart", "DIVERGENCE_CHECK_EVERY", "Diverged", "Experiment", "Progress", "cell_record",
           "restore_cell", "run_cell", "start_cell", "train_cell"]
