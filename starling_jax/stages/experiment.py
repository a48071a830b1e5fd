"""Loading an experiment (a Python file with get_config(), a bare name under experiments/, or a saved config.json),
`--set a.b=c` overrides, the type check and the JSON round trip of the typed config in config.py, and its stages
(stages_of: a single stage is named after its algorithm's kind, so this module reads the registries; importing it
registers every stage kind and algorithm). Validation: stages/validation.py.

The objective is a typed choice: its `name` selects an algorithm and the algorithm's registered options type (a
subclass of ObjectiveConfig) holds its options, so a loaded objective is built as that type, `--set objective.name=X`
turns the options into X's, and the type check asks that an objective be of its name's type. Each field's type may
carry pydantic constraints (`Annotated[float, Field(gt=0)]`); they are checked with the type, field by field.

Why this file is long (~410 lines): loading, overrides and the typed round trip are one walk over the config's
dataclass fields (parse a `--set` value, coerce a JSON value, check a type: the same per-type rules). The seam to cut
when it grows is that per-type value layer (parse_value, _coerce, check_types and their helpers) into its own module.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import typing
from pathlib import Path

import pydantic

from starling_jax.algorithms import registry
from starling_jax.config import ConfigError, Experiment, ObjectiveConfig, Stage
from starling_jax.errors import did_you_mean
from starling_jax.models.config import PRESETS, ModelConfig
from starling_jax.stages import kinds  # noqa: F401  (registers every stage kind and algorithm)

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"


def load_experiment(path_or_name: str) -> Experiment:
    """An Experiment from a Python file defining get_config(), a bare name (experiments/NAME.py, looked up in
    ./experiments then in the repository's experiments/), or a config.json saved beside a checkpoint."""
    p = Path(path_or_name)
    if p.is_dir() and (p / "config.json").is_file():
        p = p / "config.json"
    if p.suffix == ".json":
        if not p.is_file():
            raise FileNotFoundError(f"experiment config {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} (a truncated or "
                              f"hand-edited config? restore it, or pass the experiment file instead)") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        try:
            return from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    if p.suffix != ".py":
        candidates = [Path("experiments") / f"{path_or_name}.py", EXPERIMENTS_DIR / f"{path_or_name}.py"]
        found = [c for c in candidates if c.is_file()]
        if not found:
            known = sorted({f.stem for d in {Path("experiments"), EXPERIMENTS_DIR} if d.is_dir()
                            for f in d.glob("*.py")})
            close = difflib.get_close_matches(path_or_name, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known experiments: {', '.join(known)}"
            raise FileNotFoundError(f"no experiment {path_or_name!r} (looked for {', '.join(map(str, candidates))})"
                                    + hint)
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"experiment file {p} does not exist")
    spec = importlib.util.spec_from_file_location(f"starling_experiment_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError:
        raise  # the CLI guard names its file and line
    except Exception as e:
        raise ConfigError(f"{p}: importing the experiment file raised {type(e).__name__}: {e} "
                          f"(fix the file; --debug shows the traceback)") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{p}: an experiment file must define get_config() -> Experiment")
    try:
        exp = module.get_config()
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"{p}: get_config() raised {type(e).__name__}: {e} (fix the file; --debug shows the "
                          f"traceback)") from e
    if not isinstance(exp, Experiment):
        raise ConfigError(f"{p}: get_config() returned {type(exp).__name__}, expected starling_jax.config.Experiment")
    return exp


def with_seed(exp: Experiment, seed: int, vary_data: bool = True) -> Experiment:
    """The experiment at seed `seed` (a study's seed-`seed` cell; `run --seed`): the synthetic data
    (data.synthetic_seed; kept when vary_data is False, e.g. a fixed task's problems and split), its order
    (data.shuffle_seed) and every stage's train.seed (new heads' init, rollout and evaluation sampling keys) are all
    set to `seed`."""
    def data(d):
        if d is None:
            return None
        return dataclasses.replace(d, shuffle_seed=seed, **({"synthetic_seed": seed} if vary_data else {}))

    def train(t):
        return None if t is None else dataclasses.replace(t, seed=seed)

    stages = tuple(dataclasses.replace(s, data=data(s.data), train=train(s.train)) for s in exp.stages)
    return dataclasses.replace(exp, data=data(exp.data), train=train(exp.train), stages=stages)


def _hints(cls) -> dict:
    """Field name -> type, pydantic constraints (Annotated) kept."""
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp):
    """The type without its Annotated constraints."""
    return typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp


def _is_optional(tp) -> tuple[bool, object]:
    """(whether None is allowed, the type without None), the constraints of an Annotated[Optional[X], ...] kept on X."""
    meta = ()
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
    optional = False
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and len(args) == 1:
            optional, tp = True, args[0]
    return optional, (typing.Annotated[(tp, *meta)] if meta else tp)


def _check_constraints(value, tp, where: str) -> None:
    """A ConfigError "WHERE: must be ..., got VALUE" when `value` (of the right type) breaks the pydantic constraints
    of the Annotated type `tp` (a range); nothing for an unconstrained type."""
    if typing.get_origin(tp) is not typing.Annotated:
        return
    try:
        _validated(value, tp)
    except ValueError as e:
        reason = str(e).replace("Input should be", "must be")
        raise ConfigError(f"{where}: {reason}, got {value!r}") from None


def parse_value(text: str, tp, where: str):
    """Parse the text of `--set where=text` as type `tp` (int, float, bool, str, Optional[..], tuples, ModelConfig by
    preset name)."""
    optional, annotated = _is_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
    tp = _strip(annotated)
    value = _parse_text(text, tp, where)
    _check_constraints(value, annotated, f"--set {where}={text}")
    return value


def _parse_text(text: str, tp, where: str):
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if tp in (int, float) or typing.get_origin(tp) is typing.Literal:
            return _validated(text.strip(), tp)  # pydantic: "1_0" -> 10, "3e-5" -> 3e-05, a Literal's choices
        if tp is str:
            return text
        if tp is ModelConfig:
            if text not in PRESETS:
                raise ValueError(f"unknown model preset {text!r}; {did_you_mean(text, sorted(PRESETS))}")
            return PRESETS[text]
        if typing.get_origin(tp) is tuple:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = [v for v in text.split(",") if v.strip()]  # a,b,c
            if not isinstance(value, (tuple, list)):
                value = [value]
            return _coerce(value, tp, where)
        if tp is object:
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError):
                return text
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--set {where}={text}: bad value for type {_type_name(tp)}: {e}") from None
    raise ConfigError(f"--set {where}: a field of type {_type_name(tp)} cannot be set from text; set its fields "
                      f"(e.g. {where}.FIELD=...)")


@functools.lru_cache(maxsize=None)
def _adapter(tp) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


def _validated(value, tp):
    """`value` as type `tp` by pydantic (lax mode: numeric strings, ints for floats, lists for tuples; a Literal
    must be one of its choices); a ValueError with pydantic's reason otherwise."""
    try:
        return _adapter(tp).validate_python(value)
    except pydantic.ValidationError as e:
        raise ValueError("; ".join(err["msg"] for err in e.errors())) from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, where: str):
    """Convert a JSON/literal value to type `tp` (used by from_dict and tuple overrides)."""
    optional, annotated = _is_optional(tp)
    tp = _strip(annotated)
    if value is None:
        if optional or tp is object:
            return None
        raise ConfigError(f"{where}: None is not allowed (type {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        if issubclass(tp, ObjectiveConfig):
            return _objective_from_mapping(value, where)
        return _from_mapping(tp, value, where)
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is object:
        return tuple(_coerce(v, object, where) for v in value) if isinstance(value, list) else value
    if isinstance(value, str) and tp is bool:
        return parse_value(value, tp, where)
    if isinstance(value, bool) and tp in (int, float):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    try:
        value = _validated(value, tp)  # pydantic: ints, floats, strs, Literal choices
    except ValueError as e:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({e})") from None
    _check_constraints(value, annotated, where)
    return value


def _objective_hint(cls, name: str, where: str) -> str:
    """What to do about a key that an objective's options type lacks: it may be another algorithm's option."""
    if not issubclass(cls, ObjectiveConfig):
        return ""
    return (f" ({cls.__name__} holds the options of objective {name!r}; to train another algorithm set "
            f"{where}.name first)")


def _from_mapping(cls, mapping: dict, where: str):
    hints = _hints(cls)
    unknown = [k for k in mapping if k not in hints]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"{did_you_mean(unknown[0], list(hints))}"
                          + _objective_hint(cls, mapping.get("name", ""), where or "objective"))
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    return cls(**kwargs)


def options_type(name: str) -> type:
    """The options type of objective `name`: its algorithm's, or ObjectiveConfig for an unknown name (validation
    reports the name)."""
    algorithm = registry.ALGORITHMS.get(name)
    return algorithm.options if algorithm is not None else ObjectiveConfig


# The objective as configs saved before per-algorithm options held it: every algorithm's settings in one record, with
# these defaults (kl_in / kl_estimator None meant the algorithm's own).
_FLAT_OBJECTIVE = {
    "name": "sft", "dpo_beta": 0.1, "apa_lambda": 0.1, "ppo_clip": 0.2, "value_clip": 0.2, "vf_coef": 1.0,
    "gamma": 1.0, "gae_lambda": 0.95, "kl_coef": 0.01, "kl_target": None, "kl_horizon": 10000,
    "critic_only_above": None, "value_head": "mlp", "value_head_layers": 0, "reward_clip": 10.0,
    "scale_reward": True, "whiten_advantages": False, "pl_normalize": False, "group_size": 4, "kl_in": None,
    "kl_estimator": None, "loss_aggregation": "sequence"}


def _objective_from_mapping(mapping: dict, where: str) -> ObjectiveConfig:
    """The objective saved as `mapping`, as its name's options type. A record saved before per-algorithm options
    (exactly the old fields) keeps the values its algorithm takes; the others were never read by it and are left
    behind, except a critic that a critic-free stage built but never trained, which must have been the default."""
    name = mapping.get("name", ObjectiveConfig.name)
    if not isinstance(name, str):
        raise ConfigError(f"{where}.name: expected str, got {name!r}")
    cls = options_type(name)
    if set(mapping) == set(_FLAT_OBJECTIVE):
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in ("value_head", "value_head_layers"):
            if key not in fields and mapping[key] != _FLAT_OBJECTIVE[key]:
                raise ConfigError(f"{where}.{key}: {mapping[key]!r} in a config saved before per-algorithm options; "
                                  f"objective {name!r} has no critic to shape (set it to "
                                  f"{_FLAT_OBJECTIVE[key]!r} in the file)")
        mapping = {k: v for k, v in mapping.items()
                   if k in fields and not (v is None and k in ("kl_in", "kl_estimator"))}
    return _from_mapping(cls, mapping, where)


def check_types(obj, where: str = "") -> None:
    """Every field of the dataclass tree `obj` (an Experiment built in Python is not checked by the dataclasses)
    against its type, as from_dict coerces a loaded one, without a dict round trip; a ConfigError names the first
    bad field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name)


def _check_value(value, tp, where: str) -> None:
    _, inner = _is_optional(tp)
    inner = _strip(inner)
    if value is not None and dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
        if isinstance(value, ObjectiveConfig) and registry.options_error(value):
            raise ConfigError(f"{where}: {registry.options_error(value)}")
        check_types(value, where)
        return
    if isinstance(value, (tuple, list)) and typing.get_origin(inner) is tuple:
        args = typing.get_args(inner)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) == len(value):
            for i, (v, a) in enumerate(zip(value, args)):
                _check_value(v, a, f"{where}[{i}]")
            return
    _coerce(value, tp, where)


def to_dict(exp: Experiment) -> dict:
    """A JSON-able dict of the experiment (tuples become lists); from_dict inverts it."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (tuple, list)):
            return [conv(v) for v in x]
        return x
    return conv(exp)


def from_dict(d: dict) -> Experiment:
    return _from_mapping(Experiment, d, "")


def _set_path(obj, keys: list[str], text: str, full: str, exp: Experiment, stage_fallback=None):
    """Return a copy of dataclass `obj` with the dotted field `keys` set from `text`."""
    name = keys[0]
    hints = _hints(type(obj))
    if name not in hints:
        raise ConfigError(f"--set {full}: unknown key {name!r} in {type(obj).__name__}; "
                          f"{did_you_mean(name, list(hints))}"
                          + (_objective_hint(type(obj), obj.name, full.rsplit(".", 1)[0])
                             if isinstance(obj, ObjectiveConfig) else ""))
    if len(keys) == 1 and name == "name" and isinstance(obj, ObjectiveConfig):
        return _switch_objective(obj, parse_value(text, hints[name], full), full)
    if len(keys) == 1:
        return dataclasses.replace(obj, **{name: parse_value(text, hints[name], full)})
    child = getattr(obj, name)
    if child is None:
        child = stage_fallback(name) if isinstance(obj, Stage) and stage_fallback else None
        if child is None:
            tp = _strip(_is_optional(hints[name])[1])
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {full}: {name!r} is a {_type_name(tp)}, it has no field {keys[1]!r}")
            child = tp()
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"--set {full}: {name!r} is a {type(child).__name__}, it has no field {keys[1]!r}")
    return dataclasses.replace(obj, **{name: _set_path(child, keys[1:], text, full, exp)})


def _switch_objective(obj: ObjectiveConfig, name: str, full: str) -> ObjectiveConfig:
    """`--set objective.name=NAME`: the options of NAME (registry.switch: the values set away from their defaults
    that NAME takes too, e.g. the KL settings of two rl algorithms, and NAME's defaults for the rest). An option of
    the old algorithm that NAME does not take must be at its default, as it would otherwise be lost without a word."""
    keep = {f.name for f in dataclasses.fields(options_type(name))}
    lost = [f.name for f in dataclasses.fields(obj) if f.name not in keep and getattr(obj, f.name) != f.default]
    if lost:
        raise ConfigError(f"--set {full}={name}: objective {name!r} does not take "
                          f"{', '.join(f'{k}={getattr(obj, k)!r}' for k in lost)} (options of {obj.name!r}); set "
                          f"them to their defaults first, or write the stage's objective in the experiment file")
    if name not in registry.ALGORITHMS:
        return ObjectiveConfig(name=name)  # validation names the unknown objective with the rest of the problems
    return registry.switch(obj, name)


def apply_overrides(exp: Experiment, overrides) -> Experiment:
    """Apply ["a.b=c", ...] in order. `stages.NAME.section.field=v` sets a field of one stage (a stage section left
    None starts from the experiment's section). Raises ConfigError naming the key for an unknown key or a bad value."""
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=10")
        key, text = item.split("=", 1)
        keys = [k for k in key.strip().split(".")]
        if not all(keys):
            raise ConfigError(f"--set {item!r}: empty component in key {key!r}")
        if keys[0] == "stages":
            names = [s.name for s in exp.stages]
            if len(keys) < 3:
                raise ConfigError(f"--set {item!r}: stage overrides look like stages.NAME.section.field=value")
            if keys[1] not in names:
                raise ConfigError(f"--set {key}: no stage named {keys[1]!r}; stages: {', '.join(names) or '(none)'}")
            i = names.index(keys[1])
            new = _set_path(exp.stages[i], keys[2:], text, key, exp, stage_fallback=lambda n: getattr(exp, n))
            exp = dataclasses.replace(exp, stages=exp.stages[:i] + (new,) + exp.stages[i + 1:])
        else:
            exp = _set_path(exp, keys, text, key, exp)
    return exp


def resolve_stage(exp: Experiment, stage: Stage) -> Experiment:
    """This stage's view of the experiment: its sections (where set) replace the experiment's; stages == ()."""
    changes = {"objective": stage.objective, "stages": ()}
    for section in ("model", "data", "optim", "train", "rollout", "feedback"):
        if getattr(stage, section) is not None:
            changes[section] = getattr(stage, section)
    return dataclasses.replace(exp, **changes)


def stages_of(exp: Experiment) -> list[tuple[str, Experiment]]:
    """[(stage name, resolved config)] in order; an experiment without stages is one stage named after its kind."""
    if not exp.stages:
        name = exp.objective.name
        kind = registry.ALGORITHMS[name].kind if name in registry.ALGORITHMS else name
        return [(kind, dataclasses.replace(exp, stages=()))]
    return [(s.name, resolve_stage(exp, s)) for s in exp.stages]
