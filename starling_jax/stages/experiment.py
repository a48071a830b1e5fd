"""Loading an experiment (a Python file with get_config(), a bare name under experiments/, or a saved config.json),
`--set a.b=c` overrides, the type check and the JSON round trip of the typed config in config.py, and its stages
(stages_of: a single stage is named after its algorithm's kind, so this module reads the registries; importing it
registers every stage kind and algorithm). Validation: stages/validation.py.
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
from starling_jax.config import ConfigError, Experiment, Stage
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
        return from_dict(data)
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


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_optional(tp) -> tuple[bool, object]:
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and len(args) == 1:
            return True, args[0]
    return False, tp


def parse_value(text: str, tp, where: str):
    """Parse the text of `--set where=text` as type `tp` (int, float, bool, str, Optional[..], tuples, ModelConfig by
    preset name)."""
    optional, tp = _is_optional(tp)
    if optional and text.strip().lower() in ("none", "null"):
        return None
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
    optional, tp = _is_optional(tp)
    if value is None:
        if optional or tp is object:
            return None
        raise ConfigError(f"{where}: None is not allowed (type {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
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
        return _validated(value, tp)  # pydantic: ints, floats, strs, Literal choices
    except ValueError as e:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({e})") from None


def _from_mapping(cls, mapping: dict, where: str):
    hints = _hints(cls)
    unknown = [k for k in mapping if k not in hints]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"{did_you_mean(unknown[0], list(hints))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    return cls(**kwargs)


def check_types(obj, where: str = "") -> None:
    """Every field of the dataclass tree `obj` (an Experiment built in Python is not checked by the dataclasses)
    against its type, as from_dict coerces a loaded one, without a dict round trip; a ConfigError names the first
    bad field."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        _check_value(getattr(obj, f.name), hints[f.name], f"{where}.{f.name}" if where else f.name)


def _check_value(value, tp, where: str) -> None:
    _, inner = _is_optional(tp)
    if value is not None and dataclasses.is_dataclass(inner):
        if not isinstance(value, inner):
            raise ConfigError(f"{where}: expected {inner.__name__}, got {value!r}")
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


def _default_section(owner, name: str, hints: dict):
    """The value to descend into when an override sets a field of a section that is None."""
    if isinstance(owner, Stage) and name in ("model", "data", "optim", "train", "rollout"):
        return None  # resolved by the caller against the experiment's section
    _, tp = _is_optional(hints[name])
    return tp()


def _set_path(obj, keys: list[str], text: str, full: str, exp: Experiment, stage_fallback=None):
    """Return a copy of dataclass `obj` with the dotted field `keys` set from `text`."""
    name = keys[0]
    hints = _hints(type(obj))
    if name not in hints:
        raise ConfigError(f"--set {full}: unknown key {name!r} in {type(obj).__name__}; "
                          f"{did_you_mean(name, list(hints))}")
    if len(keys) == 1:
        return dataclasses.replace(obj, **{name: parse_value(text, hints[name], full)})
    child = getattr(obj, name)
    if child is None:
        child = stage_fallback(name) if isinstance(obj, Stage) and stage_fallback else None
        if child is None:
            _, tp = _is_optional(hints[name])
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {full}: {name!r} is a {_type_name(tp)}, it has no field {keys[1]!r}")
            child = tp()
    if not dataclasses.is_dataclass(child):
        raise ConfigError(f"--set {full}: {name!r} is a {type(child).__name__}, it has no field {keys[1]!r}")
    return dataclasses.replace(obj, **{name: _set_path(child, keys[1:], text, full, exp)})


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
