"""The runner's command line and its resolution into a :class:`RunConfig` (preset + flags).

Every flag of the parser defaults to ``None`` (``store_true`` flags too), so that the flags a user
gave are known: :func:`resolve_config` fills the others from the preset, and :func:`resume_config`
fills them from the stored configuration of the run being resumed and reports the given ones that
disagree with it.
"""

from __future__ import annotations

import argparse
import importlib
import dataclasses
import hashlib
import json
import math
from typing import Any, Mapping, Optional, Sequence

from prospr_jax import models
from prospr_jax.experiment.ablations import ABLATIONS, check_ablations
from prospr_jax.experiment import paradigms
from prospr_jax.experiment.presets import DEFAULT_PRESET, PRESETS, get_preset
from prospr_jax.experiment.pruning import check_method_options, check_rules, method_names, produces_masks
from prospr_jax.train import RECIPES, SCHEDULES, Recipe, get_recipe

DENSE = "dense"
DEFAULT_SEED = 0
DEFAULT_EVAL_EVERY = 1
DEFAULT_EVAL_BATCH_SIZE = 500
# Flags about how a run is carried out, not what it computes: never stored, never compared.
RUN_FLAGS = ("out", "resume", "restart", "keep_checkpoints", "no_progress", "imports", "num_devices",
             "coordinator_address", "num_processes", "process_id", "distributed", "initialization_timeout", "data_workers")
# Settings a resumed run may change: where the data is read from and how often it is evaluated.
RESUMABLE_CHANGES = ("data_dir", "cache_dir", "in_memory", "eval_every", "eval_batch_size")
# Settings that say which cells run; a resumed run may name other cells (finished ones are skipped).
CELL_SETTINGS = ("methods", "sparsities", "method_options", "num_steps", "seeds", "ablations", "prune_at", "after")


class UsageError(ValueError):
    """A run that cannot start as asked; ``main`` reports it argparse-style (exit status 2)."""


# --------------------------------------------------------------------------- argument types


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


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{...}}, got {text!r}")
    return value


# --------------------------------------------------------------------------- parser


def import_modules(argv: Sequence[str]) -> list[str]:
    """Import the modules named by ``--import MODULE`` in ``argv`` (before the parser is built, so the
    methods they register are choices of ``--methods``).

    Raises:
      UsageError: a module that cannot be imported (with the reason).
    """
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--import", dest="imports", action="append", default=[])
    names = pre.parse_known_args(list(argv))[0].imports
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of the user's module is reported as is
            raise UsageError(f"`--import` {name}: {type(e).__name__}: {e}") from None
    return names


def build_parser(prog: str = "python -m experiments.prune_train") -> argparse.ArgumentParser:
    """The runner's command line.

    Args:
      prog: the program name shown in usage and error lines (and in the resume hint).

    Returns:
      The parser; every flag defaults to ``None`` (see the module docstring).
    """
    presets = "\n".join(f"  {p.name:<30} {p.description}" for p in PRESETS.values())
    methods = (DENSE,) + method_names()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prune at initialisation with several methods and sparsities, train, evaluate, tabulate.",
        epilog=(
            f"presets (flags override their fields):\n{presets}\n\n"
            "exit status: 0 every cell finished; 1 a cell failed with an error; 2 the run could not start\n"
            "(bad flags, --out busy, unwritable or holding another run); 3 every cell finished but at least\n"
            "one diverged (non-finite training loss; its record says where); 130 / 143 interrupted by\n"
            "SIGINT (Ctrl-C) / SIGTERM (the last checkpoint is kept: continue with --resume)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--num-devices", type=_positive_int, metavar="N", help="use the first N devices (default: every device of every process)")
    add("--coordinator-address", metavar="HOST:PORT",
        help="many hosts: address of process 0's coordinator, passed to jax.distributed.initialize")
    add("--num-processes", type=_positive_int, metavar="N", help="many hosts: number of processes")
    add("--process-id", type=_non_negative_int, metavar="I", help="many hosts: this process's index in [0, N)")
    add("--distributed", action="store_true", default=None,
        help="many hosts where JAX detects coordinator, process count and id itself (TPU pods, SLURM, MPI)")
    add("--initialization-timeout", type=_positive_int, metavar="S",
        help="many hosts: seconds to wait for every process to join (jax's default: 300)")
    add("--data-workers", type=_non_negative_int, metavar="K",
        help="read training batches with a grain pipeline of K threads (default 0: one prefetch thread); same batches")
    add("--import", dest="imports", action="append", metavar="MODULE",
        help="import this Python module first (repeatable): a module that registers methods of your own "
             "with prospr_jax.methods.register makes them available to --methods (pass it again on --resume)")
    add("--preset", choices=tuple(PRESETS), help=f"protocol to start from (default {DEFAULT_PRESET!r})")
    add("--dataset", help="'digits' (offline), a tfds catalog name (e.g. cifar10) or a path to a split/class/image folder or archive")
    add("--data-dir", help="tfds data dir of catalog data sets")
    add("--cache-dir", help="cache of folder/archive data sets converted to tfds")
    add("--subset", type=_positive_int, help="train on a stratified subset of this many training examples")
    add("--image-size", type=_positive_int, help="resize catalog images to this square size (ImageNet)")
    add("--in-memory", action="store_true", default=None, help="read the data set into memory first (faster for small sets)")
    add("--model", choices=models.names(), help="model zoo name")
    add("--model-options", type=_json_object, help='JSON keyword arguments of the model, e.g. \'{"stem": "cifar"}\'')
    add("--methods", nargs="+", choices=methods, metavar="METHOD",
        help=f"pruning methods ('dense' = unpruned reference); choices: {', '.join(methods)}")
    add("--sparsities", nargs="+", type=_sparsity, metavar="S", help="sparsities in [0, 1) of the prunable weights")
    add("--method-options", type=_json_object,
        help='JSON {method: {option: value}} passed to prospr_jax.methods.prune, e.g. \'{"prospr": {"num_steps": 1}}\'')
    add("--num-steps", type=_non_negative_int, help="ProsPr inner steps M (shortcut for --method-options)")
    add("--density-rule", choices=("erk", "lamp"), help="per-layer density rule for score methods")
    add("--scope", choices=("global", "layerwise"), help="ranking scope (default global)")
    add("--min-per-layer", type=_non_negative_int, help="keep at least this many weights per layer (collapse guard)")
    add("--prune-at", type=paradigms.parse_prune_at, metavar="WHEN",
        help="when the mask is scored: init (theta_0, default), step:K (after K dense training steps) or end "
             "(the densely trained network)")
    add("--after", choices=paradigms.AFTER,
        help="what training starts from after pruning: rewind (theta_0, or theta_K with step:K; default), "
             "finetune (the trained weights, --finetune-epochs at --finetune-lr) or reinit (new random weights)")
    add("--finetune-epochs", type=_positive_int, metavar="N", help="epochs of --after finetune (default: the recipe's epochs)")
    add("--finetune-lr", type=_positive_float, metavar="LR", help="constant learning rate of --after finetune (default: 0.1 x --lr)")
    add("--prune-batch-size", type=_positive_int, help="batch size of the scoring batches (default: preset, else --batch-size)")
    add("--prune-augment", action="store_true", default=None, help="augment the scoring batches too (default: no augmentation)")
    add("--recipe", choices=tuple(RECIPES), help="training recipe (prospr: ProsPr code; frankle: Frankle et al.)")
    add("--epochs", type=_positive_int)
    add("--batch-size", type=_positive_int)
    add("--lr", type=float, help="peak learning rate")
    add("--momentum", type=_non_negative_float)
    add("--weight-decay", type=_non_negative_float)
    add("--schedule", choices=SCHEDULES)
    add("--warmup-epochs", type=_non_negative_float)
    add("--no-augment", action="store_true", default=None, help="train without crop/flip augmentation")
    add("--seed", type=_non_negative_int, help=f"seed of theta_0, data order, subset and random pruning (default {DEFAULT_SEED})")
    add("--seeds", nargs="+", type=_non_negative_int, metavar="SEED",
        help="run every cell once per seed (theta_0, data order, scoring batches and random pruning follow it; "
             "the --subset is drawn with --seed, default: the first of --seeds); the table shows mean ± std")
    add("--ablations", nargs="+", choices=ABLATIONS, metavar="ABLATION",
        help="sanity checks of Frankle et al. (2021), each its own cell next to every pruned cell: shuffle "
             "(permute the mask within each layer), reinit (same mask, new theta_0), invert (keep the "
             "lowest-scored weights; single-shot score methods only)")
    add("--eval-every", type=_non_negative_int, help=f"evaluate every N epochs (0: only at the end; default {DEFAULT_EVAL_EVERY})")
    add("--eval-batch-size", type=_positive_int, help=f"default {DEFAULT_EVAL_BATCH_SIZE}")
    add("--out", help="output directory (default runs/<preset>); one run at a time (locked)")
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true",
                         help="continue the run in --out with its stored settings: skip finished cells, resume from checkpoints")
    restart.add_argument("--restart", action="store_true",
                         help="start again although --out holds checkpoints or finished cells of this run: "
                              "their checkpoints are deleted and the cells run again (new records supersede old ones)")
    add("--keep-checkpoints", action="store_true", help="keep each finished cell's last checkpoint")
    add("--no-progress", action="store_true", help="no progress bars")
    return parser


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings (flags that are not :data:`RUN_FLAGS`) given on the command line."""
    return {k: v for k, v in vars(args).items() if k not in RUN_FLAGS and v is not None}


# --------------------------------------------------------------------------- the resolved configuration


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Resolved settings of a run (preset + flags); stored in ``run.json`` and in every record."""

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
    recipe: Recipe
    seed: int
    eval_every: int
    eval_batch_size: int
    preset: str
    seeds: tuple[int, ...] = ()
    ablations: tuple[str, ...] = ()
    prune_at: str = paradigms.PRUNE_AT_DEFAULT
    after: str = paradigms.AFTER_DEFAULT
    finetune_epochs: Optional[int] = None
    finetune_lr: Optional[float] = None

    @property
    def cell_seeds(self) -> tuple[int, ...]:
        """The seeds every cell runs with: ``--seeds``, or ``(seed,)``."""
        return self.seeds or (self.seed,)

    def fingerprint_dict(self) -> dict:
        """Everything that determines a cell's result except the method, its options, the sparsity and
        its paradigm (``prune_at``, ``after``: the cell's id digests those)."""
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
        if self.after == "finetune":  # only then do they change a result (today's ids stay)
            out.update(finetune_epochs=self.finetune_epochs, finetune_lr=self.finetune_lr)
        return out

    @property
    def config_id(self) -> str:
        """A digest of :meth:`fingerprint_dict`: cells of runs with the same id are interchangeable."""
        return digest(self.fingerprint_dict())

    def as_dict(self) -> dict:
        """Every field as JSON data (:meth:`from_dict` reads it back)."""
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
            data_dir=self.data_dir,
            cache_dir=self.cache_dir,
            seeds=list(self.seeds),
            ablations=list(self.ablations),
            prune_at=self.prune_at,
            after=self.after,
            finetune_epochs=self.finetune_epochs,
            finetune_lr=self.finetune_lr,
        )
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """The configuration :meth:`as_dict` wrote (records of older versions lack the data paths).

        Raises:
          ValueError: ``d`` is not such a dictionary.
        """
        try:
            recipe = dict(d["recipe"])
            recipe["milestones"] = tuple(recipe.get("milestones", ()))
            return cls(
                dataset=d["dataset"],
                data_dir=d.get("data_dir"),
                cache_dir=d.get("cache_dir"),
                subset=d["subset"],
                image_size=d["image_size"],
                in_memory=bool(d.get("in_memory", False)),
                model=d["model"],
                model_options=dict(d["model_options"]),
                methods=tuple(d["methods"]),
                sparsities=tuple(float(s) for s in d["sparsities"]),
                method_options={m: dict(o) for m, o in d["method_options"].items()},
                density_rule=d["density_rule"],
                scope=d["scope"],
                min_per_layer=int(d["min_per_layer"]),
                prune_batch_size=int(d["prune_batch_size"]),
                prune_augment=bool(d["prune_augment"]),
                recipe_name=d["recipe_name"],
                recipe=Recipe(**recipe),
                seed=int(d["seed"]),
                eval_every=int(d.get("eval_every", DEFAULT_EVAL_EVERY)),
                eval_batch_size=int(d.get("eval_batch_size", DEFAULT_EVAL_BATCH_SIZE)),
                preset=d["preset"],
                seeds=tuple(int(x) for x in d.get("seeds", ())),
                ablations=tuple(d.get("ablations", ())),
                prune_at=d.get("prune_at", paradigms.PRUNE_AT_DEFAULT),
                after=d.get("after", paradigms.AFTER_DEFAULT),
                finetune_epochs=d.get("finetune_epochs"),
                finetune_lr=d.get("finetune_lr"),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a stored run configuration ({type(e).__name__}: {e})") from None


def digest(obj: Any) -> str:
    """12 hex digits of the SHA-1 of ``obj`` as canonical JSON."""
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- preset + flags


def _method_options(settings: Mapping[str, Any], preset: Any, methods: tuple[str, ...]) -> dict:
    method_options = {m: dict(o) for m, o in preset.method_options.items() if m in methods}
    for name, options in (settings.get("method_options") or {}).items():
        if name not in method_names():
            raise UsageError(f"`--method-options`: keys must be method names ({', '.join(method_names())}), got {name!r}")
        if not isinstance(options, dict):
            raise UsageError(f"`--method-options`: the options of {name!r} must be a JSON object, got {options!r}")
        method_options.setdefault(name, {}).update(options)
    if settings.get("num_steps") is not None:
        method_options.setdefault("prospr", {})["num_steps"] = settings["num_steps"]
    unused = sorted(set(method_options) - set(methods))
    if unused:
        raise UsageError(f"`--method-options`/`--num-steps` given for {unused}, which are not in --methods {list(methods)}")
    for name, options in method_options.items():
        try:
            check_method_options(name, options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"`--method-options`: {e}") from None
    return method_options


def _recipe(settings: Mapping[str, Any], preset: Any) -> tuple[str, Recipe]:
    recipe_name = settings.get("recipe") or preset.recipe
    overrides = dict(preset.recipe_overrides) if recipe_name == preset.recipe else {}
    for field in ("epochs", "batch_size", "lr", "momentum", "weight_decay", "schedule", "warmup_epochs"):
        if settings.get(field) is not None:
            overrides[field] = settings[field]
    if settings.get("no_augment"):
        overrides["augment"] = False
    try:
        return recipe_name, get_recipe(recipe_name).replace(**overrides)
    except ValueError as e:
        raise UsageError(str(e)) from None


def resolve_config(settings: Mapping[str, Any]) -> RunConfig:
    """Merge the preset with the given settings (flag dest -> value; absent or ``None``: not given).

    Raises:
      UsageError: anything invalid: duplicate methods or sparsities, unknown method options, a rule
        a method does not support, a bad recipe value.
    """
    preset = get_preset(settings.get("preset") or DEFAULT_PRESET)
    dataset = settings.get("dataset") or preset.dataset
    if dataset is None:
        raise UsageError(f"`--dataset` is required with `--preset` {preset.name}: {preset.dataset_hint}")
    methods = tuple(settings.get("methods") or preset.methods)
    if len(set(methods)) != len(methods):
        raise UsageError(f"`--methods` lists a method twice: {list(methods)}")
    sparsities = tuple(settings.get("sparsities") or preset.sparsities)
    if len(set(sparsities)) != len(sparsities):
        raise UsageError(f"`--sparsities` lists a sparsity twice: {list(sparsities)}")
    method_options = _method_options(settings, preset, methods)
    density_rule = settings.get("density_rule")
    scope = settings.get("scope") or "global"
    min_per_layer = settings.get("min_per_layer") or 0
    pruners = [m for m in methods if m != DENSE]
    if density_rule is not None:
        mask_methods = [m for m in pruners if produces_masks(m)]
        if mask_methods:
            raise UsageError(
                f"`--density-rule` applies to single-shot score methods; {mask_methods} produce masks directly"
            )
    for name in pruners:
        try:
            check_rules(name, density_rule=density_rule, scope=scope, min_per_layer=min_per_layer)
        except (TypeError, ValueError) as e:
            raise UsageError(f"`--methods`: {e}") from None

    recipe_name, recipe = _recipe(settings, preset)
    prune_at = settings.get("prune_at") or paradigms.PRUNE_AT_DEFAULT
    after = settings.get("after") or paradigms.AFTER_DEFAULT
    finetune_epochs, finetune_lr = settings.get("finetune_epochs"), settings.get("finetune_lr")
    try:
        paradigms.check_paradigm(pruners, prune_at, after, finetune_epochs=finetune_epochs, finetune_lr=finetune_lr)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if after == "finetune":
        finetune_epochs = recipe.epochs if finetune_epochs is None else finetune_epochs
        finetune_lr = 0.1 * recipe.lr if finetune_lr is None else finetune_lr
    model = settings.get("model") or preset.model
    model_options = dict(preset.model_options) if model == preset.model else {}
    model_options.update(settings.get("model_options") or {})
    image_size = settings.get("image_size")
    if image_size is None and settings.get("dataset") is None:
        image_size = preset.image_size  # The preset's resize is for its own catalog data set only.
    seeds = tuple(settings.get("seeds") or ())
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"`--seeds` lists a seed twice: {list(seeds)}")
    seed = settings.get("seed")
    if seed is None and seeds:
        seed = seeds[0]
    ablations = tuple(settings.get("ablations") or ())
    try:
        check_ablations(ablations, pruners, density_rule=density_rule, prune_at=prune_at, after=after)
    except ValueError as e:
        raise UsageError(str(e)) from None
    eval_every = settings.get("eval_every")
    return RunConfig(
        dataset=dataset,
        data_dir=settings.get("data_dir"),
        cache_dir=settings.get("cache_dir"),
        subset=settings.get("subset"),
        image_size=image_size,
        in_memory=bool(settings.get("in_memory")),
        model=model,
        model_options=model_options,
        methods=methods,
        sparsities=sparsities,
        method_options=method_options,
        density_rule=density_rule,
        scope=scope,
        min_per_layer=min_per_layer,
        prune_batch_size=settings.get("prune_batch_size") or preset.prune_batch_size or recipe.batch_size,
        prune_augment=bool(settings.get("prune_augment")),
        recipe_name=recipe_name,
        recipe=recipe,
        seed=DEFAULT_SEED if seed is None else seed,
        eval_every=DEFAULT_EVAL_EVERY if eval_every is None else eval_every,
        eval_batch_size=settings.get("eval_batch_size") or DEFAULT_EVAL_BATCH_SIZE,
        preset=preset.name,
        seeds=seeds,
        ablations=ablations,
        prune_at=prune_at,
        after=after,
        finetune_epochs=finetune_epochs,
        finetune_lr=finetune_lr,
    )


# --------------------------------------------------------------------------- resuming a stored run


def settings_of(config: RunConfig) -> dict[str, Any]:
    """Flag settings that :func:`resolve_config` turns back into ``config``."""
    recipe = config.recipe
    return {
        "preset": config.preset,
        "dataset": config.dataset,
        "data_dir": config.data_dir,
        "cache_dir": config.cache_dir,
        "subset": config.subset,
        "image_size": config.image_size,
        "in_memory": config.in_memory,
        "model": config.model,
        "model_options": dict(config.model_options),
        "methods": list(config.methods),
        "sparsities": list(config.sparsities),
        "method_options": {m: dict(o) for m, o in config.method_options.items()},
        "density_rule": config.density_rule,
        "scope": config.scope,
        "min_per_layer": config.min_per_layer,
        "prune_batch_size": config.prune_batch_size,
        "prune_augment": config.prune_augment,
        "recipe": config.recipe_name,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "momentum": recipe.momentum,
        "weight_decay": recipe.weight_decay,
        "schedule": recipe.schedule,
        "warmup_epochs": recipe.warmup_epochs,
        "no_augment": not recipe.augment,
        "seed": config.seed,
        "eval_every": config.eval_every,
        "eval_batch_size": config.eval_batch_size,
        "seeds": list(config.seeds),
        "ablations": list(config.ablations),
        "prune_at": config.prune_at,
        "after": config.after,
        "finetune_epochs": config.finetune_epochs,
        "finetune_lr": config.finetune_lr,
    }


# Flag of each compared setting (nested recipe fields as 'recipe.<field>').
_FLAG_OF = {
    "recipe_name": "--recipe",
    "recipe.augment": "--no-augment (recipe augment)",
    "recipe.nesterov": "recipe nesterov (of --recipe)",
    "recipe.milestones": "recipe milestones (of --recipe)",
    "recipe.gamma": "recipe gamma (of --recipe)",
}


def _flat(config: RunConfig) -> dict[str, Any]:
    out = {k: v for k, v in config.as_dict().items() if k != "recipe"}
    out.update({f"recipe.{k}": v for k, v in config.recipe.as_dict().items()})
    return out


def differences(stored: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``(flag, stored value, new value)`` of every setting that may not change when resuming."""
    free = set(RESUMABLE_CHANGES) | set(CELL_SETTINGS)
    a, b = _flat(stored), _flat(new)
    out = []
    for key in sorted(a):
        if key in free or a[key] == b.get(key):
            continue
        flag = _FLAG_OF.get(key) or "--" + key.removeprefix("recipe.").replace("_", "-")
        out.append((flag, a[key], b.get(key)))
    return out


def resume_config(stored: RunConfig, given: Mapping[str, Any]) -> tuple[RunConfig, list[tuple[str, Any, Any]]]:
    """The configuration of resuming the stored run with the ``given`` settings (:func:`given_settings`).

    Settings not given are the stored ones. Model options and method options are kept only for the
    model and the methods the resumed run still has.

    Returns:
      ``(config, differences)``: the differences (:func:`differences`) must be empty to resume.
    """
    settings = settings_of(stored)
    if given.get("model") not in (None, stored.model):
        settings["model_options"] = {}
    if given.get("methods") is not None:
        settings["method_options"] = {m: o for m, o in settings["method_options"].items() if m in given["methods"]}
    if given.get("method_options") is not None or given.get("num_steps") is not None:
        settings["method_options"] = {}  # The given options replace the stored ones.
    if given.get("after") not in (None, "finetune"):
        settings["finetune_epochs"] = settings["finetune_lr"] = None  # they apply to fine-tuning only
    settings.update(given)
    config = resolve_config(settings)
    return config, differences(stored, config)


__all__ = [
    "DENSE",
    "RunConfig",
    "UsageError",
    "build_parser",
    "differences",
    "digest",
    "given_settings",
    "resolve_config",
    "resume_config",
    "settings_of",
]
