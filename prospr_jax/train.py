"""Masked training after pruning: SGD recipes and jitted train/eval steps.

Pruned weights are held at exactly zero for the whole run in two ways at once (METHODS.md, "Common
conventions"):

* the forward pass uses ``apply_masks(params, masks)``, so a pruned weight never affects the loss;
* the optimiser is :func:`prospr_jax.masked_optimizer` around the recipe's SGD, so momentum and weight decay
  never move a pruned weight away from ``0.0``.

The masks live inside the optimiser state (:class:`prospr_jax.MaskedState`), i.e. they are data: a
new mask of the same shapes reuses the compiled train step (no recompilation), which is what lets one
experiment run train many method x sparsity cells with one compilation.

Recipes (:data:`RECIPES`) follow the papers' protocols (METHODS.md, "Training recipes"):

* ``'prospr'`` (the ProsPr code): SGD momentum 0.9, lr 0.1, weight decay 5e-4, batch 256,
  200 epochs, lr x0.1 at 50% and 75% of the epochs, crop + flip augmentation;
* ``'frankle'`` (Frankle et al.): 160 epochs, batch 128, weight decay 1e-4, lr x0.1 at epochs 80
  and 120;
* ``'imagenet'``: 90 epochs, batch 256, lr 0.1, weight decay 1e-4, lr x0.1 at epochs 30, 60 and 80
  (the usual ResNet-50 recipe; an assumption of this project, not taken from the ProsPr paper).

Weight decay is coupled as in PyTorch's ``SGD(weight_decay=...)``: ``g + wd * w`` enters the
momentum buffer (``optax.add_decayed_weights`` before ``optax.sgd``), applied to every parameter
(BatchNorm scale/shift and biases included), as the ProsPr code does. Momentum has PyTorch's
semantics (``buf = mu * buf + g``, ``w -= lr * buf``), which ``optax.sgd`` shares.

Example::

    trainer = Trainer(model, RECIPES["prospr"].replace(epochs=2), steps_per_epoch=195)
    state = trainer.init(theta_0, batch_stats, masks, rng=jax.random.PRNGKey(0))
    for epoch in range(trainer.recipe.epochs):
        state, train_metrics = trainer.train_epoch(state, data.train_batches(ds, batch_size=256, epoch=epoch))
    metrics = trainer.evaluate(state, data.eval_batches(ds, batch_size=500, pad_remainder=True))
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from prospr_jax import apply_masks, check_masks, cross_entropy, masked_optimizer, masks_of
from prospr_jax._src import cpu_options
from prospr_jax._src.cpu_conv import cpu_conv_kernels_enabled, with_cpu_conv_kernels
from prospr_jax._src.sharding import batch_sharding, process_rows, replicate, replicated, shard_batch
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_int

Batch = Mapping[str, Any]
SCHEDULES = ("multistep", "cosine", "constant")


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A training recipe: optimiser, learning-rate schedule, budget and augmentation.

    Attributes:
      epochs: training epochs (>= 1).
      batch_size: training batch size (>= 1).
      lr: peak learning rate (> 0).
      momentum: heavy-ball momentum in [0, 1) (0: plain SGD).
      nesterov: Nesterov momentum.
      weight_decay: coupled L2 weight decay (PyTorch semantics), >= 0, on every parameter.
      schedule: ``'multistep'`` (lr x ``gamma`` at each milestone), ``'cosine'`` (per-step cosine
        decay to 0 over the run) or ``'constant'``.
      milestones: multistep milestones as FRACTIONS of ``epochs``, each in (0, 1]. A milestone ``f``
        takes effect at the start of epoch ``floor(f * epochs)``, as PyTorch's ``MultiStepLR`` stepped
        once per epoch; in a run too short for that epoch (``floor(f * epochs) == 0``) it takes effect
        at step ``floor(f * total_steps)``.
      gamma: multistep decay factor in (0, 1].
      warmup_epochs: linear warm-up from ``lr / warmup_steps`` to ``lr`` over this many epochs (0: none).
      augment: random crop + flip (the data pipeline's default augmentation) during training.
    """

    epochs: int = 200
    batch_size: int = 256
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    augment: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            object.__setattr__(self, name, check_int(getattr(self, name), f"Recipe.{name}", low=1))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"Recipe `lr` must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"Recipe `momentum` must be in [0, 1), got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"Recipe `weight_decay` must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"Recipe `schedule` must be one of {SCHEDULES}, got {self.schedule!r}")
        milestones = tuple(float(m) for m in self.milestones)
        if any(not 0.0 < m <= 1.0 for m in milestones) or list(milestones) != sorted(milestones):
            raise ValueError(
                f"Recipe `milestones` must be increasing fractions of the epochs in (0, 1], got {self.milestones!r}"
            )
        object.__setattr__(self, "milestones", milestones)
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"Recipe `gamma` must be in (0, 1], got {self.gamma!r}")
        if not 0.0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"Recipe `warmup_epochs` must be in [0, epochs], got {self.warmup_epochs!r}")

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["milestones"] = list(self.milestones)
        return out


RECIPES: dict[str, Recipe] = {
    "prospr": Recipe(),
    "frankle": Recipe(epochs=160, batch_size=128, weight_decay=1e-4, milestones=(0.5, 0.75)),
    "imagenet": Recipe(epochs=90, batch_size=256, weight_decay=1e-4, milestones=(1 / 3, 2 / 3, 8 / 9)),
}


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name`` (see :data:`RECIPES`); a ValueError lists the choices."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choices: {', '.join(RECIPES)}")
    return RECIPES[name]


def milestone_steps(recipe: Recipe, steps_per_epoch: int) -> tuple[int, ...]:
    """The optimiser steps at which the multistep schedule multiplies the lr by ``gamma``."""
    total = recipe.epochs * steps_per_epoch
    steps = []
    for fraction in recipe.milestones:
        epoch = int(math.floor(fraction * recipe.epochs + 1e-9))
        steps.append(epoch * steps_per_epoch if epoch >= 1 else int(math.floor(fraction * total + 1e-9)))
    return tuple(steps)


def make_schedule(recipe: Recipe, steps_per_epoch: int) -> optax.Schedule:
    """``schedule(step) -> lr`` for optimiser step ``step`` (0-based) of a run of ``recipe``.

    Steps beyond the run continue the schedule (multistep: the last lr; cosine: 0).
    """
    _check_positive_int(steps_per_epoch, "steps_per_epoch")
    total = recipe.epochs * steps_per_epoch
    warmup = int(round(recipe.warmup_epochs * steps_per_epoch))
    if recipe.schedule == "constant":
        base = optax.constant_schedule(recipe.lr)
    elif recipe.schedule == "cosine":
        base = optax.cosine_decay_schedule(recipe.lr, decay_steps=max(total, 1))
    else:
        boundaries: dict[int, float] = {}
        for step in milestone_steps(recipe, steps_per_epoch):
            boundaries[step] = boundaries.get(step, 1.0) * recipe.gamma
        base = optax.piecewise_constant_schedule(recipe.lr, boundaries)
    if warmup == 0:
        return base

    def schedule(step: Any) -> jax.Array:
        ramp = recipe.lr * (jnp.asarray(step, jnp.float32) + 1.0) / warmup
        return jnp.where(step < warmup, ramp, base(step))

    return schedule


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """The recipe's SGD (unmasked): ``chain(add_decayed_weights(wd), sgd(schedule, momentum))``.

    Wrap it with :func:`prospr_jax.masked_optimizer` (``Trainer`` does) to hold pruned weights at zero.
    """
    momentum = recipe.momentum if recipe.momentum > 0 else None
    sgd = optax.sgd(make_schedule(recipe, steps_per_epoch), momentum=momentum, nesterov=recipe.nesterov)
    if recipe.weight_decay == 0:
        return sgd
    return optax.chain(optax.add_decayed_weights(recipe.weight_decay), sgd)


# --------------------------------------------------------------------------- state and steps


class TrainState(NamedTuple):
    """Everything a masked training run carries from step to step (a pytree of arrays).

    Attributes:
      params: parameters; pruned weights are exactly ``0.0``.
      batch_stats: BatchNorm running statistics (``{}`` for models without BatchNorm).
      opt_state: state of ``masked_optimizer(recipe optimiser, masks)``; holds the masks.
      step: int32 scalar, the global optimiser step (drives the lr schedule and ``step_key``).
      rng: uint32 [2] base PRNG key; step ``t`` uses ``fold_in(rng, t)`` (dropout etc.), so the
        randomness of a step depends only on ``(rng, t)`` and a resumed run repeats it exactly.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def step_key(state: TrainState) -> jax.Array:
    """The PRNG key of the step ``state.step``: ``fold_in(state.rng, state.step)``."""
    return jax.random.fold_in(state.rng, state.step)


def _set_schedule_count(opt_state: Any, step: int) -> Any:
    """Set every schedule counter in ``opt_state`` to ``step`` (continue the schedule from there)."""
    try:
        return optax.tree_utils.tree_set(opt_state, count=jnp.asarray(step, jnp.int32))
    except KeyError:  # No counter (no schedule): nothing to continue.
        return opt_state


def _logits_and_stats(model: Any, params: PyTree, batch_stats: PyTree, images: jax.Array, *, train: bool, key=None):
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if not train:
        return model.apply(variables, images, train=False), batch_stats
    rngs = {"dropout": key} if key is not None else None
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], rngs=rngs)
    return logits, updates.get("batch_stats", batch_stats)


def _topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """float [B]: 1 where ``labels`` is among the ``k`` largest logits."""
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class Trainer:
    """Jitted masked train and eval steps for one flax classifier and one recipe.

    Build it once per (model, recipe, steps_per_epoch): every cell of an experiment then reuses the
    same compiled steps whatever its mask (masks are part of the state, not of the program).

    Attributes:
      model: a flax.linen module called as ``model.apply(variables, x, train=...)`` returning logits
        [B, num_classes]; BatchNorm statistics in the ``batch_stats`` collection.
      recipe: the training :class:`Recipe`.
      steps_per_epoch: optimiser steps per epoch (fixes the schedule's milestones).
      mesh: ``None`` (one device) or a data mesh (:func:`prospr_jax.data_mesh`): the steps then run
        data-parallel, the state replicated and each GLOBAL batch sharded over the ``'data'`` axis
        (BatchNorm statistics, the loss and the gradient are those of the global batch, as on one
        device). Batches given to :meth:`train_epoch`/:meth:`evaluate` are this process's rows of each
        global batch (:attr:`rows`; all of it with one process).
    """

    model: Any
    recipe: Recipe
    steps_per_epoch: int
    mesh: Optional[Mesh] = None
    optimizer: optax.GradientTransformation = dataclasses.field(init=False, repr=False)
    schedule: optax.Schedule = dataclasses.field(init=False, repr=False)
    train_step: Callable[..., Any] = dataclasses.field(init=False, repr=False)
    eval_step: Callable[..., Any] = dataclasses.field(init=False, repr=False)
    conv_kernels: bool = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"`recipe` must be a prospr_jax.train.Recipe, got {type(self.recipe).__name__}")
        _check_positive_int(self.steps_per_epoch, "steps_per_epoch")
        object.__setattr__(self, "optimizer", make_optimizer(self.recipe, self.steps_per_epoch))
        object.__setattr__(self, "schedule", make_schedule(self.recipe, self.steps_per_epoch))
        # The project's CPU convolution kernels (prospr_jax._src.cpu_conv) on one device; a sharded step
        # keeps XLA's convolutions, which its partitioner splits over the devices.
        object.__setattr__(self, "conv_kernels", self.mesh is None and cpu_conv_kernels_enabled())
        if self.mesh is None:
            train_step, eval_step = cpu_options.jit(self._train_step), cpu_options.jit(self._eval_step)
        else:
            process_rows(self.recipe.batch_size, self.mesh)  # the batch must split over the devices
            whole, split = replicated(self.mesh), batch_sharding(self.mesh)
            train_step = cpu_options.jit(self._train_step, in_shardings=(whole, split), out_shardings=(whole, whole))
            eval_step = cpu_options.jit(self._eval_step, in_shardings=(whole, split), out_shardings=whole)
        object.__setattr__(self, "train_step", train_step)
        object.__setattr__(self, "eval_step", eval_step)

    @property
    def total_steps(self) -> int:
        return self.recipe.epochs * self.steps_per_epoch

    @property
    def rows(self) -> Optional[slice]:
        """The rows of each global training batch this process loads (``None``: all, one process)."""
        if self.mesh is None or jax.process_count() == 1:
            return None
        return process_rows(self.recipe.batch_size, self.mesh)

    def place_batch(self, batch: Batch) -> Batch:
        """A batch (this process's rows) as the step takes it: sharded over the mesh when there is one."""
        return batch if self.mesh is None else shard_batch(batch, self.mesh)

    def init(
        self, params: PyTree, batch_stats: PyTree, masks: PyTree, *, rng: Any, start_step: int = 0
    ) -> TrainState:
        """The state at the start of training from ``params`` (theta_0) under ``masks``.

        Args:
          params: the weights training starts from (the weights the mask was computed on).
          batch_stats: initial BatchNorm statistics (``{}`` without BatchNorm).
          masks: mask pytree (see :func:`prospr_jax.masks_from_scores`); pruned weights are zeroed here.
          rng: a PRNG key (typed or raw) or an int seed; stored raw (uint32 [2]).
          start_step: the global step to start at: the lr schedule continues from it.
        """
        check_masks(masks, params)
        rng = raw_key(rng)
        start_step = check_int(start_step, "start_step", low=0)
        masks = jax.tree_util.tree_map(jnp.asarray, masks)
        params = apply_masks(params, masks)
        opt_state = masked_optimizer(self.optimizer, masks).init(params)
        if start_step:
            opt_state = _set_schedule_count(opt_state, int(start_step))
        state = TrainState(
            params=params,
            batch_stats=batch_stats if batch_stats else {},
            opt_state=opt_state,
            step=jnp.asarray(start_step, jnp.int32),
            rng=rng,
        )
        return state if self.mesh is None else replicate(state, self.mesh)

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        masks = masks_of(state.opt_state)
        images, labels = batch["image"], batch["label"]

        def loss_fn(params):
            logits, new_stats = _logits_and_stats(
                self.model, apply_masks(params, masks), state.batch_stats, images, train=True, key=step_key(state)
            )
            loss = cross_entropy(logits, labels)
            return loss, (logits, new_stats)

        if self.conv_kernels:
            loss_fn = with_cpu_conv_kernels(loss_fn)
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = masked_optimizer(self.optimizer, masks).update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "top1": jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32)),
            "lr": self.schedule(state.step),
        }
        new_state = TrainState(params, new_stats, opt_state, state.step + 1, state.rng)
        return new_state, metrics

    def _eval_step(self, state: TrainState, batch: Batch) -> dict:
        masks = masks_of(state.opt_state)

        def forward(params, batch_stats, images):
            return _logits_and_stats(self.model, params, batch_stats, images, train=False)[0]

        if self.conv_kernels:
            forward = with_cpu_conv_kernels(forward)
        logits = forward(apply_masks(state.params, masks), state.batch_stats, batch["image"])
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        labels = batch["label"]
        weight = batch["mask"] if "mask" in batch else jnp.ones(labels.shape, jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        sums = {
            "count": jnp.sum(weight),
            "loss": jnp.sum(weight * losses),
            "top1": jnp.sum(weight * _topk_correct(logits, labels, 1)),
        }
        if logits.shape[-1] > 5:
            sums["top5"] = jnp.sum(weight * _topk_correct(logits, labels, 5))
        return sums

    def train_epoch(
        self,
        state: TrainState,
        batches: Iterable[Batch],
        *,
        on_step: Optional[Callable[[int, dict], None]] = None,
        after_step: Optional[Callable[[TrainState, Batch], TrainState]] = None,
    ) -> tuple[TrainState, dict]:
        """Run one pass of train steps over ``batches``.

        Returns the new state and ``{'loss', 'top1', 'steps'}``: the mean training loss and top-1 of
        the pass (over steps). ``on_step(step, metrics)`` is called after every step with device
        arrays (a progress bar). ``after_step(state, batch) -> state`` (optional) may change the state
        after every step, e.g. a dynamic sparse training mask update
        (:class:`prospr_jax.methods.MaskUpdater`); it gets the batch as the step took it.
        """
        loss_sum = top1_sum = 0.0
        steps = 0
        for batch in batches:
            placed = self.place_batch({"image": batch["image"], "label": batch["label"]})
            state, metrics = self.train_step(state, placed)
            if after_step is not None:
                state = after_step(state, placed)
            loss_sum = loss_sum + metrics["loss"]
            top1_sum = top1_sum + metrics["top1"]
            steps += 1
            if on_step is not None:
                on_step(steps, metrics)
        if steps == 0:
            return state, {"loss": float("nan"), "top1": float("nan"), "steps": 0}
        loss_sum, top1_sum = jax.device_get((loss_sum, top1_sum))
        return state, {"loss": float(loss_sum) / steps, "top1": float(top1_sum) / steps, "steps": steps}

    def evaluate(self, state: TrainState, batches: Iterable[Batch]) -> dict:
        """Test metrics over ``batches`` (BatchNorm in inference mode, masked weights).

        Returns ``{'loss', 'top1', 'count'}`` plus ``'top5'`` when the model has more than 5 classes;
        accuracies are fractions in [0, 1]. Batches may carry ``'mask'`` (padded last batch, from
        ``eval_batches(..., pad_remainder=True)``, which keeps one compiled shape).
        """
        totals: dict[str, Any] = {}
        for batch in batches:
            sums = self.eval_step(state, self.place_batch(batch))
            totals = sums if not totals else {k: totals[k] + v for k, v in sums.items()}
        if not totals:
            raise ValueError("`batches` is empty: nothing to evaluate")
        totals = {k: float(v) for k, v in jax.device_get(totals).items()}
        count = totals.pop("count")
        return {**{k: v / count for k, v in totals.items()}, "count": int(count)}


def raw_key(key: Any) -> jax.Array:
    """``key`` as a raw uint32 [2] key: accepts typed keys (``jax.random.key``) and raw ones."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    key = jnp.asarray(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(f"expected a PRNG key (jax.random.key / PRNGKey) or an int seed, got {key!r}")
    return key


def _check_positive_int(value: Any, name: str) -> int:
    return check_int(value, name, low=1)


__all__ = [
    "RECIPES",
    "SCHEDULES",
    "Recipe",
    "TrainState",
    "Trainer",
    "get_recipe",
    "make_optimizer",
    "make_schedule",
    "milestone_steps",
    "raw_key",
    "step_key",
]
