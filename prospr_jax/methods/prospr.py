"""ProsPr: Prospect Pruning (Alizadeh et al., ICLR 2022).

Put a mask ``c = 1`` on the prunable initial weights, ``w_0 = c * theta_0``; take M SGD steps on all
parameters, ``w_{k+1} = w_k - lr * dL(w_k; batch_k)/dw_k``; score every weight by
``|dL(w_M; batch_M)/dc|`` at ``c = 1``, differentiating through all M steps. Since the mask multiplies
``theta_0``, ``dL/dc = theta_0 * dL(w_M)/dw_0``: everything hinges on the *meta-gradient*
``dL(w_M)/dw_0``, computed here in two exact ways.

``implementation='hvp'`` (default): accumulate the meta-gradient backwards through the steps with one
Hessian-vector product per step. For plain SGD, ``dw_{k+1}/dw_k = I - lr H_k`` (``H_k`` the Hessian of
``L(.; batch_k)`` at ``w_k``), so with ``a_M = grad L(w_M; batch_M)``::

    a_k = a_{k+1} - lr * H_k a_{k+1},     meta-gradient = a_0.

With heavy-ball momentum (PyTorch semantics: ``b_k = mu b_{k-1} + g_k``, ``b_{-1} = 0``,
``w_{k+1} = w_k - lr b_k``) the adjoint ``p_k`` of the buffer ``b_k`` joins in::

    p_k = -lr * a_{k+1} + mu * p_{k+1}    (p_M = 0)
    a_k = a_{k+1} + H_k p_k

and weight decay ``wd`` (``g_k += wd * w_k``) adds ``wd * p_k`` to ``H_k p_k``. The forward sweep keeps
only the M parameter snapshots ``w_0 .. w_{M-1}``; each Hessian-vector product is forward-over-reverse
(``jax.jvp`` of ``jax.grad``) at one snapshot, so memory does not grow with M beyond the snapshots.

``implementation='unrolled'``: the readable reference. The M steps are one ``lax.scan`` and
``jax.grad`` differentiates the meta-loss through it (reverse-over-reverse). Autodiff keeps every
step's activations unless ``remat=True`` wraps each step in ``jax.checkpoint``.

Both run as one ``lax.scan`` whatever M is, so the compiled program does not grow with M. The
differentiated program is passed through the convolution rewrite (``prospr_jax._src.jaxpr.canonical_convs``), which
computes every convolution in channels-last layout: XLA's CPU compiler otherwise runs the
convolutions of autodiff inside loop bodies in a slow generic form (about 30x slower on ResNet-20).
On CPU it is compiled with :func:`prospr_jax._src.cpu_options.cpu_compiler_options` (convolutions
kept out of YNNPACK, whose weight-gradient convolutions are slow), and the loss's convolutions run
through the project's own kernels (:mod:`prospr_jax._src.cpu_conv`: the loss is rewritten before it
is differentiated, so every convolution of the meta-gradient, of any derivative order, is a kernel
call) unless they are switched off.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src import cpu_options
from prospr_jax._src.cpu_conv import cpu_conv_kernels_enabled, with_cpu_conv_kernels
from prospr_jax._src.jaxpr.canonical_convs import canonicalize_convs
from prospr_jax._src.losses import LossFn
from prospr_jax._src.masks import scores_on_prunable
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec, prunable_for_loss
from prospr_jax._src.tree import PyTree, is_traced, leading_axis_sizes, named_leaves, names_in_order
from prospr_jax._src.validate import check_bool, check_choice, check_int, check_real
from prospr_jax.methods.base import Method, register

IMPLEMENTATIONS = ("hvp", "unrolled")

_tmap = jax.tree_util.tree_map


@dataclasses.dataclass(frozen=True)
class ProsPrOptions:
    """The settings of ProsPr's inner training and of its meta-gradient (see :func:`prospr_scores`).

    ``lr``, ``momentum`` and ``weight_decay`` may be traced values (a sweep under ``jit`` or ``vmap``):
    their shape and dtype are checked, their values only when concrete.
    """

    num_steps: int = 3
    lr: Any = 0.1
    momentum: Any = 0.0
    weight_decay: Any = 0.0
    first_order: bool = False
    detach_first_buffer: bool = False
    single_batch: bool = False
    implementation: str = "hvp"
    remat: bool = False
    micro_batches: int = 1

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("num_steps", check_int(self.num_steps, "num_steps", low=0))
        set_("micro_batches", check_int(self.micro_batches, "micro_batches", low=1))
        set_("lr", check_real(self.lr, "lr", low=0.0, low_open=True, traced_ok=True))
        set_("momentum", check_real(self.momentum, "momentum", low=0.0, high=1.0, high_open=True, traced_ok=True))
        set_("weight_decay", check_real(self.weight_decay, "weight_decay", low=0.0, traced_ok=True))
        for name in ("first_order", "detach_first_buffer", "single_batch", "remat"):
            set_(name, check_bool(getattr(self, name), name))
        check_choice(self.implementation, "implementation", IMPLEMENTATIONS)

    @property
    def use_momentum(self) -> bool:
        """Whether the momentum buffer is needed (always for a traced momentum)."""
        return is_traced(self.momentum) or self.momentum != 0.0


def _axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y`` leaf by leaf."""
    return _tmap(lambda xi, yi: a * xi + yi, x, y)


def check_batches(batches: PyTree, num_steps: int, single_batch: bool, micro_batches: int = 1) -> None:
    """Raise unless every leaf of ``batches`` has a leading axis of length ``num_steps + 1`` and a batch
    axis that ``micro_batches`` divides."""
    sizes = leading_axis_sizes(batches)
    if not sizes:
        raise ValueError("`batches` has no array leaves")
    if micro_batches > 1:
        axis = 0 if single_batch else 1
        rows = [(name, np.shape(leaf)[axis] if np.ndim(leaf) > axis else None)
                for name, leaf in named_leaves(batches)]
        bad = [f"{name}: {n}" for name, n in rows if n is None or n % micro_batches]
        if bad:
            raise ValueError(
                f"micro_batches={micro_batches} must divide the batch size (axis {axis} of every leaf of "
                f"`batches`); got {names_in_order(bad)}"
            )
    if single_batch:
        return
    bad = [f"{name}: {size}" for name, size in sizes if size != num_steps + 1]
    if bad:
        raise ValueError(
            f"every leaf of `batches` must have a leading axis of length num_steps + 1 = {num_steps + 1} "
            f"(one batch per inner step plus one for the meta-loss); got {names_in_order(bad)}. "
            "To reuse one batch for every step pass `single_batch=True`, or stack copies with "
            "`stack_batches([batch] * (num_steps + 1))`."
        )


def stack_batches(batches: list[PyTree]) -> PyTree:
    """Stack a list of batches (pytrees of arrays) along a new leading axis, the layout
    :func:`prospr_scores` takes."""
    if not isinstance(batches, (list, tuple)) or not batches:
        raise ValueError("`batches` must be a non-empty list of batches")
    return _tmap(lambda *xs: jnp.stack(xs), *batches)


def first_batch(batches: PyTree, single_batch: bool = False) -> Any:
    """The batch of inner step 0 (the whole of ``batches`` when ``single_batch``)."""
    return batches if single_batch else _tmap(lambda b: b[0], batches)


def _micro_mean(fn: Any, batch: Any, micro_batches: int, remat: bool = False) -> Any:
    """``fn(batch)`` as the mean of ``fn`` over ``micro_batches`` equal slices of the batch axis.

    Micro-batch ``j`` holds rows ``j, j + n, j + 2n, ...`` (``n = micro_batches``), so each stays spread
    over the devices a batch is sharded on. One ``lax.scan`` runs the slices one after another: only one
    slice's activations are alive at a time. For a loss that is a mean over examples (and no layer that
    mixes examples) the mean over slices equals ``fn(batch)``; with BatchNorm in training mode each slice
    is normalised by its own statistics.
    """
    if micro_batches == 1:
        return fn(batch)
    slices = _tmap(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1),
                   batch)
    body_fn = jax.checkpoint(fn) if remat else fn

    def body(total, micro):
        return _tmap(jnp.add, total, body_fn(micro)), None

    first = _tmap(lambda x: x[0], slices)
    zeros = _tmap(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
    total, _ = jax.lax.scan(body, zeros, slices)
    return _tmap(lambda t: t / micro_batches, total)


def _loss_gradient(loss_fn: LossFn, w: PyTree, batch: Any, micro_batches: int) -> PyTree:
    """``dL(w; batch)/dw``, accumulated over ``micro_batches`` slices of the batch."""
    return _micro_mean(lambda b: jax.grad(loss_fn)(w, b), batch, micro_batches)


def _gradient(loss_fn: LossFn, w: PyTree, batch: Any, weight_decay: Any, micro_batches: int = 1) -> PyTree:
    return _axpy(weight_decay, w, _loss_gradient(loss_fn, w, batch, micro_batches))


def _batch(batches: PyTree, k: Any, single_batch: bool) -> Any:
    return batches if single_batch else _tmap(lambda b: b[k], batches)


def _inner_batches(batches: PyTree, num_steps: int, single_batch: bool) -> Any:
    """The scan's ``xs`` for the inner steps: the first M batches (``None`` when reused)."""
    return None if single_batch else _tmap(lambda b: b[:num_steps], batches)


class _Static(NamedTuple):
    """The settings that shape the compiled program (one static argument of the jitted computation)."""

    num_steps: int
    use_momentum: bool
    first_order: bool
    detach_first_buffer: bool
    single_batch: bool
    implementation: str
    remat: bool
    micro_batches: int


def _meta_gradient_unrolled(loss_fn: LossFn, params: PyTree, batches: PyTree, hyper: tuple, st: _Static) -> PyTree:
    lr, momentum, weight_decay = hyper
    num_steps, use_momentum, single_batch = st.num_steps, st.use_momentum, st.single_batch
    first_order, detach_first_buffer = st.first_order, st.detach_first_buffer

    def step(carry, xs):
        w, buf = carry
        batch, k = xs
        if single_batch:
            batch = batches
        g = _axpy(weight_decay, w, _micro_mean(lambda b: jax.grad(loss_fn)(w, b), batch, st.micro_batches, st.remat))
        if first_order:
            g = jax.lax.stop_gradient(g)
        if use_momentum:
            buf = _axpy(momentum, buf, g)
            if detach_first_buffer:
                buf = _tmap(lambda b: jnp.where(k == 0, jax.lax.stop_gradient(b), b), buf)
            direction = buf
        else:
            direction = g
        return (_axpy(-lr, direction, w), buf), None

    if st.remat:
        step = jax.checkpoint(step)

    def meta_loss(w0: PyTree) -> jax.Array:
        w = w0
        if num_steps:
            buf = _tmap(jnp.zeros_like, w0) if use_momentum else None
            xs = (_inner_batches(batches, num_steps, single_batch), jnp.arange(num_steps))
            (w, _), _ = jax.lax.scan(step, (w0, buf), xs, length=num_steps)
        return _micro_mean(lambda b: loss_fn(w, b), _batch(batches, num_steps, single_batch), st.micro_batches,
                           st.remat)

    return jax.grad(meta_loss)(params)


def _meta_gradient_hvp(loss_fn: LossFn, params: PyTree, batches: PyTree, hyper: tuple, st: _Static) -> PyTree:
    lr, momentum, weight_decay = hyper
    num_steps, use_momentum, single_batch = st.num_steps, st.use_momentum, st.single_batch
    first_order, detach_first_buffer = st.first_order, st.detach_first_buffer

    def forward(carry, batch):
        w, buf = carry
        if single_batch:
            batch = batches
        g = _gradient(loss_fn, w, batch, weight_decay, st.micro_batches)
        if use_momentum:
            buf = _axpy(momentum, buf, g)
            g = buf
        return (_axpy(-lr, g, w), buf), (None if first_order else w)

    w = params
    snapshots = None
    if num_steps:
        buf = _tmap(jnp.zeros_like, params) if use_momentum else None
        (w, _), snapshots = jax.lax.scan(
            forward, (params, buf), _inner_batches(batches, num_steps, single_batch), length=num_steps
        )
    a = _loss_gradient(loss_fn, w, _batch(batches, num_steps, single_batch), st.micro_batches)
    if first_order or num_steps == 0:
        return a

    def hvp(w_k: PyTree, batch: Any, v: PyTree) -> PyTree:
        return jax.jvp(lambda x: _gradient(loss_fn, x, batch, weight_decay, st.micro_batches), (w_k,), (v,))[1]

    def backward(carry, xs):
        a_next, p_next = carry
        w_k, batch = xs
        if single_batch:
            batch = batches
        p = _axpy(-lr, a_next, _tmap(lambda x: momentum * x, p_next))
        return (_tmap(jnp.add, a_next, hvp(w_k, batch, p)), p), None

    first = 1 if (use_momentum and detach_first_buffer) else 0
    xs = (
        _tmap(lambda s: s[first:], snapshots),
        None if single_batch else _tmap(lambda b: b[first:num_steps], batches),
    )
    # With the first buffer detached, step 0 contributes nothing to the meta-gradient: a_0 = a_1.
    (a, _), _ = jax.lax.scan(
        backward, (a, _tmap(jnp.zeros_like, a)), xs, length=num_steps - first, reverse=True
    )
    return a


def _meta_gradient_program(loss_fn: LossFn, params: PyTree, batches: PyTree, hyper: tuple, static: _Static,
                           conv_kernels: bool = False) -> PyTree:
    compute = _meta_gradient_unrolled if static.implementation == "unrolled" else _meta_gradient_hvp
    if conv_kernels:  # the loss's convolutions through the project's CPU kernels, before differentiating
        loss_fn = with_cpu_conv_kernels(loss_fn)
    # Convolutions inside the scans in the layout XLA runs fast in loop bodies (see canonical_convs).
    return canonicalize_convs(functools.partial(compute, loss_fn, st=static))(params, batches, hyper)


@functools.cache
def _meta_gradient_jit() -> Any:
    # Built at the first call, when the backend (and so the CPU compiler options) is known.
    return cpu_options.jit(_meta_gradient_program, static_argnames=("loss_fn", "static", "conv_kernels"))


def meta_gradient(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    *,
    num_steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_order: bool = False,
    detach_first_buffer: bool = False,
    single_batch: bool = False,
    implementation: str = "hvp",
    remat: bool = False,
    micro_batches: int = 1,
) -> PyTree:
    """``dL(w_M; batch_M)/dw_0``: the gradient of the loss after M SGD steps w.r.t. the initial params.

    Takes the same arguments as :func:`prospr_scores` (see there) and returns a pytree with ``params``'
    structure (every leaf, pruned or not). ``prospr_scores = |params * meta_gradient|`` on the pruned
    leaves. With ``num_steps=0`` it is the plain gradient on ``batches[0]``.
    """
    o = ProsPrOptions(
        num_steps=num_steps, lr=lr, momentum=momentum, weight_decay=weight_decay, first_order=first_order,
        detach_first_buffer=detach_first_buffer, single_batch=single_batch, implementation=implementation,
        remat=remat, micro_batches=micro_batches,
    )
    check_batches(batches, o.num_steps, o.single_batch, o.micro_batches)
    static = _Static(o.num_steps, o.use_momentum, o.first_order, o.detach_first_buffer, o.single_batch,
                     o.implementation, o.remat, o.micro_batches)
    return _meta_gradient_jit()(loss_fn, params, batches, (o.lr, o.momentum, o.weight_decay), static=static,
                                conv_kernels=cpu_conv_kernels_enabled())


def prospr_scores(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    *,
    num_steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_order: bool = False,
    detach_first_buffer: bool = False,
    single_batch: bool = False,
    prunable: PrunableSpec = None,
    exclude_first: bool = False,
    exclude_last: bool = False,
    implementation: str = "hvp",
    remat: bool = False,
    micro_batches: int = 1,
) -> PyTree:
    """ProsPr saliency of every prunable weight: ``|dL(w_M; batch_M)/dc|`` at ``c = 1``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``. It closes over any model state; for a flax model
        with BatchNorm, run BN in training mode (batch statistics) and throw the updated statistics
        away (docs/methods.md, ProsPr; :func:`prospr_jax.classifier_loss_fn` builds such a loss).
      params: parameter pytree ``theta_0`` (the initial weights).
      batches: pytree of arrays whose leaves have a leading axis of length ``num_steps + 1``: batch k
        feeds inner step k, batch M the meta-loss (the paper's default: a fresh batch each time;
        :func:`stack_batches` builds this from a list). With ``single_batch=True``, ``batches`` is
        one batch used for every step and for the meta-loss.
      num_steps: M, the number of inner SGD steps (default 3, the paper's). ``0`` gives SNIP.
      lr: inner-step learning rate (default 0.1).
      momentum: heavy-ball momentum with PyTorch semantics (``buf_0 = g_0``,
        ``buf = mu * buf + g``, ``w -= lr * buf``); default 0 (plain SGD, the paper's).
      weight_decay: L2 term added to the inner gradients, ``g += wd * w`` (default 0, the paper's).
      first_order: treat the inner gradients as constants: score ``|g_M * theta_0|`` with ``g_M`` the
        gradient at ``w_M`` (used for ImageNet-scale models).
      detach_first_buffer: stop the gradient through the first momentum buffer, as the official code
        does (``buf_0 = g_0.detach()``); only matters with ``momentum > 0``. Default off.
      single_batch: ``batches`` is one batch, reused for every step.
      prunable: which leaves are scored (see :func:`prospr_jax.select_prunable`); default
        Conv/Dense kernels. The inner steps update ALL parameters whatever this says.
      exclude_first, exclude_last: leave the first / last prunable layer in forward order unscored.
      implementation: ``'hvp'`` (default; backward Hessian-vector products, memory flat in M) or
        ``'unrolled'`` (``lax.scan`` + ``jax.grad``, the readable reference). Both are exact.
      remat: with ``'unrolled'``, rematerialise each inner step (``jax.checkpoint``) so activation
        memory does not grow with ``num_steps``. ``'hvp'`` never stores activations across steps.
      micro_batches: split every batch into this many equal slices (default 1: whole batches) and
        accumulate each gradient, Hessian-vector product and the meta-loss over the slices, one slice
        at a time, so activation memory is that of ``batch_size / micro_batches`` examples. Exact for
        a loss that is a mean over independent examples; with BatchNorm in training mode each slice
        is normalised by its own batch statistics (as with a smaller batch), so the scores change.
        Must divide the batch size.

    Returns:
      Scores pytree with ``params``' structure: ``|theta_0 * dL(w_M)/dw_0|`` (shape of the leaf) on
      pruned leaves, a 0-d zero on the others. Feed it to :func:`prospr_jax.masks_from_scores`
      (the paper ranks globally and keeps the top ``ceil(d * N)``).

    The computation is jitted with ``loss_fn`` as a static argument: it is compiled once per
    ``loss_fn`` object, shapes and static options (build the loss once and reuse it). ``lr``,
    ``momentum`` and ``weight_decay`` are data: changing them does not recompile, and they may be
    traced, so ``jax.jit(lambda lr: prospr_scores(..., lr=lr))`` and ``jax.vmap`` over a vector of
    learning rates work. Concrete values are checked: ``lr > 0``, ``0 <= momentum < 1``,
    ``weight_decay >= 0``, all finite.
    """
    grads = meta_gradient(
        loss_fn,
        params,
        batches,
        num_steps=num_steps,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        first_order=first_order,
        detach_first_buffer=detach_first_buffer,
        single_batch=single_batch,
        implementation=implementation,
        remat=remat,
        micro_batches=micro_batches,
    )
    selected = prunable_for_loss(
        loss_fn, params, first_batch(batches, single_batch), prunable, exclude_first, exclude_last
    )
    return scores_on_prunable(_tmap(lambda p, g: jnp.abs(p * g), params, grads), selected)


@register
class ProsPr(Method):
    """Registry row of ProsPr: :func:`prospr_scores` on a :class:`prospr_jax.PruningProblem`.

    Batches: ``problem.batch(0), ..., problem.batch(num_steps)`` (one per inner step plus one for the
    meta-loss, the paper's default); with ``single_batch=True`` only ``problem.batch(0)``, reused.
    Defaults are the paper's (M = 3, lr = 0.1, plain SGD).
    """

    name = "prospr"
    paper = "Alizadeh et al., ICLR 2022"
    idea = "|dL(w_M)/dc| at c = 1: saliency of the mask through M = 3 inner SGD steps (meta-gradient)"
    data = "M+1 batches"
    cost = "M+1 forward/backward passes + M Hessian-vector products"
    needs = ("batch_fn",)
    Options = ProsPrOptions

    def score(self, problem: PruningProblem, options: ProsPrOptions) -> PyTree:
        if options.single_batch:
            batches = problem.batch(0)
        else:
            batches = stack_batches([problem.batch(i) for i in range(options.num_steps + 1)])
        return prospr_scores(
            problem.loss_fn, problem.params, batches, prunable=problem.prunable_tree(), **dataclasses.asdict(options)
        )


__all__ = ["IMPLEMENTATIONS", "ProsPr", "ProsPrOptions", "meta_gradient", "prospr_scores", "stack_batches"]
