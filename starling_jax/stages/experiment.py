"""Loading an experiment (a Python file with get_config(), a bare name under experiments/, or a saved config.json),
`--set a.b=c` overrides, validation and the JSON round trip of the typed config in config.py.

Validation reads the registries (starling_jax/algorithms/, stages/kinds/): an objective name is known when an
algorithm is registered under it, and the algorithm says which head a stage trains and whether it needs a reward model.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Optional

import pydantic

from starling_jax.algorithms import registry
from starling_jax.config import ConfigError, Experiment, MeshConfig, Stage
from starling_jax.data import tasks, templates, tokenizer
from starling_jax.errors import did_you_mean
from starling_jax.io import hub
from starling_jax.models.config import PRESETS, ModelConfig
from starling_jax.stages import kinds  # noqa: F401  (registers every stage kind and algorithm)
from starling_jax.stages.program import STAGE_KINDS

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
        raise ConfigError(f"--set {full}: unknown key {name!r} in {type(obj).__name__}; {did_you_mean(name, list(hints))}")
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


def mesh_data_parallelism(mesh: MeshConfig, num_devices: Optional[int]) -> Optional[int]:
    """data * fsdp, the number of ways a batch is split; None when fsdp = -1 and the device count is unknown."""
    fsdp = mesh.fsdp
    if fsdp == -1:
        if num_devices is None:
            return None
        fsdp = max(num_devices // max(mesh.data * mesh.tensor, 1), 1)
    return mesh.data * fsdp


def _known_templates() -> tuple[str, ...]:
    return tuple(templates.TEMPLATES)


def _known_tokenizers() -> tuple[str, ...]:
    """The names data.load_tokenizer knows besides paths."""
    return tuple(tokenizer.KNOWN_TOKENIZERS)


def _check_stage(name: str, c: Experiment, num_devices: Optional[int], earlier: dict, problems: list) -> None:
    def bad(field, msg):
        problems.append(f"stage {name!r}: {field}: {msg}")

    obj = c.objective.name
    algorithm = registry.ALGORITHMS.get(obj)
    if algorithm is None:
        bad("objective.name", f"unknown objective {obj!r}; {did_you_mean(obj, registry.names())}")
    kind = algorithm.kind if algorithm else None
    t, o, d, m = c.train, c.optim, c.data, c.model
    for field, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size), ("train.grad_accum", t.grad_accum),
                         ("data.max_length", d.max_length), ("data.max_prompt_length", d.max_prompt_length),
                         ("logging.every", c.logging.every), ("checkpoint.keep", c.checkpoint.keep),
                         ("train.eval_batches", t.eval_batches)):
        if value < 1:
            bad(field, f"must be >= 1, got {value}")
    for field, value in (("train.eval_every", t.eval_every), ("checkpoint.every", c.checkpoint.every),
                         ("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay)):
        if value < 0:
            bad(field, f"must be >= 0, got {value}")
    if t.grad_accum >= 1 and t.batch_size % t.grad_accum:
        bad("train.batch_size", f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}")
    ways = mesh_data_parallelism(c.mesh, num_devices)
    if ways and t.grad_accum >= 1 and (t.batch_size // max(t.grad_accum, 1)) % ways:
        bad("train.batch_size", f"the micro-batch {t.batch_size}/{t.grad_accum} is not divisible by the mesh's "
            f"data*fsdp = {ways} devices")
    if num_devices is not None and c.mesh.fsdp != -1:
        need = c.mesh.data * c.mesh.fsdp * c.mesh.tensor
        if need != num_devices:
            bad("mesh", f"data*fsdp*tensor = {need} but {num_devices} devices are available")
    if d.max_prompt_length >= d.max_length:
        bad("data.max_prompt_length", f"{d.max_prompt_length} must be < data.max_length={d.max_length}")
    if d.max_length > m.config.max_seq_len:
        bad("data.max_length", f"{d.max_length} exceeds model.config.max_seq_len={m.config.max_seq_len}")
    if not 0 <= d.heldout_fraction < 1:
        bad("data.heldout_fraction", f"must be in [0, 1), got {d.heldout_fraction}")
    if not 0 <= d.tuning_fraction < 1 or d.heldout_fraction + d.tuning_fraction >= 1:
        bad("data.tuning_fraction", f"must be in [0, 1) with heldout_fraction + tuning_fraction < 1, got "
            f"{d.tuning_fraction}")
    if d.report_rows and d.source != "synthetic":
        bad("data.report_rows", "needs data.source='synthetic' (it generates synthetic reporting rows)")
    elif d.report_rows < 0:
        bad("data.report_rows", f"must be >= 0, got {d.report_rows}")
    elif d.report_rows and (d.heldout_fraction or d.unseen_templates):
        bad("data.report_rows", f"generates the held-out and unseen splits itself: set data.heldout_fraction=0 and "
            f"data.unseen_templates=0 (got {d.heldout_fraction} and {d.unseen_templates})")
    if d.unseen_templates and d.source != "synthetic":
        bad("data.unseen_templates", "needs data.source='synthetic' (it names synthetic prompt templates)")
    elif not 0 <= d.unseen_templates < 8:
        bad("data.unseen_templates", f"must be in [0, 7] (synthetic has 8 prompt templates), got {d.unseen_templates}")
    if d.source.startswith("task:"):
        try:
            tasks.get(d.source)
        except ValueError as e:
            bad("data.source", str(e))
    elif d.source.startswith("stage:"):
        ref = d.source[len("stage:"):]
        source = STAGE_KINDS.get(earlier[ref].kind) if earlier.get(ref) is not None else None
        if source is None or not source.writes_rows:
            bad("data.source", f"{d.source!r} does not name an earlier feedback stage (earlier: "
                f"{', '.join(earlier) or 'none'})")
    elif d.source != "synthetic" and not os.path.exists(d.source) and "://" not in d.source:
        bad("data.source", f"{d.source!r} is neither 'synthetic', 'task:NAME', 'stage:NAME' nor an existing path")
    if o.learning_rate <= 0:
        bad("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        bad("optim.grad_clip", f"must be > 0 or None, got {o.grad_clip}")
    if not 0 <= m.trainable_top_layers <= m.config.num_layers:
        bad("model.trainable_top_layers", f"{m.trainable_top_layers} is not in [0, {m.config.num_layers}]")
    ob = c.objective
    if ob.value_head == "layers" and not 1 <= ob.value_head_layers <= m.config.num_layers:
        bad("objective.value_head_layers", f"{ob.value_head_layers} is not in [1, {m.config.num_layers}] (the critic "
            f"value_head='layers' copies that many top layers)")
    elif ob.value_head != "layers" and ob.value_head_layers != 0:
        bad("objective.value_head_layers", f"{ob.value_head_layers} is only read with value_head='layers' (got "
            f"value_head={ob.value_head!r}); leave it 0")
    want_head = algorithm.head if algorithm else "lm"
    if kind and m.path is None and m.config.head != want_head:
        bad("model.config.head", f"objective {obj!r} trains a {want_head!r} head but the model has head="
            f"{m.config.head!r} (set model.config.head={want_head})")
    templates, tokenizers = _known_templates(), _known_tokenizers()
    stage_kind = STAGE_KINDS.get(kind)
    # the reward_model section is shared by the experiment but only read by the kinds that say so
    sections = [(s, getattr(c, s)) for s in (stage_kind.reads if stage_kind else ("model",)) if getattr(c, s)]
    for sec_name, sec in sections:
        if templates and sec.template != "auto" and sec.template not in templates:
            bad(f"{sec_name}.template", f"unknown chat template {sec.template!r}; {did_you_mean(sec.template, templates)}")
        if (tokenizers and sec.tokenizer not in tokenizers and not os.path.exists(sec.tokenizer)
                and not sec.tokenizer.startswith("hf:")):
            bad(f"{sec_name}.tokenizer", f"{sec.tokenizer!r} is neither a known tokenizer "
                f"({', '.join(tokenizers)}) nor an existing path")
        path = sec.path
        if path is not None and path.startswith("stage:"):
            ref = path[len("stage:"):]
            if ref not in earlier:
                bad(f"{sec_name}.path", f"{path!r} does not name an earlier stage (earlier: "
                    f"{', '.join(earlier) or 'none'})")
            elif sec_name == "reward_model" and (earlier[ref] is None or earlier[ref].head != "score"):
                bad("reward_model.path", f"{path!r} is a {earlier[ref].kind if earlier[ref] else '?'!r} stage, "
                    f"not a reward-model (rm) stage")
        elif path is not None and path.startswith("hf:"):
            try:
                hub.parse(path)
            except hub.HubError as e:
                bad(f"{sec_name}.path", str(e))
        elif path is not None and not os.path.exists(path):
            bad(f"{sec_name}.path", f"{path!r} does not exist (a Hugging Face directory, 'hf:ORG/NAME[@REV]' or "
                f"'stage:NAME')")
    if stage_kind is not None and stage_kind.check is not None:
        for field, msg in stage_kind.check(c, algorithm, earlier):
            bad(field, msg)


def validate(exp: Experiment, num_devices: Optional[int] = None) -> Experiment:
    """Check the whole experiment before anything compiles; raise one ConfigError listing every problem.
    num_devices (if known) resolves mesh.fsdp = -1 and checks that the mesh matches the devices."""
    problems: list[str] = []
    try:
        check_types(exp)
    except ConfigError as e:
        problems.append(str(e))
    if not exp.name:
        problems.append("name: must not be empty")
    m = exp.mesh
    for field in ("data", "tensor"):
        if getattr(m, field) < 1:
            problems.append(f"mesh.{field}: must be >= 1, got {getattr(m, field)}")
    if m.fsdp < 1 and m.fsdp != -1:
        problems.append(f"mesh.fsdp: must be >= 1 or -1 (the remaining devices), got {m.fsdp}")
    names = [s.name for s in exp.stages]
    for n in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stages: the name {n!r} is used {names.count(n)} times; stage names must be unique")
    for s in exp.stages:
        if not s.name or "/" in s.name or s.name.startswith("."):
            problems.append(f"stages: bad stage name {s.name!r} (it names a directory under WORKDIR)")
    earlier: dict[str, Optional[registry.Algorithm]] = {}
    for name, cfg in stages_of(exp):
        _check_stage(name, cfg, num_devices, earlier, problems)
        earlier[name] = registry.ALGORITHMS.get(cfg.objective.name)
    if problems:
        raise ConfigError(f"experiment {exp.name!r} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return exp
