"""A channel-pruned model as a smaller flax.linen Module: narrower layers, the same code.

:func:`prospr_jax.structured.compact` removes every dropped channel from the variables and runs the
model's traced program on them. :func:`compact_module` goes one step further and returns a flax.linen
Module with its smaller variables:

* for a zoo model, the same class with narrower layers (``VGG(config=(23, 'M', 51, ...))``,
  ``CifarResNet(widths=..., block_widths=..., skip_positions=...)``, ``ResNet(stem_width=...,
  block_widths=...)``, ``LeNet5(conv_widths=..., fc_width=...)``, ``LeNet300100(hidden=...)``): plain
  ``nn.Conv``/``nn.Dense``/``nn.BatchNorm`` layers with fewer features, the parameter tree of the
  original with smaller leaves. It trains, fine-tunes, serialises and ``tabulate``-s like any flax
  model; nothing of the pruning library is needed to run it.
* for any other flax.linen model, a :class:`TracedCompactModule`: a flax.linen Module around the
  traced compact program (same variable tree as the original, smaller leaves). ``apply`` works in
  both modes, and in training mode with ``mutable=['batch_stats']`` it returns the updated running
  statistics of the kept channels, as the original model does.

Either way the outputs equal the channel-masked model's ``model.apply(apply_masks(params, masks))``
up to float rounding, in inference and in training mode; :func:`compact_module` checks this on the
example input before it returns (``check=True``) and raises :class:`CompactionError` otherwise.

Channel order: a compact layer holds its kept channels in their original order. In a CIFAR ResNet
the option-A shortcut of a stage's first block puts the incoming channels at explicit places
(``skip_positions``) when pruning made the centred zero padding of the paper wrong. A ResNet keeps
its projection shortcuts where the original had them (``projection`` follows the nominal
``widths``), even where a compacted block's input and output widths happen to be equal.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.losses import flax_apply_fn
from prospr_jax._src.masks import apply_masks
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax.models.lenet import LeNet5, LeNet300100
from prospr_jax.models.resnet import ResNet
from prospr_jax.models.resnet_cifar import CifarResNet
from prospr_jax.models.vgg import VGG
from prospr_jax.structured.compaction import CompactionError, CompactModel, LeafSlice, compact
from prospr_jax.structured.groups import ChannelGroups, model_channel_groups


def _out_width(params: Mapping[str, Any], layer: str) -> int:
    node = params
    for part in layer.split("/"):
        node = node[part]
    return int(np.shape(node["kernel"])[-1])


def _kept(slices: Mapping[str, LeafSlice], layer: str) -> np.ndarray:
    s = slices[f"{layer}/kernel"]
    return np.arange(s.shape[-1]) if s.chan is None else np.asarray(s.chan, np.int64)


def _digits(n: int) -> int:
    return len(str(n))


def _narrow_vgg(model: VGG, params: Mapping[str, Any], slices: Mapping[str, LeafSlice]) -> VGG:
    digits = _digits(sum(1 for v in model.config if v != "M"))
    config, index = [], 0
    for v in model.config:
        if v == "M":
            config.append(v)
            continue
        index += 1
        config.append(_out_width(params, f"conv{index:0{digits}d}"))
    return model.clone(config=tuple(config), parent=None)


def _cifar_block_names(model: CifarResNet) -> list[list[str]]:
    sd, bd = _digits(len(model.widths)), _digits(model.blocks_per_stage - 1)
    return [[f"layer{s + 1:0{sd}d}_block{b:0{bd}d}" for b in range(model.blocks_per_stage)]
            for s in range(len(model.widths))]


def _narrow_cifar_resnet(model: CifarResNet, params: Mapping[str, Any], slices: Mapping[str, LeafSlice]) -> CifarResNet:
    names = _cifar_block_names(model)
    stem = _out_width(params, "conv_stem")
    widths = tuple(_out_width(params, f"{stage[0]}/conv2") for stage in names)
    if widths[0] != stem:
        raise CompactionError(f"the stem keeps {stem} channels but the first stage's residual stream keeps "
                              f"{widths[0]}: the masks do not come from this model's channel groups")
    block_widths = tuple(_out_width(params, f"{name}/conv1") for stage in names for name in stage)
    positions: list[Optional[tuple[int, ...]]] = [None]
    previous = _kept(slices, "conv_stem")
    for s in range(1, len(names)):
        current = _kept(slices, f"{names[s][0]}/conv2")
        # Where the model's own shortcut puts each incoming channel: its explicit places (a model
        # compacted before), or the paper's centred zero padding.
        given = None if model.skip_positions is None else model.skip_positions[s]
        if given is not None:
            target = np.asarray(given, np.int64)[previous]
        else:
            target = previous + (model.widths[s] - model.widths[s - 1]) // 2
        where = np.searchsorted(current, target)
        if np.any(where >= len(current)) or not np.array_equal(current[np.minimum(where, len(current) - 1)],
                                                               target):
            raise CompactionError(f"stage {s + 1}: a kept channel of the shortcut has no kept place in the "
                                  "block's output (the masks do not come from this model's channel groups)")
        extra = widths[s] - widths[s - 1]
        centred = np.arange(widths[s - 1]) + extra // 2
        positions.append(None if np.array_equal(where, centred) else tuple(int(i) for i in where))
        previous = current
    return model.clone(
        widths=widths,
        block_widths=None if block_widths == tuple(w for w in widths for _ in range(model.blocks_per_stage))
        else block_widths,
        skip_positions=None if all(p is None for p in positions) else tuple(positions),
        parent=None,
    )


def _narrow_resnet(model: ResNet, params: Mapping[str, Any], slices: Mapping[str, LeafSlice]) -> ResNet:
    sd, bd = _digits(len(model.stage_sizes)), _digits(max(model.stage_sizes) - 1)
    convs = ("conv1", "conv2") if model.block_cls.expansion == 1 else ("conv1", "conv2", "conv3")
    block_widths = []
    for s, n in enumerate(model.stage_sizes):
        for b in range(n):
            name = f"layer{s + 1:0{sd}d}_block{b:0{bd}d}"
            block_widths.append(tuple(_out_width(params, f"{name}/{c}") for c in convs))
    return model.clone(stem_width=_out_width(params, "conv_stem"), block_widths=tuple(block_widths), parent=None)


def _narrow_lenet5(model: LeNet5, params: Mapping[str, Any], slices: Mapping[str, LeafSlice]) -> LeNet5:
    return model.clone(conv_widths=(_out_width(params, "conv1"), _out_width(params, "conv2")),
                       fc_width=_out_width(params, "fc1"), parent=None)


def _narrow_lenet300100(model: LeNet300100, params: Mapping[str, Any], slices: Mapping[str, LeafSlice]) -> LeNet300100:
    return model.clone(hidden=tuple(_out_width(params, f"fc{i + 1}") for i in range(len(model.hidden))),
                       parent=None)


# The zoo classes and how to read their narrower widths off the compact variables.
NARROWERS = {
    VGG: _narrow_vgg,
    CifarResNet: _narrow_cifar_resnet,
    ResNet: _narrow_resnet,
    LeNet5: _narrow_lenet5,
    LeNet300100: _narrow_lenet300100,
}


class TracedCompactModule(nn.Module):
    """A flax.linen Module around a :class:`prospr_jax.structured.CompactModel` (for models outside the zoo).

    Its variables have the original model's tree with the compact shapes (``{'params': ...,
    'batch_stats': ...}``). ``init`` gives zeros of those shapes (use the variables that
    :func:`compact_module` returns). ``apply(variables, x, train=False)`` returns the original model's
    outputs; in training mode with ``mutable=['batch_stats']`` the running statistics of the kept
    channels are updated as the original model updates them.

    Attributes:
      program: the compact program of the original model's ``apply`` in inference mode.
      train_program: the same for training mode, returning ``(outputs, updated_state)``.
    """

    program: CompactModel
    train_program: CompactModel

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> Any:
        shapes = _compact_shapes(self.program.param_slices, self.program.param_tree)
        stat_shapes = _compact_shapes(self.program.state_slices, self.program.state_tree).get("batch_stats", {})
        params = {k: self.param(k, lambda _rng, a=a: _zeros(a)) for k, a in shapes.items()}
        stats = {k: self.variable("batch_stats", k, lambda a=a: _zeros(a)) for k, a in stat_shapes.items()}
        state = {"batch_stats": {k: v.value for k, v in stats.items()}} if stats else {}
        if not train or not stats:
            return self.program.apply(params, state, x, train)
        out, new_state = self.train_program.apply(params, state, x, True)
        if not self.is_initializing():
            for k, v in stats.items():
                v.value = new_state["batch_stats"][k]
        return out


def _compact_shapes(slices: Mapping[str, LeafSlice], treedef: Any) -> Any:
    """The compact shapes in the original tree (``slices`` is in its flattening order)."""
    return jax.tree_util.tree_unflatten(treedef, [jax.ShapeDtypeStruct(s.compact_shape, s.dtype) for s in slices.values()])


def _zeros(shapes: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def _with_placeholders(groups: ChannelGroups, params: PyTree, masks: PyTree, round_to: int = 1) -> tuple[PyTree, PyTree]:
    """Params and masks in which every kernel keeps a multiple of ``round_to`` output channels, at
    least one (or all it has), the added ones dead.

    A flax layer cannot be 0 wide, and CPU/GPU convolutions run channel counts that are multiples of
    8 faster than odd ones. A placeholder is one of the layer's dropped channel groups, kept with every
    member zero (its kernel columns, bias, BatchNorm scale and shift, as the masked model has them)
    and the kernel rows that read it zeroed too, so it outputs exactly zero, as in the masked model,
    and gets zero gradients: fine-tuning leaves it dead.
    """
    kept = groups.kept_groups(masks).copy()
    placeholders: list[int] = []
    changed = True
    while changed:  # re-keeping a group can add to other layers (a residual stream's kernels) as well
        changed = False
        for (kind, _), ids in groups.units.items():
            members = np.unique(ids[ids >= 0])
            if kind != "out" or not members.size:
                continue
            have = int(np.sum(kept[members]))
            want = min(members.size, max(1, -(-have // round_to) * round_to))
            if have < want:
                add = members[~kept[members]][: want - have]
                kept[add] = True
                placeholders += [int(g) for g in add]
                changed = True
    if not placeholders:
        return params, masks
    masked = apply_masks(params, masks)
    dead = np.zeros(groups.num_groups, bool)
    dead[placeholders] = True
    flat = dict(named_leaves(masked))
    for (kind, name), ids in groups.units.items():
        if kind == "in" and np.any(dead[np.maximum(ids, 0)] & (ids >= 0)):
            rows = np.flatnonzero((ids >= 0) & dead[np.maximum(ids, 0)])
            flat[name] = jnp.asarray(flat[name]).at[..., rows, :].set(0)
    leaves = [flat[name] for name, _ in named_leaves(masked)]
    masked = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(masked), leaves)
    return masked, groups.leaf_masks(kept.astype(np.float32), params)


def _flax_train_apply_fn(model: nn.Module) -> Any:
    def apply_fn(params: PyTree, state: PyTree, x: jax.Array, train: bool) -> Any:
        out, updates = model.apply({"params": params, **state}, x, train=train, mutable=list(state))
        return out, {**state, **updates}

    return apply_fn


def compact_module(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    masks: PyTree,
    example_input: Any,
    *,
    groups: Optional[ChannelGroups] = None,
    check: bool = True,
    round_to: int = 1,
) -> tuple[nn.Module, PyTree, PyTree]:
    """The channel-masked ``model`` as a smaller flax.linen Module and its variables.

    Args:
      model: a flax.linen classifier called as ``model.apply(variables, x, train=...)``: a zoo model
        (narrowed in its own class) or any other (wrapped in a :class:`TracedCompactModule`).
      params: its parameters (trained or not; masked entries are dropped whatever they hold).
      batch_stats: its BatchNorm running statistics (``{}`` without BatchNorm).
      masks: channel masks of whole groups (:func:`prospr_jax.structured.prune_channels` or
        ``groups.leaf_masks``).
      example_input: an input batch ``[N, ...]`` (its shape and dtype drive the tracing; with
        ``check`` the outputs on it are compared).
      groups: the model's channel groups in inference mode (default: traced here).
      check: compare the compact Module's outputs with the masked model's on ``example_input`` in
        inference mode (one forward pass of each) and raise if they differ beyond float rounding.
      round_to: for a zoo model, give every layer a multiple of ``round_to`` channels (or all it
        has) by keeping some pruned channels as dead ones (see below): 1 (the default) keeps exactly
        the kept channels; 8 runs faster on CPUs and GPUs (odd widths make slower convolutions) for a
        few more parameters.

    Returns:
      ``(compact_model, compact_params, compact_batch_stats)``:
      ``compact_model.apply({'params': compact_params, 'batch_stats': compact_batch_stats}, x,
      train=...)`` equals ``model.apply`` of the masked variables up to float rounding.

    A zoo layer whose every output channel is pruned keeps one channel that is exactly zero (its
    kernel column, bias, BatchNorm scale and shift zero, as in the masked model, and the rows that read
    it zero): a flax layer cannot be 0 wide. Such dead channels (also those that ``round_to`` adds)
    change no output and get no gradient, so they stay zero when the compact model is fine-tuned;
    they count in the compact parameters.

    Raises:
      CompactionError: the model cannot be compacted (see :func:`prospr_jax.structured.compact`) or
        the check failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a flax.linen Module, got {type(model).__name__}; for other models "
                        "use prospr_jax.structured.compact (a pure function of arrays)")
    state = {"batch_stats": batch_stats} if batch_stats else {}
    apply_fn = flax_apply_fn(model)
    narrower = next((f for cls, f in NARROWERS.items() if type(model) is cls), None)
    if groups is None:
        groups = model_channel_groups(apply_fn, params, state, example_input)
    if isinstance(round_to, bool) or not isinstance(round_to, (int, np.integer)) or round_to < 1:
        raise ValueError(f"`round_to` must be a positive int (1: exact widths, 8: multiples of 8), got {round_to!r}")
    source_params, source_masks = params, masks
    if narrower is not None:
        source_params, source_masks = _with_placeholders(groups, params, masks, int(round_to))
    program, small_params, small_state = compact(apply_fn, source_params, state, source_masks, example_input,
                                                 groups=groups)
    small_stats = small_state.get("batch_stats", {}) if small_state else {}
    if narrower is not None:
        compact_model = narrower(model, small_params, program.param_slices)
        _check_tree(compact_model, small_params, small_stats, example_input)
    else:
        train_program = CompactModel(_flax_train_apply_fn(model), program.param_slices, program.state_slices,
                                     program.param_tree, program.state_tree)
        compact_model = TracedCompactModule(program=program, train_program=train_program)
    if check:
        # Jitted: one compilation each instead of one per operation run eagerly.
        want = jax.jit(lambda p, s, x: apply_fn(p, s, x, False))(apply_masks(params, masks), state, example_input)
        variables = _variables(small_params, small_stats)
        got = jax.jit(lambda v, x: compact_model.apply(v, x, train=False))(variables, example_input)
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        if got.shape != want.shape or not err <= 1e-4 * scale + 1e-6:
            raise CompactionError(f"the compact {type(compact_model).__name__} differs from the masked model on "
                                  f"the example input (max |difference| {err:.3g}, output scale {scale:.3g})")
    return compact_model, small_params, small_stats


def architecture_changes(original: nn.Module, narrow: nn.Module) -> dict[str, Any]:
    """The attributes of ``narrow`` that differ from ``original``'s (JSON-ready: tuples become lists):
    ``original.clone(**architecture_changes(original, narrow))`` rebuilds the narrow model."""
    out = {}
    for field in dataclasses.fields(original):
        if field.name in ("parent", "name") or not hasattr(narrow, field.name):
            continue
        a, b = getattr(original, field.name), getattr(narrow, field.name)
        if a != b:
            out[field.name] = json.loads(json.dumps(b, default=str))
    return out


def _variables(params: PyTree, batch_stats: PyTree) -> dict:
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _check_tree(compact_model: nn.Module, small_params: PyTree, small_stats: PyTree, example_input: Any) -> None:
    """The narrowed zoo model's own variable shapes are those of the compact variables."""
    shapes = jax.eval_shape(lambda x: compact_model.init(jax.random.key(0), x, train=False), example_input)
    want = _variables(small_params, small_stats)
    got_shapes = jax.tree_util.tree_map(lambda s: tuple(s.shape), dict(shapes))
    want_shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), want)
    if got_shapes != want_shapes:
        raise CompactionError(f"the narrowed {type(compact_model).__name__}'s variables do not have the compact "
                              "shapes (the masks do not come from this model's channel groups)")


__all__ = ["NARROWERS", "TracedCompactModule", "architecture_changes", "compact_module"]
