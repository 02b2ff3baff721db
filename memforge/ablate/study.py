"""The study file: parse and check a TOML study, then expand it into planned runs.

A study names a base model, variants (dotted spec overrides on it) and/or a grid (the product of
axes), the task, the training settings, the seeds, an optional learning-rate sweep and the
evaluations to run after training (see ``docs/ablation.md`` for the format)::

    study = load_study("examples/studies/titans_table5.toml")
    runs = expand(study, study_dir)       # every spec resolved, validated and counted

Every mistake is a :class:`StudyError` naming the key and the fix, raised before any run starts:
unknown keys (with a did-you-mean), unknown components, axis values a spec rejects, a baseline
that is not a variant, task options the task lacks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from memforge.errors import MemforgeError, close_matches
from memforge.migrations import replaced_kind_message
from memforge.spec import ModelSpec

#: Metric the per-variant plot shows first unless the study names another.
DEFAULT_PRIMARY_METRIC = "test/accuracy"
#: The evaluation every run gets: the training task's test split at the training length.
TEST_EVALUATION = "test"
#: Test batches per evaluation cell unless an evaluation says otherwise (8 x 16 = 128 rows).
DEFAULT_EVAL_BATCHES = 8
DEFAULT_EVAL_BATCH_SIZE = 16

_TOP_KEYS = ("name", "description", "baseline", "seeds", "primary_metric", "base", "variants",
             "grid", "task", "train", "selection", "evaluations")
#: Keys of [base] and [variants.X] that are not spec overrides.
_MODEL_KEYS = ("preset", "spec", "description")
_VARIANT_KEYS = (*_MODEL_KEYS, "lr")
#: [train] keys: TrainConfig fields a study may set (seed, lr sweep, output and resume are its own).
_TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
               "betas", "grad_clip", "eval_every", "eval_batches", "checkpoint_every",
               "keep_checkpoints", "device", "compile")
_EVAL_KEYS = ("name", "task", "options", "lengths", "depths", "batches", "batch_size")
_SELECTION_KEYS = ("metric", "mode")
_MODES = ("max", "min")
#: Grid axes with this prefix are task options (``task.seq_len``); others are spec overrides.
TASK_AXIS_PREFIX = "task."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StudyError(MemforgeError, ValueError):
    """A study file, study directory or ablate option that cannot be used."""


@attrs.frozen(kw_only=True)
class ModelChoice:
    """A model as a study names it: a preset or spec file plus ``{dotted.path: value}`` overrides.

    Attributes:
        preset: a preset name (exclusive with ``spec``).
        spec: a ``.toml``/``.json`` spec file, relative paths resolved against the study file.
        overrides: ``(path, value)`` pairs, applied in order (see :func:`memforge.apply_overrides`).
    """

    preset: str | None = None
    spec: Path | None = None
    overrides: tuple[tuple[str, Any], ...] = ()


@attrs.frozen(kw_only=True)
class Variant:
    """One named variant: overrides on the base, or another model altogether.

    Attributes:
        name: its name (in run ids and the report).
        model: its own preset/spec (``None``: the base's) and its overrides, applied after the
            base's.
        description: a line for the report.
        lrs: its own learning rates (``None``: the study's).
    """

    name: str
    model: ModelChoice
    description: str = ""
    lrs: tuple[float, ...] | None = None


@attrs.frozen(kw_only=True)
class Evaluation:
    """An evaluation after training, scored on test batches by :func:`memforge.training.evaluate`.

    Attributes:
        name: the metric prefix (``"<name>/accuracy"``); ``"test"`` is the default evaluation.
        task: task name (``None``: the training task).
        options: task options on top of the training task's (when it is the same task).
        lengths: context lengths (empty: the training length; metrics then carry no length).
        depths: needle depths for S-NIAH (``None``: the evaluator's defaults).
        batches, batch_size: test batches per cell and sequences per batch.
    """

    name: str
    task: str | None = None
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=dict, hash=False)
    lengths: tuple[int, ...] = ()
    depths: tuple[float, ...] | None = None
    batches: int = DEFAULT_EVAL_BATCHES
    batch_size: int = DEFAULT_EVAL_BATCH_SIZE

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (what the runner hands to a worker)."""
        return {"name": self.name, "task": self.task, "options": dict(self.options),
                "lengths": list(self.lengths),
                "depths": None if self.depths is None else list(self.depths),
                "batches": self.batches, "batch_size": self.batch_size}


@attrs.frozen(kw_only=True)
class Selection:
    """The learning-rate selection rule: per variant, the lr whose mean ``metric`` is best."""

    metric: str = "validation/accuracy"
    mode: str = "max"


@attrs.frozen(kw_only=True)
class Study:
    """A parsed, key-checked study file (specs are checked by :func:`expand`)."""

    name: str
    path: Path
    description: str
    base: ModelChoice
    variants: tuple[Variant, ...]
    baseline: str
    grid: tuple[tuple[str, tuple[Any, ...]], ...]
    task: str
    task_options: Mapping[str, Any] = attrs.field(converter=dict, hash=False)
    train: Mapping[str, Any] = attrs.field(converter=dict, hash=False)
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    selection: Selection | None
    primary_metric: str
    evaluations: tuple[Evaluation, ...]


@attrs.frozen(kw_only=True)
class PlannedRun:
    """One run of the expanded study.

    Attributes:
        id: stable id from variant, axes, lr (when swept) and seed; also its directory name.
        variant, seed, lr, axes: what the run is.
        spec: the resolved, validated spec; ``params`` its trainable parameter count.
        task_options: the training task's options (grid task axes applied).
        fingerprint: hash of everything that defines the run (a changed study is detected by it).
    """

    id: str
    variant: str
    seed: int
    lr: float
    axes: Mapping[str, Any] = attrs.field(converter=dict, hash=False)
    spec: ModelSpec
    params: int
    task_options: Mapping[str, Any] = attrs.field(converter=dict, hash=False)
    fingerprint: str

    @property
    def dir(self) -> str:
        """The run directory, relative to the study directory."""
        return f"runs/{self.id}"


# ---------------------------------------------------------------------------------------------
# parsing


def _fail(where: str, message: str) -> StudyError:
    return StudyError(f"{where}: {message}" if where else message)


def _check_keys(table: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    for key in table:
        if key not in valid:
            hints = close_matches(key, valid)
            hint = f"; did you mean {hints[0]!r}?" if hints else ""
            raise _fail(where, f"unknown key {key!r}{hint} (valid keys: {', '.join(valid)})")


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        raise _fail(where, f"{key!r} must be a table ([{key}]), got {type(value).__name__}")
    return dict(value)


def _flatten(table: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """TOML's nested dotted keys (``memory.depth = 3``) back to ``("memory.depth", 3)`` pairs."""
    pairs: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, Mapping) and "impl" not in value:
            pairs.extend(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, Mapping):  # an inline component table: impl first, then fields
            pairs.append((f"{prefix}{key}", value["impl"]))
            pairs.extend((f"{prefix}{key}.{k}", v) for k, v in value.items() if k != "impl")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _spec_keys() -> tuple[str, ...]:
    from memforge.spec import OVERRIDE_ROOTS

    return OVERRIDE_ROOTS


def _check_override_path(path: str, where: str, reserved: Sequence[str], value: Any = None) -> None:
    replaced = replaced_kind_message(path, value)
    if replaced:
        raise _fail(where, replaced)
    head = path.split(".", 1)[0]
    valid = (*reserved, *_spec_keys())
    if head not in valid:
        hints = close_matches(head, valid)
        hint = f"; did you mean {hints[0]!r}?" if hints else ""
        others = f", or one of: {', '.join(reserved)}" if reserved else ""
        raise _fail(where, f"unknown key {path!r}{hint} (a spec override like memory.depth = 3 "
                           f"or optimizer = \"titans.sgd\"{others})")


def _model_choice(table: Mapping[str, Any], where: str, base_dir: Path,
                  reserved: Sequence[str]) -> ModelChoice:
    for key, value in table.items():
        if key not in reserved:
            _check_override_path(key, where, reserved, value)
    preset, spec = table.get("preset"), table.get("spec")
    if preset is not None and spec is not None:
        raise _fail(where, "give either 'preset' or 'spec', not both")
    if preset is not None and not isinstance(preset, str):
        raise _fail(f"{where}.preset", f"must be a preset name (see memforge list), got {preset!r}")
    if spec is not None and not isinstance(spec, str):
        raise _fail(f"{where}.spec", f"must be a spec file path, got {spec!r}")
    overrides = tuple(pair for pair in _flatten({k: v for k, v in table.items() if k not in reserved}))
    return ModelChoice(preset=preset, spec=(base_dir / spec) if spec is not None else None,
                       overrides=overrides)


def _lrs(value: Any, where: str) -> tuple[float, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                         for v in values):
        raise _fail(where, f"must be a learning rate > 0 or a non-empty list of them, got {value!r}")
    if len(set(values)) != len(values):
        raise _fail(where, f"lists a learning rate twice: {value!r}")
    return tuple(float(v) for v in values)


def _seeds(value: Any) -> tuple[int, ...]:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise _fail("seeds", f"a seed count must be >= 1, got {value}")
        return tuple(range(value))
    if (not isinstance(value, list) or not value
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in value)):
        raise _fail("seeds", f"must be a count (seeds = 3) or a list of integers >= 0, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail("seeds", f"lists a seed twice: {value!r}")
    return tuple(value)


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise _fail(where, f"{value!r} is not a usable name; use letters, digits, '_', '-' or '.'")
    return value


def _evaluation(table: Any, index: int) -> Evaluation:
    where = f"evaluations[{index}]"
    if not isinstance(table, Mapping):
        raise _fail(where, "each [[evaluations]] entry must be a table")
    _check_keys(table, _EVAL_KEYS, where)
    if "name" not in table:
        raise _fail(where, "name the evaluation (name = \"far\"); its metrics are '<name>/accuracy'")
    name = _name(table["name"], f"{where}.name")
    if name == "validation":  # training writes validation/* already
        raise _fail(f"{where}.name", "'validation' is taken by the training run's own metrics "
                                     "(validation/accuracy, ...); name the evaluation otherwise")
    task = table.get("task")
    if task is not None and not isinstance(task, str):
        raise _fail(f"{where}.task", f"must be a task name, got {task!r}")
    options = table.get("options", {})
    if not isinstance(options, Mapping):
        raise _fail(f"{where}.options", "must be a table of task options")
    lengths = table.get("lengths", [])
    if (not isinstance(lengths, list)
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths)):
        raise _fail(f"{where}.lengths", f"must be a list of token counts >= 1, got {lengths!r}")
    depths = table.get("depths")
    if depths is not None and (not isinstance(depths, list) or not depths or any(
            isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 <= d <= 1 for d in depths)):
        raise _fail(f"{where}.depths", f"must be a list of needle depths in [0, 1], got {depths!r}")
    counts = {}
    for key, default in (("batches", DEFAULT_EVAL_BATCHES), ("batch_size", DEFAULT_EVAL_BATCH_SIZE)):
        counts[key] = table.get(key, default)
        if isinstance(counts[key], bool) or not isinstance(counts[key], int) or counts[key] < 1:
            raise _fail(f"{where}.{key}", f"must be an integer >= 1, got {counts[key]!r}")
    _check_memory(lengths, where, **counts)
    return Evaluation(name=name, task=task, options=options, lengths=tuple(lengths),
                      depths=None if depths is None else tuple(float(d) for d in depths), **counts)


def _check_memory(lengths: Sequence[int], where: str, *, batch_size: int, batches: int) -> None:
    """Refuse, at plan time, lengths whose test batches alone cannot fit in this machine's memory
    (every run would otherwise fail at its evaluation, after training)."""
    from memforge.training.budget import check_batch_memory
    from memforge.training.config import TrainingError

    try:
        check_batch_memory(lengths, batch_size, batches)
    except TrainingError as exc:
        problem = str(exc).split("; use ", 1)[0]
        raise _fail(f"{where}.lengths", f"{problem}; use shorter lengths or a smaller batch_size "
                                        f"or batches") from None


def parse_study(data: Mapping[str, Any], path: Path) -> Study:
    """A :class:`Study` from the parsed TOML ``data`` of the file at ``path``."""
    _check_keys(data, _TOP_KEYS, "")
    base_dir = path.parent
    name = _name(data.get("name", path.stem), "name")
    description = data.get("description", "")
    base = _model_choice(_table(data, "base", ""), "base", base_dir, _MODEL_KEYS)
    if base.preset is None and base.spec is None:
        raise _fail("base", "name the model: preset = \"titans.lmm_tiny\" or spec = \"model.toml\"")

    variants = []
    for vname, vtable in _table(data, "variants", "").items():
        where = f"variants.{vname}"
        _name(vname, where)
        if not isinstance(vtable, Mapping):
            raise _fail(where, "must be a table of spec overrides ([variants.NAME])")
        model = _model_choice(vtable, where, base_dir, _VARIANT_KEYS)
        lrs = _lrs(vtable["lr"], f"{where}.lr") if "lr" in vtable else None
        variants.append(Variant(name=vname, model=model, description=str(vtable.get("description", "")),
                                lrs=lrs))
    if not variants:
        variants.append(Variant(name="base", model=ModelChoice()))
    names = [v.name for v in variants]
    baseline = data.get("baseline", names[0])
    if baseline not in names:
        hints = close_matches(str(baseline), names)
        hint = f"did you mean {hints[0]!r}? " if hints else ""
        raise _fail("baseline", f"{baseline!r} is not a variant; {hint}set it to one of: "
                                f"{', '.join(names)}")

    grid = []
    for axis, values in _flatten(_table(data, "grid", "")):
        where = f"grid.{axis}"
        if not axis.startswith(TASK_AXIS_PREFIX):
            _check_override_path(axis, "grid", ())
        if not isinstance(values, list) or not values:
            raise _fail(where, f"an axis must be a non-empty list of values, got {values!r}")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise _fail(where, f"lists a value twice: {values!r}")
        for variant in variants:
            if axis in dict(variant.model.overrides):
                raise _fail(f"variants.{variant.name}", f"sets {axis!r}, which is also a grid axis; "
                                                         f"drop one of them")
        grid.append((axis, tuple(values)))

    task_table = _table(data, "task", "")
    task = task_table.pop("name", None)
    if task is None:
        raise _fail("task", "name the task: [task] name = \"mqar\" (or s-niah, babilong-qa1, text)")
    _check_task_options(task, [*task_table, *(a[len(TASK_AXIS_PREFIX):] for a, _ in grid
                                              if a.startswith(TASK_AXIS_PREFIX))], "task")

    train = _table(data, "train", "")
    _check_keys(train, _TRAIN_KEYS, "train")
    lrs = _lrs(train.pop("lr"), "train.lr") if "lr" in train else (3e-3,)
    if "betas" in train:
        train["betas"] = tuple(train["betas"])

    selection = None
    swept = len(lrs) > 1 or any(v.lrs is not None and len(v.lrs) > 1 for v in variants)
    sel_table = _table(data, "selection", "")
    _check_keys(sel_table, _SELECTION_KEYS, "selection")
    if swept or sel_table:
        selection = Selection(**sel_table)
        if selection.mode not in _MODES:
            raise _fail("selection.mode", f"must be 'max' or 'min', got {selection.mode!r}")
        if not isinstance(selection.metric, str) or "/" not in selection.metric:
            raise _fail("selection.metric", f"must name a metric like 'validation/accuracy', "
                                            f"got {selection.metric!r}")

    entries = data.get("evaluations", [])
    if not isinstance(entries, list):
        raise _fail("evaluations", "must be a list of tables ([[evaluations]])")
    evaluations = [_evaluation(entry, i + 1) for i, entry in enumerate(entries)]
    eval_names = [e.name for e in evaluations]
    if len(set(eval_names)) != len(eval_names):
        raise _fail("evaluations", f"two evaluations share a name: {eval_names}; name each one")
    if TEST_EVALUATION not in eval_names:
        evaluations.insert(0, Evaluation(name=TEST_EVALUATION))

    primary = data.get("primary_metric", DEFAULT_PRIMARY_METRIC)
    prefixes = {"validation", *eval_names, TEST_EVALUATION}
    if not isinstance(primary, str) or primary.split("/", 1)[0] not in prefixes:
        raise _fail("primary_metric", f"{primary!r} must be '<evaluation>/<metric>' with the "
                                      f"evaluation one of: {', '.join(sorted(prefixes))}")
    return Study(name=name, path=path, description=str(description), base=base,
                 variants=tuple(variants), baseline=baseline, grid=tuple(grid), task=task,
                 task_options=task_table, train=train, lrs=lrs,
                 seeds=_seeds(data.get("seeds", [0])), selection=selection,
                 primary_metric=primary, evaluations=tuple(evaluations))


def _check_task_options(task: str, names: Iterable[str], where: str) -> None:
    from memforge import tasks

    try:
        known = tasks.task_options(task)
    except ValueError as exc:
        raise _fail(f"{where}.name", str(exc)) from None
    _check_keys(dict.fromkeys(names), list(known), where)


def load_study(path: str | os.PathLike[str]) -> Study:
    """Read and key-check the study file at ``path``."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudyError(f"no study file {path}; pass the path of a .toml study "
                         f"(see examples/studies/)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"cannot read study file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"study file {path} is not valid TOML: {exc}") from None
    try:
        return parse_study(data, path)
    except StudyError as exc:
        raise StudyError(f"{path}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# expansion


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip(" -") for line in str(exc).splitlines() if line.strip())


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)  # the shortest text that reads back as this float: injective
    if isinstance(value, list):
        return "[" + ",".join(_format_value(v) for v in value) + "]"
    return str(value)


def run_id(variant: str, axes: Mapping[str, Any], lr: float | None, seed: int) -> str:
    """``variant__axis=value__lr=0.001__seed=0``: stable, readable and safe as a directory name."""
    parts = [variant, *(f"{axis}={_format_value(v)}" for axis, v in axes.items())]
    if lr is not None:
        parts.append(f"lr={lr!r}")
    parts.append(f"seed={seed}")
    return re.sub(r"[^A-Za-z0-9_.=,+\[\]-]", "_", "__".join(parts))


def _resolve(choice: ModelChoice, base: ModelChoice, axis_overrides: Sequence[tuple[str, Any]],
             where: str) -> ModelSpec:
    import memforge

    root = choice if choice.preset is not None or choice.spec is not None else base
    try:
        if root.spec is not None:
            spec = memforge.load_spec(root.spec)
        else:
            spec = memforge.preset(root.preset)
    except (MemforgeError, OSError) as exc:
        key = "spec" if root.spec is not None else "preset"
        owner = where if root is choice else "base"
        raise _fail(f"{owner}.{key}", _one_line(exc)) from None
    for owner, overrides in (("base", base.overrides), (where, choice.overrides),
                             ("grid", axis_overrides)):
        if not overrides:
            continue
        try:
            spec = memforge.apply_overrides(spec, dict(overrides))
        except MemforgeError as exc:
            keys = ", ".join(f"{k} = {_format_value(v)}" for k, v in overrides)
            raise _fail(owner if owner != "grid" else f"grid ({keys}) for {where}",
                        f"{_one_line(exc)}; fix the override(s) {keys}") from None
    return spec


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A 16-character hash of a run's defining settings (canonical JSON)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def expand(study: Study) -> list[PlannedRun]:
    """Every run of ``study``, each spec resolved, validated, its task and evaluations checked.

    Builds each distinct model once to count its parameters. Raises :class:`StudyError` naming
    the study file, the variant or grid point and the key at fault.
    """
    try:
        return _expand(study)
    except StudyError as exc:
        raise StudyError(f"{study.path}: {exc}") from None


def _expand(study: Study) -> list[PlannedRun]:
    from memforge.builder import build_model, parameter_count
    from memforge.spec import spec_id, to_dict
    from memforge.training.config import TrainConfig, TrainingError

    axes_names = [axis for axis, _ in study.grid]
    points = list(itertools.product(*(values for _, values in study.grid))) or [()]
    params: dict[str, int] = {}
    checked: set[tuple[str, str]] = set()
    runs: list[PlannedRun] = []
    for variant in study.variants:
        where = f"variants.{variant.name}"
        lrs = variant.lrs or study.lrs
        for point in points:
            axes = dict(zip(axes_names, point, strict=True))
            spec_axes = [(k, v) for k, v in axes.items() if not k.startswith(TASK_AXIS_PREFIX)]
            task_options = {**study.task_options, **{k[len(TASK_AXIS_PREFIX):]: v for k, v in axes.items()
                                                     if k.startswith(TASK_AXIS_PREFIX)}}
            spec = _resolve(variant.model, study.base, spec_axes, where)
            sid = spec_id(spec)
            key = (sid, json.dumps(task_options, sort_keys=True))
            if key not in checked:
                _check_task(study, spec, task_options, where, axes)
                checked.add(key)
            if sid not in params:
                try:
                    params[sid] = parameter_count(build_model(spec))
                except MemforgeError as exc:
                    raise _fail(where, _one_line(exc)) from None
            for lr in lrs:
                try:
                    TrainConfig(model=spec, task=study.task, lr=lr, seed=max(study.seeds),
                                **study.train)
                except TrainingError as exc:
                    field = str(exc).split()[0]
                    owner = {"lr": f"{where}.lr" if variant.lrs else "train.lr",
                             "seed": "seeds"}.get(field, "train")
                    raise _fail(owner, _one_line(exc)) from None
                for seed in study.seeds:
                    payload = {"spec": to_dict(spec), "task": study.task, "task_options": task_options,
                               "train": dict(study.train), "lr": lr, "seed": seed,
                               "evaluations": [e.to_json() for e in study.evaluations]}
                    runs.append(PlannedRun(
                        id=run_id(variant.name, axes, lr if len(lrs) > 1 else None, seed),
                        variant=variant.name, seed=seed, lr=lr, axes=axes, spec=spec,
                        params=params[sid], task_options=task_options,
                        fingerprint=fingerprint(payload)))
    ids = [run.id for run in runs]
    if len(set(ids)) != len(ids):
        raise StudyError("two runs share an id (variant names or axis values that differ only in "
                         "characters unsafe in file names); rename them")
    return runs


def _check_task(study: Study, spec: ModelSpec, task_options: Mapping[str, Any], where: str,
                axes: Mapping[str, Any]) -> None:
    """The training task and every evaluation cell can be made for ``spec``."""
    from memforge import tasks
    from memforge.training.config import TrainingError, resolve_task

    point = f" at grid point {dict(axes)}" if axes else ""
    try:
        train_task = resolve_task(study.task, task_options, spec)
    except TrainingError as exc:
        raise _fail(f"task{point} ({where})", _one_line(exc)) from None
    for evaluation in study.evaluations:
        name = evaluation.task or study.task
        at = f"evaluations.{evaluation.name}"
        try:
            known = tasks.task_options(name)
        except ValueError as exc:
            raise _fail(f"{at}.task", str(exc)) from None
        _check_keys(evaluation.options, list(known), f"{at}.options")
        if evaluation.depths is not None and "depth" not in known:
            raise _fail(f"{at}.depths", f"task {name!r} has no needle depth; drop depths")
        base = dict(train_task.describe()) if name == study.task else {}
        options = {k: v for k, v in {**base, **evaluation.options}.items() if k in known}
        for length in evaluation.lengths or (None,):
            cell = {**options, **({"seq_len": length} if length is not None else {})}
            if "depth" in known and evaluation.depths:
                cell["depth"] = evaluation.depths[0]
            try:
                resolve_task(name, cell, spec)
            except TrainingError as exc:
                label = f" at length {length}" if length is not None else ""
                raise _fail(f"{at}{label}{point} ({where})", _one_line(exc)) from None
