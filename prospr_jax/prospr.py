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
differentiated program is passed through :func:`prospr_jax.canonical_convs.canonicalize_convs`, which
computes every convolution in channels-last layout: XLA's CPU compiler otherwise runs the
convolutions of autodiff inside loop bodies in a slow generic form (about 30x slower on ResNet-20).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.canonical_convs import canonicalize_convs
from prospr_jax.masks import scores_on_prunable
from prospr_jax.prunable import PrunableSpec, forward_order, select_prunable
from prospr_jax.tree import PyTree, leading_axis_sizes, names_in_order

LossFn = Callable[[PyTree, Any], jax.Array]

IMPLEMENTATIONS = ("hvp", "unrolled")

_tmap = jax.tree_util.tree_map


def _axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """``a * x + y`` leaf by leaf."""
    return _tmap(lambda xi, yi: a * xi + yi, x, y)


def _check_hyper(name: str, value: Any, *, low: float = -math.inf) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{name}` must be a real number, got {value!r}") from None
    if not math.isfinite(v) or v < low:
        raise ValueError(f"`{name}` must be a finite number >= {low}, got {value!r}")
    return v


def check_batches(batches: PyTree, num_steps: int, single_batch: bool) -> None:
    """Raise unless every leaf of ``batches`` has a leading axis of length ``num_steps + 1``."""
    if single_batch:
        return
    sizes = leading_axis_sizes(batches)
    if not sizes:
        raise ValueError("`batches` has no array leaves")
    bad = [f"{name}: {size}" for name, size in sizes if size != num_steps + 1]
    if bad:
        raise ValueError(
            f"every leaf of `batches` must have a leading axis of length num_steps + 1 = {num_steps + 1} "
            f"(one batch per inner step plus one for the meta-loss); got {names_in_order(bad)}. "
            "To reuse one batch for every step pass `single_batch=True`, or stack copies with "
            "`stack_batches([batch] * (num_steps + 1))`."
        )


def check_num_steps(num_steps: Any) -> int:
    """``num_steps`` as an int, or a ``ValueError`` naming it unless it is an integer >= 0."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"`num_steps` must be an integer >= 0, got {num_steps!r}")
    return int(num_steps)


def stack_batches(batches: list[PyTree]) -> PyTree:
    """Stack a list of batches (pytrees of arrays) along a new leading axis, the layout
    :func:`prospr_scores` takes."""
    if not batches:
        raise ValueError("`batches` must be a non-empty list")
    return _tmap(lambda *xs: jnp.stack(xs), *batches)


def _gradient(loss_fn: LossFn, w: PyTree, batch: Any, weight_decay: Any) -> PyTree:
    g = jax.grad(loss_fn)(w, batch)
    return _axpy(weight_decay, w, g)


def _batch(batches: PyTree, k: Any, single_batch: bool) -> Any:
    return batches if single_batch else _tmap(lambda b: b[k], batches)


def _inner_batches(batches: PyTree, num_steps: int, single_batch: bool) -> Any:
    """The scan's ``xs`` for the inner steps: the first M batches (``None`` when reused)."""
    return None if single_batch else _tmap(lambda b: b[:num_steps], batches)


def _meta_gradient_unrolled(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    hyper: tuple[Any, Any, Any],
    *,
    num_steps: int,
    use_momentum: bool,
    first_order: bool,
    detach_first_buffer: bool,
    single_batch: bool,
    remat: bool,
) -> PyTree:
    lr, momentum, weight_decay = hyper

    def step(carry, xs):
        w, buf = carry
        batch, k = xs
        if single_batch:
            batch = batches
        g = _gradient(loss_fn, w, batch, weight_decay)
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

    if remat:
        step = jax.checkpoint(step)

    def meta_loss(w0: PyTree) -> jax.Array:
        w = w0
        if num_steps:
            buf = _tmap(jnp.zeros_like, w0) if use_momentum else None
            xs = (_inner_batches(batches, num_steps, single_batch), jnp.arange(num_steps))
            (w, _), _ = jax.lax.scan(step, (w0, buf), xs, length=num_steps)
        return loss_fn(w, _batch(batches, num_steps, single_batch))

    return jax.grad(meta_loss)(params)


def _meta_gradient_hvp(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    hyper: tuple[Any, Any, Any],
    *,
    num_steps: int,
    use_momentum: bool,
    first_order: bool,
    detach_first_buffer: bool,
    single_batch: bool,
) -> PyTree:
    lr, momentum, weight_decay = hyper

    def forward(carry, batch):
        w, buf = carry
        if single_batch:
            batch = batches
        g = _gradient(loss_fn, w, batch, weight_decay)
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
    a = jax.grad(loss_fn)(w, _batch(batches, num_steps, single_batch))
    if first_order or num_steps == 0:
        return a

    def hvp(w_k: PyTree, batch: Any, v: PyTree) -> PyTree:
        return jax.jvp(lambda x: _gradient(loss_fn, x, batch, weight_decay), (w_k,), (v,))[1]

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


@functools.partial(
    jax.jit,
    static_argnames=(
        "loss_fn",
        "num_steps",
        "use_momentum",
        "first_order",
        "detach_first_buffer",
        "single_batch",
        "implementation",
        "remat",
    ),
)
def _meta_gradient_jit(
    loss_fn, params, batches, hyper, *, num_steps, use_momentum, first_order, detach_first_buffer,
    single_batch, implementation, remat,
):
    kwargs = dict(
        num_steps=num_steps,
        use_momentum=use_momentum,
        first_order=first_order,
        detach_first_buffer=detach_first_buffer,
        single_batch=single_batch,
    )
    if implementation == "unrolled":
        compute = functools.partial(_meta_gradient_unrolled, loss_fn, remat=remat, **kwargs)
    else:
        compute = functools.partial(_meta_gradient_hvp, loss_fn, **kwargs)
    # Convolutions inside the scans in the layout XLA runs fast in loop bodies (see canonical_convs).
    return canonicalize_convs(compute)(params, batches, hyper)


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
) -> PyTree:
    """``dL(w_M; batch_M)/dw_0``: the gradient of the loss after M SGD steps w.r.t. the initial params.

    Takes the same arguments as :func:`prospr_scores` (see there) and returns a pytree with ``params``'
    structure (every leaf, pruned or not). ``prospr_scores = |params * meta_gradient|`` on the pruned
    leaves. With ``num_steps=0`` it is the plain gradient on ``batches[0]``.
    """
    num_steps = check_num_steps(num_steps)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"`implementation` must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    lr = _check_hyper("lr", lr)
    momentum = _check_hyper("momentum", momentum, low=0.0)
    weight_decay = _check_hyper("weight_decay", weight_decay)
    check_batches(batches, num_steps, bool(single_batch))
    return _meta_gradient_jit(
        loss_fn,
        params,
        batches,
        (lr, momentum, weight_decay),
        num_steps=num_steps,
        use_momentum=momentum != 0.0,
        first_order=bool(first_order),
        detach_first_buffer=bool(detach_first_buffer),
        single_batch=bool(single_batch),
        implementation=implementation,
        remat=bool(remat),
    )


def first_batch(batches: PyTree, single_batch: bool = False) -> Any:
    """The batch of inner step 0 (the whole of ``batches`` when ``single_batch``)."""
    return batches if single_batch else _tmap(lambda b: b[0], batches)


def resolve_prunable(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    prunable: PrunableSpec,
    exclude_first: bool,
    exclude_last: bool,
) -> PyTree:
    """:func:`select_prunable`, tracing ``loss_fn(params, batch)`` for the layer order when needed."""
    order = forward_order(loss_fn, params, batch) if (exclude_first or exclude_last) else None
    return select_prunable(params, prunable, exclude_first=exclude_first, exclude_last=exclude_last, order=order)


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
) -> PyTree:
    """ProsPr saliency of every prunable weight: ``|dL(w_M; batch_M)/dc|`` at ``c = 1``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``. It closes over any model state; for a flax model
        with BatchNorm, run BN in training mode (batch statistics) and throw the updated statistics
        away (METHODS.md, ProsPr step 3; see :func:`prospr_jax.models.make_loss_fn`).
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
      prunable: which leaves are scored (see :func:`prospr_jax.prunable.select_prunable`); default
        Conv/Dense kernels. The inner steps update ALL parameters whatever this says.
      exclude_first, exclude_last: leave the first / last prunable layer in forward order unscored.
      implementation: ``'hvp'`` (default; backward Hessian-vector products, memory flat in M) or
        ``'unrolled'`` (``lax.scan`` + ``jax.grad``, the readable reference). Both are exact.
      remat: with ``'unrolled'``, rematerialise each inner step (``jax.checkpoint``) so activation
        memory does not grow with ``num_steps``. ``'hvp'`` never stores activations across steps.

    Returns:
      Scores pytree with ``params``' structure: ``|theta_0 * dL(w_M)/dw_0|`` (shape of the leaf) on
      pruned leaves, a 0-d zero on the others. Feed it to :func:`prospr_jax.masks_from_scores`
      (METHODS.md: rank globally, keep the top ``ceil(d * N)``).

    The computation is jitted (compiled once per ``loss_fn``, shapes and static options; ``lr``,
    ``momentum`` and ``weight_decay`` are traced, so changing them does not recompile) and can itself
    be wrapped in ``jax.jit``.
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
    )
    selected = resolve_prunable(
        loss_fn, params, first_batch(batches, single_batch), prunable, exclude_first, exclude_last
    )
    return scores_on_prunable(_tmap(lambda p, g: jnp.abs(p * g), params, grads), selected)
