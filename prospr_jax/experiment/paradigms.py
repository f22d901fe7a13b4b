"""When the mask is chosen and what training starts from: the paradigms of the survey in one runner.

Wang et al. ("Emerging Paradigms of Neural Network Pruning", 2021) set pruning at initialisation beside
the traditional pipeline, the lottery-ticket line and dynamic sparse training. A cell is
``(method, sparsity, options, prune_at, after)``:

* ``prune_at`` (``--prune-at``), when the mask is scored:

  - ``'init'`` (default): on ``theta_0``;
  - ``'step:K'``: on ``theta_K``, the weights after ``K`` steps of dense training (early pruning:
    DRIVE-, early-bird-style);
  - ``'end'``: on ``theta_T``, the densely trained network (the recipe's whole budget).

  The dense phase is the run's dense reference training (same ``theta_0``, data order and step
  randomness as the ``dense`` cell), computed once per run and ``K`` and shared by every cell.

* ``after`` (``--after``), what the masked training starts from:

  - ``'rewind'`` (default): the weights of the start of the schedule: ``theta_0`` at step 0 for
    ``init`` and ``end`` (a one-shot lottery ticket for ``end``), ``theta_K`` at step ``K`` for
    ``step:K`` (training continues for the remaining ``T - K`` steps), and the method's own start
    for the methods that train while pruning (IMP's ``theta_k``, DRIVE's choice);
  - ``'finetune'``: the trained weights the mask was scored on (with their BatchNorm statistics),
    fine-tuned for ``--finetune-epochs`` at the constant learning rate ``--finetune-lr`` (the
    traditional train, prune, fine-tune pipeline). Needs ``prune_at`` ``step:K`` or ``end``;
  - ``'reinit'``: new random weights (a fresh draw of the model's initialiser), same mask, the full
    budget from step 0 (the random re-initialisation control of Liu et al. 2019 and Frankle et al. 2021).

* Dynamic sparse training (``set``, ``rigl``) chooses its mask at initialisation and changes it while
  training: the runner calls the method's :class:`prospr_jax.methods.MaskUpdater` after the steps it
  names (:class:`MaskUpdateHook`); records carry ``mask_updates`` and ``mask_changed_fraction``.

Combinations that cannot be run are errors when the configuration is read (:func:`check_paradigm`).
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from prospr_jax import dense_masks, masks_of, models, replicate
from prospr_jax.experiment import pruning

PRUNE_AT_DEFAULT = "init"
AFTER_DEFAULT = "rewind"
AFTER = ("rewind", "finetune", "reinit")
REINIT_SEED_OFFSET = 3  # the re-initialised weights: models.init(fold_in(PRNGKey(seed), 3))


# --------------------------------------------------------------------------- reading the flags


def parse_prune_at(text: str) -> str:
    """``'init'``, ``'end'`` or ``'step:K'`` (``K`` an integer >= 1), as an argparse type."""
    text = str(text).strip()
    if text in ("init", "end"):
        return text
    if text.startswith("step:"):
        try:
            k = int(text[len("step:"):])
        except ValueError:
            k = 0
        if k >= 1:
            return f"step:{k}"
    raise argparse.ArgumentTypeError(f"expected 'init', 'end' or 'step:K' with an integer K >= 1, got {text!r}")


def prune_step(prune_at: str, total_steps: int) -> int:
    """The dense training steps before scoring: 0 (``init``), ``K`` (``step:K``), ``total_steps`` (``end``)."""
    if prune_at == "init":
        return 0
    if prune_at == "end":
        return int(total_steps)
    return int(parse_prune_at(prune_at).split(":")[1])


def check_paradigm(pruners: Sequence[str], prune_at: str, after: str, *, finetune_epochs: Optional[int],
                   finetune_lr: Optional[float]) -> None:
    """Refuse the combinations that cannot be run (``pruners``: the run's methods but ``dense``).

    Raises:
      ValueError: naming the flags and what is allowed.
    """
    parse_prune_at(prune_at)
    if after not in AFTER:
        raise ValueError(f"`--after` must be one of {', '.join(AFTER)}, got {after!r}")
    if after == "finetune" and prune_at == "init":
        raise ValueError(
            "`--after finetune` keeps the trained weights, but with `--prune-at init` nothing has been trained "
            "yet: use `--prune-at step:K` or `--prune-at end`, or `--after rewind`/`reinit`"
        )
    if after != "finetune":
        given = [f for f, v in (("--finetune-epochs", finetune_epochs), ("--finetune-lr", finetune_lr)) if v is not None]
        if given:
            verb = "apply" if len(given) > 1 else "applies"
            raise ValueError(f"{' and '.join(f'`{g}`' for g in given)} {verb} only with `--after finetune` (got `--after {after}`)")
    for name in pruners:
        if pruning.is_dynamic(name) and (prune_at != PRUNE_AT_DEFAULT or after != AFTER_DEFAULT):
            raise ValueError(
                f"method {name!r} is dynamic sparse training: it sets its mask at initialisation and changes it "
                f"while training, so it runs only with `--prune-at init --after rewind` (got `--prune-at {prune_at} "
                f"--after {after}`)"
            )
        if pruning.trains_while_pruning(name) and prune_at != PRUNE_AT_DEFAULT:
            raise ValueError(
                f"method {name!r} trains the network itself while it prunes: it runs only with `--prune-at init` "
                f"(got `--prune-at {prune_at}`)"
            )


def check_prune_step(prune_at: str, total_steps: int) -> None:
    """``step:K`` must lie inside the recipe's ``total_steps``.

    Raises:
      ValueError: ``K >= total_steps``.
    """
    if prune_at.startswith("step:") and prune_step(prune_at, total_steps) >= total_steps:
        raise ValueError(
            f"`--prune-at {prune_at}`: the recipe has only {total_steps} training steps; use K < {total_steps} "
            "or `--prune-at end`"
        )


# --------------------------------------------------------------------------- the cell's start


def pretrained(exp: Any, steps: int) -> Any:
    """The dense reference training's :class:`prospr_jax.train.TrainState` after ``steps`` steps
    (computed once per run and ``steps``)."""
    from prospr_jax.experiment.runner import _train_rng
    from prospr_jax.experiment.training import train_steps

    cache = exp.pretrained
    if steps not in cache:
        done = [k for k in cache if k < steps]
        if done:  # continue the longest shorter run: same stream, same result
            state = cache[max(done)]
            todo = steps - max(done)
        else:
            masks = dense_masks(exp.params0, exp.problem().prunable_tree())
            state = exp.trainer.init(exp.params0, exp.batch_stats0, masks, rng=_train_rng(exp))
            todo = steps
        print(f"dense training for {steps} steps before pruning ...", flush=True)
        cache[steps] = train_steps(exp.trainer, exp.dataset, state, todo, seed=exp.config.seed,
                                   augment=exp.config.recipe.augment)
    return cache[steps]


def scoring_problem(exp: Any, cell: Any) -> Any:
    """The :class:`prospr_jax.PruningProblem` the cell's method scores: the run's (``theta_0``) for
    ``prune_at='init'``, else the same problem on the densely trained weights and statistics."""
    problem = exp.problem()
    steps = prune_step(cell.prune_at, exp.trainer.total_steps)
    if steps == 0:
        return problem
    state = pretrained(exp, steps)
    model_state = {"batch_stats": state.batch_stats} if state.batch_stats else problem.model_state
    return problem.replace(params=state.params, model_state=model_state)


def finetune_recipe(config: Any) -> Any:
    """The recipe of ``--after finetune``: the run's, for ``finetune_epochs`` at the constant ``finetune_lr``."""
    return config.recipe.replace(epochs=config.finetune_epochs, lr=config.finetune_lr, schedule="constant",
                                 warmup_epochs=0.0)


def trainer_for(exp: Any, cell: Any) -> Any:
    """The :class:`prospr_jax.train.Trainer` of the cell's training (the fine-tuning one is built once)."""
    if cell.after != "finetune":
        return exp.trainer
    if "finetune" not in exp.paradigm_trainers:
        from prospr_jax.train import Trainer

        exp.paradigm_trainers["finetune"] = Trainer(exp.model, finetune_recipe(exp.config), exp.steps_per_epoch,
                                                      mesh=exp.mesh)
    return exp.paradigm_trainers["finetune"]


def training_start(exp: Any, cell: Any, result: Any) -> tuple[Any, Any, int]:
    """``(params, batch_stats, start_step)`` the masked training of ``cell`` starts from (module docstring)."""
    steps = prune_step(cell.prune_at, exp.trainer.total_steps)
    if cell.after == "reinit":
        key = jax.random.fold_in(jax.random.PRNGKey(exp.config.seed), REINIT_SEED_OFFSET)
        params, batch_stats = models.init(exp.model, key, (1,) + exp.input_shape)
        return params, batch_stats, 0
    if cell.after == "finetune":
        state = pretrained(exp, steps)
        return state.params, state.batch_stats, 0
    if steps == 0:
        return result.start_params, exp.batch_stats0, result.start_step
    if cell.prune_at == "end":
        return exp.params0, exp.batch_stats0, 0
    state = pretrained(exp, steps)  # step:K: continue from theta_K at step K
    return result.start_params, state.batch_stats, steps


# --------------------------------------------------------------------------- dynamic sparse training


class MaskUpdateHook:
    """``Trainer.train_epoch(..., after_step=hook)``: the mask updates of a dynamic method.

    It counts the steps on the host from the state it is built with (a resumed run continues the
    count), calls the :class:`prospr_jax.methods.MaskUpdater` after the steps it names, and keeps the
    number of updates run and the current masks. ``place`` (optional) puts the updated state back
    where the train step expects it (replicated over a data mesh).
    """

    def __init__(self, updater: Any, state: Any, place: Optional[Callable[[Any], Any]] = None):
        self.updater, self.place = updater, place
        self.step = int(state.step)
        self.updates = updater.updates_until(self.step)
        self.masks = masks_of(state.opt_state)

    def __call__(self, state: Any, batch: Any) -> Any:
        self.step += 1
        if not self.updater.is_update_step(self.step):
            return state
        params, opt_state = self.updater(state.params, state.opt_state, batch, self.step)
        self.updates += 1
        self.masks = masks_of(opt_state)
        state = state._replace(params=params, opt_state=opt_state)
        return state if self.place is None else self.place(state)


def mask_update_hook(exp: Any, cell: Any, state: Any) -> Optional[MaskUpdateHook]:
    """The cell's :class:`MaskUpdateHook` (``None`` for a fixed mask)."""
    if cell.method not in pruning.method_names() or not pruning.is_dynamic(cell.method):
        return None
    updater = pruning.mask_updater(cell.method, exp.problem(), cell.options, trainer_for(exp, cell).total_steps)
    place = None if exp.mesh.devices.size == 1 else (lambda tree: replicate(tree, exp.mesh))
    return MaskUpdateHook(updater, state, place)


def changed_fraction(first: Any, final: Any) -> float:
    """Fraction of the final mask's kept prunable entries that the first mask did not keep."""
    kept = new = 0
    for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(final)):
        if np.ndim(a) < 1:
            continue
        a, b = np.asarray(a) != 0, np.asarray(b) != 0
        kept += int(b.sum())
        new += int((b & ~a).sum())
    return new / kept if kept else 0.0


def record_fields(exp: Any, cell: Any, start: Any) -> dict:
    """The paradigm's fields of a cell's record: ``prune_at``, ``after``, ``dense_steps_before_pruning``,
    ``train_epochs`` (the epochs of the recipe the masked training follows: the fine-tuning epochs for
    ``after='finetune'``; a start at step K trains the rest of them), ``mask_updates`` and
    ``mask_changed_fraction`` (0 for a fixed mask). ``start``: the cell's
    :class:`prospr_jax.experiment.runner.CellStart`."""
    hook = start.mask_updates
    return {
        "prune_at": cell.prune_at,
        "after": cell.after,
        "dense_steps_before_pruning": prune_step(cell.prune_at, exp.trainer.total_steps),
        "train_epochs": trainer_for(exp, cell).recipe.epochs,
        "mask_updates": 0 if hook is None else hook.updates,
        "mask_changed_fraction": 0.0 if hook is None else changed_fraction(start.masks, hook.masks),
    }


__all__ = [
    "AFTER", "AFTER_DEFAULT", "MaskUpdateHook", "PRUNE_AT_DEFAULT", "changed_fraction", "check_paradigm",
    "check_prune_step", "finetune_recipe", "mask_update_hook", "parse_prune_at", "pretrained", "prune_step",
    "record_fields", "scoring_problem", "trainer_for", "training_start",
]
