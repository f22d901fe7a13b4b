"""Prune at initialisation, train the sparse network, compare methods: the project's main job.

    python -m experiments.prune_train                      # offline demo (preset 'demo', digits)
    python -m experiments.prune_train --preset prospr-resnet20-cifar10 --dataset ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.prune_train --methods prospr snip grasp --sparsities 0.9 0.98 --epochs 20 --out runs/x
    python -m experiments.prune_train --out runs/x --resume      # continue an interrupted run

For every method x sparsity cell: initialise the model (theta_0, the same for every cell of a seed),
build a :class:`prospr_jax.PruningProblem` whose batches come from the training pipeline (without
augmentation unless ``--prune-augment``), prune (timed), train from theta_0 under the mask with the
recipe (pruned weights exactly zero throughout), evaluate on the test split. ``dense`` is a
pseudo-method: the unpruned network (sparsity 0), the reference line.

Outputs in ``--out`` (default ``runs/<preset>``):

* ``results.jsonl``: one JSON record per finished cell, appended (never truncated);
* ``results.md``: the table method x sparsity -> final test accuracy, with kept weights and timings;
* ``accuracy.png``: final test top-1 vs sparsity, one line per method;
* ``checkpoints/<cell>/``: orbax checkpoints written at the end of every epoch of the running cell
  (removed when the cell is finished unless ``--keep-checkpoints``).

``--resume`` continues from the last checkpoint of an unfinished cell and skips the cells whose record
is already in ``results.jsonl``; the final result equals that of an uninterrupted run with the same
seed (data order, augmentation and step randomness are functions of (seed, epoch, step)).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from experiments import plots
from experiments.presets import DEFAULT_PRESET, PRESETS, get_preset

DENSE = "dense"
RESULTS_FILE = "results.jsonl"
TABLE_FILE = "results.md"
PLOT_FILE = "accuracy.png"
CHECKPOINT_DIR = "checkpoints"
# Settings that do not change a cell's result: left out of the configuration fingerprint.
_NOT_IN_FINGERPRINT = ("eval_every", "eval_batch_size", "in_memory")


# --------------------------------------------------------------------------- command line


def _int_at_least(low: int):
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_non_negative_int = _int_at_least(0)


def _sparsity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a sparsity must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"a sparsity must be in [0, 1) (e.g. 0.9 for 90%%), got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m experiments.prune_train`` (``prospr-prune-train``)."""
    from prospr_jax import methods, models  # pylint: disable=import-outside-toplevel
    from prospr_jax.train import RECIPES, SCHEDULES  # pylint: disable=import-outside-toplevel

    presets = "\n".join(f"  {p.name:<30} {p.description}" for p in PRESETS.values())
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    parser = argparse.ArgumentParser(
        prog=script if script.startswith("prospr-prune-train") else "python -m experiments.prune_train",
        description="Prune at initialisation with several methods and sparsities, train, evaluate, tabulate.",
        epilog=f"presets (flags override their fields):\n{presets}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--preset", default=DEFAULT_PRESET, choices=tuple(PRESETS), help=f"protocol to start from (default {DEFAULT_PRESET!r})")
    add("--dataset", help="'digits' (offline), a tfds catalog name (e.g. cifar10) or a path to a split/class/image folder or archive")
    add("--data-dir", help="tfds data dir of catalog data sets")
    add("--cache-dir", help="cache of folder/archive data sets converted to tfds")
    add("--subset", type=_positive_int, help="train on a stratified subset of this many training examples")
    add("--image-size", type=_positive_int, help="resize catalog images to this square size (ImageNet)")
    add("--in-memory", action="store_true", help="read the data set into memory first (faster for small sets)")
    add("--model", choices=models.names(), help="model zoo name")
    add("--model-options", type=_json_object, help='JSON keyword arguments of the model, e.g. \'{"stem": "cifar"}\'')
    add("--methods", nargs="+", choices=(DENSE,) + methods.names(), metavar="METHOD",
        help=f"pruning methods ('dense' = unpruned reference); choices: {', '.join((DENSE,) + methods.names())}")
    add("--sparsities", nargs="+", type=_sparsity, metavar="S", help="sparsities in [0, 1) of the prunable weights")
    add("--method-options", type=_json_object,
        help='JSON {method: {option: value}} passed to prospr_jax.methods.prune, e.g. \'{"prospr": {"num_steps": 1}}\'')
    add("--num-steps", type=_non_negative_int, help="ProsPr inner steps M (shortcut for --method-options)")
    add("--density-rule", choices=("erk", "lamp"), help="per-layer density rule for score methods")
    add("--scope", choices=("global", "layerwise"), help="ranking scope (default global)")
    add("--min-per-layer", type=_non_negative_int, help="keep at least this many weights per layer (collapse guard)")
    add("--prune-batch-size", type=_positive_int, help="batch size of the scoring batches (default: preset, else --batch-size)")
    add("--prune-augment", action="store_true", help="augment the scoring batches too (default: no augmentation)")
    add("--recipe", choices=tuple(RECIPES), help="training recipe (prospr: ProsPr code; frankle: Frankle et al.)")
    add("--epochs", type=_positive_int)
    add("--batch-size", type=_positive_int)
    add("--lr", type=float, help="peak learning rate")
    add("--momentum", type=_non_negative_float)
    add("--weight-decay", type=_non_negative_float)
    add("--schedule", choices=SCHEDULES)
    add("--warmup-epochs", type=_non_negative_float)
    add("--no-augment", action="store_true", help="train without crop/flip augmentation")
    add("--seed", type=_non_negative_int, default=0, help="seed of theta_0, data order, subset and random pruning")
    add("--eval-every", type=_non_negative_int, default=1, help="evaluate every N epochs (0: only at the end)")
    add("--eval-batch-size", type=_positive_int, default=500)
    add("--out", help="output directory (default runs/<preset>)")
    add("--resume", action="store_true", help="continue the run in --out: skip finished cells, resume from checkpoints")
    add("--keep-checkpoints", action="store_true", help="keep each finished cell's last checkpoint")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Resolved settings of a run (preset + flags)."""

    dataset: str
    data_dir: Optional[str]
    cache_dir: Optional[str]
    subset: Optional[int]
    image_size: Optional[int]
    in_memory: bool
    model: str
    model_options: dict
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    method_options: dict
    density_rule: Optional[str]
    scope: str
    min_per_layer: int
    prune_batch_size: int
    prune_augment: bool
    recipe_name: str
    recipe: Any
    seed: int
    eval_every: int
    eval_batch_size: int
    preset: str

    def fingerprint_dict(self) -> dict:
        """Everything that determines a cell's result except the method, its options and the sparsity."""
        out = {
            "dataset": self.dataset,
            "subset": self.subset,
            "image_size": self.image_size,
            "model": self.model,
            "model_options": self.model_options,
            "density_rule": self.density_rule,
            "scope": self.scope,
            "min_per_layer": self.min_per_layer,
            "prune_batch_size": self.prune_batch_size,
            "prune_augment": self.prune_augment,
            "recipe": self.recipe.as_dict(),
            "seed": self.seed,
        }
        return out

    def as_dict(self) -> dict:
        out = self.fingerprint_dict()
        out.update(
            preset=self.preset,
            recipe_name=self.recipe_name,
            methods=list(self.methods),
            sparsities=list(self.sparsities),
            method_options=self.method_options,
            eval_every=self.eval_every,
            eval_batch_size=self.eval_batch_size,
            in_memory=self.in_memory,
        )
        return out


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> RunConfig:
    """Merge the preset with the flags; ``parser.error`` (exit 2) on anything invalid."""
    from prospr_jax import methods as registry  # pylint: disable=import-outside-toplevel
    from prospr_jax.train import get_recipe  # pylint: disable=import-outside-toplevel

    preset = get_preset(args.preset)
    dataset = args.dataset if args.dataset is not None else preset.dataset
    if dataset is None:
        parser.error(f"--dataset is required with --preset {preset.name}: {preset.dataset_hint}")
    methods = tuple(args.methods) if args.methods else preset.methods
    if len(set(methods)) != len(methods):
        parser.error(f"--methods lists a method twice: {list(methods)}")
    sparsities = tuple(args.sparsities) if args.sparsities else preset.sparsities
    if len(set(sparsities)) != len(sparsities):
        parser.error(f"--sparsities lists a sparsity twice: {list(sparsities)}")

    method_options = {m: dict(o) for m, o in preset.method_options.items() if m in methods}
    for name, options in (args.method_options or {}).items():
        if name not in registry.names():
            parser.error(
                f"--method-options: keys must be method names ({', '.join(registry.names())}), got {name!r}"
            )
        if not isinstance(options, dict):
            parser.error(f"--method-options: the options of {name!r} must be a JSON object, got {options!r}")
        method_options.setdefault(name, {}).update(options)
    if args.num_steps is not None:
        method_options.setdefault("prospr", {})["num_steps"] = args.num_steps
    unused = sorted(set(method_options) - set(methods))
    if unused:
        parser.error(f"--method-options/--num-steps given for {unused}, which are not in --methods {list(methods)}")
    if args.density_rule is not None:
        mask_methods = [m for m in methods if m != DENSE and registry.get(m).kind == "masks"]
        if mask_methods:
            parser.error(
                f"--density-rule applies to single-shot score methods; {mask_methods} produce masks directly"
            )

    recipe_name = args.recipe or preset.recipe
    overrides = dict(preset.recipe_overrides) if recipe_name == preset.recipe else {}
    for field, value in (
        ("epochs", args.epochs),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("momentum", args.momentum),
        ("weight_decay", args.weight_decay),
        ("schedule", args.schedule),
        ("warmup_epochs", args.warmup_epochs),
    ):
        if value is not None:
            overrides[field] = value
    if args.no_augment:
        overrides["augment"] = False
    try:
        recipe = get_recipe(recipe_name).replace(**overrides)
    except ValueError as e:
        parser.error(str(e))
    prune_batch_size = args.prune_batch_size or preset.prune_batch_size or recipe.batch_size
    model_options = dict(preset.model_options)
    if args.model is not None and args.model != preset.model:
        model_options = {}
    model_options.update(args.model_options or {})
    image_size = args.image_size if args.image_size is not None else preset.image_size
    if image_size is not None and args.dataset is not None and args.image_size is None:
        image_size = None  # The preset's resize is for its own catalog data set only.
    return RunConfig(
        dataset=dataset,
        data_dir=args.data_dir,
        cache_dir=args.cache_dir,
        subset=args.subset,
        image_size=image_size,
        in_memory=bool(args.in_memory),
        model=args.model or preset.model,
        model_options=model_options,
        methods=methods,
        sparsities=sparsities,
        method_options=method_options,
        density_rule=args.density_rule,
        scope=args.scope or "global",
        min_per_layer=args.min_per_layer if args.min_per_layer is not None else 0,
        prune_batch_size=prune_batch_size,
        prune_augment=bool(args.prune_augment),
        recipe_name=recipe_name,
        recipe=recipe,
        seed=args.seed,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        preset=preset.name,
    )


# --------------------------------------------------------------------------- results file


def read_records(path: str) -> list[dict]:
    """The records of a results file (a missing file has none; unreadable lines are skipped with a
    warning, e.g. a line cut by a crash mid-write)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"warning: {path}:{number} is not a JSON record; ignored", file=sys.stderr)
    return records


def append_record(path: str, record: dict) -> None:
    """Append one JSON line to ``path`` (created if missing) and flush it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() > 0:
            with open(path, "rb") as g:  # A previous writer killed mid-line: start a fresh line.
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    f.write("\n")
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as plain JSON data; arrays larger than 64 entries and other objects are dropped (None)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if depth > 6:
        return None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            converted = _jsonable(v, depth + 1)
            if converted is not None or v is None:
                out[str(k)] = converted
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.asarray(value)
        if arr.size <= 64 and arr.dtype.kind in "biuf":
            return arr.tolist()
    return None


# --------------------------------------------------------------------------- one cell


@dataclasses.dataclass(frozen=True)
class Cell:
    method: str
    sparsity: float
    options: dict

    @property
    def label(self) -> str:
        if not self.options:
            return self.method
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}[{opts}]"

    def cell_id(self, config_id: str) -> str:
        return _digest({"config": config_id, "method": self.method, "options": self.options, "sparsity": round(self.sparsity, 9)})

    def dirname(self, config_id: str) -> str:
        return f"{self.method}-s{self.sparsity:g}-{self.cell_id(config_id)}"


def cells_of(config: RunConfig) -> list[Cell]:
    """The run's cells: 'dense' once at sparsity 0, every other method at every sparsity."""
    cells = []
    for method in config.methods:
        if method == DENSE:
            cells.append(Cell(DENSE, 0.0, {}))
            continue
        for s in config.sparsities:
            cells.append(Cell(method, float(s), dict(config.method_options.get(method, {}))))
    return cells


class Experiment:
    """What every cell of a run shares: data, model, theta_0, the compiled train/eval steps."""

    def __init__(self, config: RunConfig, dataset: Any, out: str, *, progress: bool):
        import jax  # pylint: disable=import-outside-toplevel

        from prospr_jax import data, models  # pylint: disable=import-outside-toplevel
        from prospr_jax.experiment.training import make_train_fn  # pylint: disable=import-outside-toplevel
        from prospr_jax.train import Trainer  # pylint: disable=import-outside-toplevel

        self.config, self.dataset, self.out, self.progress = config, dataset, out, progress
        self.config_id = _digest(config.fingerprint_dict())
        self.num_classes = dataset.num_classes
        self.input_shape = tuple(dataset.image_shape)
        self.model = models.get(config.model, self.num_classes, **config.model_options)
        self.params0, self.batch_stats0 = models.init(
            self.model, jax.random.PRNGKey(config.seed), (1,) + self.input_shape
        )
        self.steps_per_epoch = data.steps_per_epoch(dataset, config.recipe.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training split has {len(dataset.train)} examples, fewer than one batch of "
                f"--batch-size {config.recipe.batch_size}"
            )
        if data.steps_per_epoch(dataset, config.prune_batch_size) < 1:
            raise ValueError(
                f"the training split has {len(dataset.train)} examples, fewer than one scoring batch of "
                f"{config.prune_batch_size} (--prune-batch-size)"
            )
        self.trainer = Trainer(self.model, config.recipe, self.steps_per_epoch)
        self.train_fn = make_train_fn(self.trainer, dataset, batch_stats=self.batch_stats0, seed=config.seed)
        self._prune_batches: dict[int, Any] = {}
        self._problem = None

    # ----- pruning

    def batch_fn(self, i: int) -> Any:
        """The i-th scoring batch: step i of the (unaugmented) training stream, as jax arrays."""
        import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

        from prospr_jax.experiment.training import batch_at_step  # pylint: disable=import-outside-toplevel

        if i not in self._prune_batches:
            batch = batch_at_step(
                self.dataset, i, batch_size=self.config.prune_batch_size, seed=self.config.seed,
                augment=self.config.prune_augment,
            )
            self._prune_batches[i] = {"image": jnp.asarray(batch["image"]), "label": jnp.asarray(batch["label"])}
        return self._prune_batches[i]

    def problem(self) -> Any:
        """The run's PruningProblem, built once: its functions keep their identity across cells, so
        the pruners' jitted computations compile once per run, not once per cell."""
        import jax  # pylint: disable=import-outside-toplevel

        from prospr_jax import PruningProblem  # pylint: disable=import-outside-toplevel

        if self._problem is not None:
            return self._problem
        variables = {"params": self.params0}
        if self.batch_stats0:
            variables["batch_stats"] = self.batch_stats0
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

    def prune(self, cell: Cell) -> tuple[Any, dict, Any]:
        """``(masks, info, start_params)`` of ``cell``; info['seconds'] is the pruning wall time."""
        from prospr_jax import dense_masks, methods  # pylint: disable=import-outside-toplevel

        if cell.method == DENSE:
            problem = self.problem()
            masks = dense_masks(self.params0, problem.prunable_tree())
            return masks, {"method": DENSE, "sparsity": 0.0, "seconds": 0.0}, self.params0
        cfg = self.config
        masks, info = methods.prune(
            cell.method,
            self.problem(),
            cell.sparsity,
            density_rule=cfg.density_rule,
            scope=cfg.scope,
            min_per_layer=cfg.min_per_layer,
            **cell.options,
        )
        # Training starts from the weights the mask was computed on: theta_0, or the rewound
        # weights of the methods that train while pruning (IMP: theta_k; DRIVE: its start params).
        start = info.get("start_params", info.get("rewound_params", self.params0))
        return masks, info, start

    # ----- one cell

    def run_cell(self, cell: Cell, *, resume: bool, keep_checkpoints: bool) -> dict:
        import jax  # pylint: disable=import-outside-toplevel

        from prospr_jax import data, sparsity_report  # pylint: disable=import-outside-toplevel
        from prospr_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

        cfg, trainer = self.config, self.trainer
        epochs = cfg.recipe.epochs
        ckpt = Checkpointer(os.path.join(self.out, CHECKPOINT_DIR, cell.dirname(self.config_id)))
        rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2)
        step = ckpt.latest_step() if resume else None
        if not resume:
            ckpt.delete_all()
        if step is not None:
            restored, meta = ckpt.restore(step, {"masks": None})
            masks = restored["masks"]
            target = trainer.init(self.params0, self.batch_stats0, masks, rng=rng)
            restored, meta = ckpt.restore(step, {"state": target})
            state = restored["state"]
            start_epoch, history = int(meta["epoch"]), list(meta["history"])
            prune_info, train_seconds = meta["prune_info"], float(meta["train_seconds"])
            print(f"[{cell.label} s={cell.sparsity:g}] resumed from the checkpoint of epoch {start_epoch}")
        else:
            print(f"[{cell.label} s={cell.sparsity:g}] pruning ...", flush=True)
            masks, info, start_params = self.prune(cell)
            prune_info = _jsonable({k: v for k, v in info.items() if k not in ("start_params", "rewound_params", "trained_params")})
            # IMP rewound to theta_k (k > 0) continues the schedule and the data stream from step k
            # (Frankle et al. 2020): the ticket trains the remaining T - k steps.
            first_step = int(info.get("start_step", 0))
            if first_step >= epochs * self.steps_per_epoch:
                raise ValueError(
                    f"{cell.label}: training would start at step {first_step} (rewind step), but the recipe "
                    f"has only {epochs * self.steps_per_epoch} steps"
                )
            state = trainer.init(start_params, self.batch_stats0, masks, rng=rng, start_step=first_step)
            start_epoch, history, train_seconds = first_step // self.steps_per_epoch, [], 0.0

        report = sparsity_report(masks, self.params0)
        if report.empty_layers:
            print(f"WARNING [{cell.label} s={cell.sparsity:g}] empty layers: {', '.join(report.empty_layers)}")
        eval_every = cfg.eval_every
        last_eval: dict = history[-1].get("test", {}) if history else {}
        bar = _progress(self.progress, epochs * self.steps_per_epoch, int(state.step),
                        f"{cell.label} s={cell.sparsity:g}")
        try:
            for epoch in range(start_epoch, epochs):
                began = time.perf_counter()
                batches = data.train_batches(
                    self.dataset, batch_size=cfg.recipe.batch_size, epoch=epoch, seed=cfg.seed, augment=cfg.recipe.augment,
                    start_step=int(state.step) - epoch * self.steps_per_epoch,
                )

                def on_step(i: int, metrics: dict, bar=bar) -> None:
                    if bar is None:
                        return
                    bar.update(1)
                    if i % 5 == 0 or i == self.steps_per_epoch:
                        postfix = {"loss": f"{float(metrics['loss']):.3f}", "acc": f"{float(metrics['top1']):.3f}"}
                        if last_eval:
                            postfix["test"] = f"{last_eval['top1']:.3f}"
                        bar.set_postfix(postfix, refresh=False)

                state, train_metrics = trainer.train_epoch(state, batches, on_step=on_step)
                jax.block_until_ready(state.params)
                train_seconds += time.perf_counter() - began
                entry = {"epoch": epoch + 1, "train_loss": train_metrics["loss"], "train_top1": train_metrics["top1"]}
                if epoch + 1 == epochs or (eval_every and (epoch + 1) % eval_every == 0):
                    last_eval = self.evaluate(state)
                    entry["test"] = last_eval
                history.append(entry)
                meta = {
                    "epoch": epoch + 1,
                    "history": history,
                    "prune_info": prune_info,
                    "train_seconds": train_seconds,
                    "cell": {"method": cell.method, "sparsity": cell.sparsity, "options": cell.options},
                    "config_id": self.config_id,
                }
                ckpt.save(epoch + 1, {"state": state, "masks": masks}, _jsonable(meta))
        finally:
            if bar is not None:
                bar.close()

        final = history[-1]["test"]
        record = {
            "label": cell.label,
            "method": cell.method,
            "method_options": cell.options,
            "sparsity": cell.sparsity,
            "achieved_sparsity": report.sparsity,
            "dataset": cfg.dataset,
            "model": cfg.model,
            "seed": cfg.seed,
            "test_top1": final["top1"],
            "test_top5": final.get("top5"),
            "test_loss": final["loss"],
            "final_train_loss": history[-1]["train_loss"],
            "kept_prunable": report.prunable_kept,
            "total_prunable": report.prunable_total,
            "kept_all": report.all_kept,
            "total_all": report.all_total,
            "empty_layers": list(report.empty_layers),
            "layers": [{"name": l.name, "kept": l.kept, "total": l.total} for l in report.layers],
            "prune_seconds": float(prune_info.get("seconds", 0.0)),
            "train_seconds": train_seconds,
            "epochs": epochs,
            "history": history,
            "prune_info": prune_info,
            "config": cfg.as_dict(),
            "config_id": self.config_id,
            "cell_id": cell.cell_id(self.config_id),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        append_record(os.path.join(self.out, RESULTS_FILE), _jsonable(record))
        if not keep_checkpoints:
            ckpt.delete_all()
        ckpt.close()
        return record

    def evaluate(self, state: Any) -> dict:
        from prospr_jax import data  # pylint: disable=import-outside-toplevel

        batches = data.eval_batches(self.dataset, batch_size=self.config.eval_batch_size, pad_remainder=True)
        return self.trainer.evaluate(state, batches)


def _progress(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------- main


def _load_dataset(config: RunConfig, parser: argparse.ArgumentParser) -> Any:
    from prospr_jax import data  # pylint: disable=import-outside-toplevel

    try:
        return data.load(
            config.dataset,
            data_dir=config.data_dir,
            cache_dir=config.cache_dir,
            subset=config.subset,
            seed=config.seed,
            image_size=config.image_size,
            in_memory=config.in_memory,
        )
    except (ValueError, data.DatasetNotPreparedError, FileNotFoundError, NotADirectoryError) as e:
        parser.error(f"--dataset {config.dataset!r}: {e}")


def _summary_line(record: dict) -> str:
    top5 = "" if record["test_top5"] is None else f"  top-5 {100 * record['test_top5']:.2f}%"
    return (
        f"[{record['label']} s={record['sparsity']:g}] test top-1 {100 * record['test_top1']:.2f}%{top5}  "
        f"kept {record['kept_prunable']:,}/{record['total_prunable']:,} prunable weights  "
        f"prune {record['prune_seconds']:.1f} s  train {record['train_seconds']:.1f} s"
    )


def write_report(out: str, records: Sequence[dict], title: str) -> tuple[str, str, str]:
    """Write results.md and accuracy.png in ``out``; returns (markdown text, md path, png path)."""
    text = plots.results_markdown(records, title)
    md_path = os.path.join(out, TABLE_FILE)
    tmp = md_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, md_path)
    png_path = plots.plot_accuracy(records, os.path.join(out, PLOT_FILE), title)
    return text, md_path, png_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the experiment; returns the exit status (0, or 1 if a cell failed)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = resolve_config(args, parser)
    out = args.out or os.path.join("runs", config.preset)
    if os.path.exists(out) and not os.path.isdir(out):
        parser.error(f"--out {out!r} exists and is not a directory")
    results_path = os.path.join(out, RESULTS_FILE)
    if os.path.exists(results_path) and not os.path.isfile(results_path):
        parser.error(f"--out {out!r}: {RESULTS_FILE} exists and is not a file")

    config_id = _digest(config.fingerprint_dict())
    cells = cells_of(config)
    done = {r.get("cell_id") for r in read_records(results_path) if r.get("config_id") == config_id}
    if args.resume:
        have_checkpoints = any(
            os.path.isdir(os.path.join(out, CHECKPOINT_DIR, c.dirname(config_id))) for c in cells
        )
        have_results = any(c.cell_id(config_id) in done for c in cells)
        if not (have_checkpoints or have_results):
            parser.error(
                f"--resume: nothing to resume in {out!r}: no checkpoint and no finished cell of this "
                "configuration (same preset/flags and seed). Run without --resume to start."
            )

    from prospr_jax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel

    dataset = _load_dataset(config, parser)
    os.makedirs(out, exist_ok=True)
    _quiet_logs()
    try:
        experiment = Experiment(config, dataset, out, progress=not args.no_progress)
    except ValueError as e:
        parser.error(str(e))
    print(
        f"prune_train: {config.model} on {dataset.name} ({len(dataset.train):,} train / {len(dataset.test):,} test, "
        f"{dataset.num_classes} classes), {config.recipe.epochs} epochs of {experiment.steps_per_epoch} steps, "
        f"{len(cells)} cells -> {out}",
        flush=True,
    )
    failures = []
    for cell in cells:
        if args.resume and cell.cell_id(config_id) in done:
            print(f"[{cell.label} s={cell.sparsity:g}] already in {RESULTS_FILE}: skipped")
            leftover = os.path.join(out, CHECKPOINT_DIR, cell.dirname(config_id))
            if not args.keep_checkpoints and os.path.isdir(leftover):  # Killed after the record was written.
                Checkpointer(leftover).delete_all()
            continue
        try:
            record = experiment.run_cell(cell, resume=args.resume, keep_checkpoints=args.keep_checkpoints)
        except (ValueError, TypeError, ImportError, NotImplementedError) as e:
            failures.append((cell, e))
            print(f"ERROR [{cell.label} s={cell.sparsity:g}] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            continue
        print(_summary_line(record), flush=True)

    latest: dict[str, dict] = {}
    for r in read_records(results_path):
        if r.get("config_id") == config_id:
            latest[r["cell_id"]] = r
    records = list(latest.values())
    title = f"{config.model} on {dataset.name}, {config.recipe.epochs} epochs, seed {config.seed}"
    text, md_path, png_path = write_report(out, records, title)
    print()
    print(text)
    print(f"results: {results_path}\ntable:   {md_path}\nplot:    {png_path}")
    if failures:
        print(f"{len(failures)} cell(s) failed: " + ", ".join(f"{c.label} s={c.sparsity:g}" for c, _ in failures),
              file=sys.stderr)
        return 1
    return 0


def _quiet_logs() -> None:
    import logging  # pylint: disable=import-outside-toplevel

    logging.getLogger("absl").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

        absl_logging.set_verbosity(absl_logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
