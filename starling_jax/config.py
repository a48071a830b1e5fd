"""One typed experiment config: frozen dataclasses from mesh and model to data, objective, optimiser, rollouts,
checkpoints and logging. An experiment is a Python file under experiments/ with `get_config() -> Experiment`.

Loading, `--set a.b=c` overrides and validation live here too (see load_experiment / apply_overrides / validate).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from starling_jax.errors import InputError
from starling_jax.models.config import PRESETS, ModelConfig


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: sizes of the (data, fsdp, tensor) axes; -1 takes the remaining devices."""
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    # Logical axis -> mesh axes. A value is a mesh axis name, a tuple of them, or None (replicated).
    rules: tuple[tuple[str, object], ...] = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vocab", "tensor"),
        ("layers", None),
        ("head_dim", None),
        ("norm", None),
    )
    distributed: bool = False  # call jax.distributed.initialize() (multi-host pods)


@dataclasses.dataclass(frozen=True)
class ModelSection:
    """The trained model. `config` is the architecture; `path` loads weights (and the architecture) from a local
    HF safetensors directory, a Hugging Face Hub id "hf:ORG/NAME[@REVISION]" (safetensors downloaded into the standard
    cache; HF_HUB_OFFLINE=1 reads only the cache), or "stage:NAME" from an earlier stage's final checkpoint."""
    config: ModelConfig = PRESETS["tiny"]
    path: Optional[str] = None
    tokenizer: str = "openchat-3.5"  # name for data.load_tokenizer, or a path to a .model / tokenizer.json
    # "auto": the tokenizer's own chat template (a checkpoint's Jinja chat_template) when it has one, else
    # openchat_3.5; or a built-in name (openchat_3.5, llama2, llama2_trainer, chatml) to override it
    template: str = "auto"
    trainable_top_layers: int = 0  # 0 = all layers; N > 0 trains only the top N (the hydra trick)
    train_lm_head: bool = True


@dataclasses.dataclass(frozen=True)
class RewardModelSection:
    """The frozen reward model used by RL stages, with its own tokenizer and chat template."""
    config: ModelConfig = PRESETS["tiny"].replace(head="score")
    path: Optional[str] = None  # HF dir (LlamaForSequenceClassification) or "stage:NAME"
    tokenizer: str = "openchat-3.5"
    template: str = "auto"  # as ModelSection.template
    max_length: int = 2048


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "synthetic"  # "synthetic" | path to local Nectar parquet/jsonl files | a tfds data_dir
    synthetic_prompts: int = 2000
    synthetic_seed: int = 0
    synthetic_noise: float = 1.0
    heldout_fraction: float = 0.1  # the reporting set: rows whose prompt strings no training row has
    tuning_fraction: float = 0.0  # a second set of unseen prompt strings, for tuning and periodic eval
    unseen_templates: int = 0  # synthetic: rows phrased with the last N of synthetic.PROMPTS form the "unseen" split
    max_length: int = 256
    max_prompt_length: int = 128
    max_responses: int = 7  # K for reward-model groups
    pairs: str = "best_vs_rest"  # DPO pairs: "best_vs_rest" | "all"
    pack: bool = False
    on_bad_row: str = "error"  # "error" | "skip"
    shuffle_seed: int = 0
    worker_count: int = 0


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    name: str = "sft"  # a registered objective: sft, rm_plackett_luce, rm_bradley_terry, dpo, apa, ppo
    dpo_beta: float = 0.1
    apa_lambda: float = 0.1  # APA: (logp - logp_old - A / lambda)^2; Starling's fork used 1.0
    ppo_clip: float = 0.2
    value_clip: Optional[float] = 0.2  # PPO clipped value loss; None = unclipped 0.5 (V - R)^2 (APA)
    vf_coef: float = 1.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_coef: float = 0.01
    kl_target: Optional[float] = None  # adaptive KL controller target (None = fixed coefficient)
    kl_horizon: int = 10000
    critic_only_above: Optional[float] = None  # Starling fork: a step whose value loss exceeds this trains the critic only
    value_head: str = "mlp"  # "mlp" (Starling) | "linear"
    reward_clip: float = 10.0
    scale_reward: bool = True  # divide the RM score by a running std
    whiten_advantages: bool = False  # normalise GAE advantages per rollout chunk (trlx PPO); APA uses raw ones
    pl_normalize: bool = False  # rm_plackett_luce: divide each prompt's NLL by its K-1 terms (the authors' pl_loss)
    # GRPO / RLOO (critic-free, objectives/group.py): rollout.prompts_per_step replies = prompts_per_step / group_size
    # prompts x group_size samples each; advantages relative to the group (GRPO: mean/std; RLOO: leave-one-out mean).
    group_size: int = 4
    kl_in: Optional[str] = None  # "reward" (sequence-level penalty) | "loss" (per-token term); None: grpo loss, rloo reward
    kl_estimator: Optional[str] = None  # "k1" | "k3"; None: grpo k3, rloo k1
    loss_aggregation: str = "sequence"  # "sequence" (mean of each reply's token mean, GRPO) | "token"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant"
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: Optional[float] = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 16
    grad_accum: int = 1
    eval_every: int = 0
    eval_batches: int = 4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    prompts_per_step: int = 16  # rollouts per RL step (a chunk)
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    epochs: int = 2  # optimisation epochs over each rollout batch
    minibatch_size: int = 8
    eval_prompts: int = 64  # held-out prompts sampled at the start and the end of the stage (true reward, KL)
    # rows per sampling.generate call when sampling a chunk (0 = the whole chunk in one call). Memory only: the KV
    # cache and prefill activations scale with it; the chunk, the updates and the sampling distribution do not.
    generation_batch: int = 0


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # 0 = only at the end
    keep: int = 2
    resume: bool = True


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU; 0 = not reported


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of an experiment. Sections left None fall back to the experiment's."""
    name: str
    objective: ObjectiveConfig
    model: Optional[ModelSection] = None
    data: Optional[DataConfig] = None
    optim: Optional[OptimConfig] = None
    train: Optional[TrainConfig] = None
    rollout: Optional[RolloutConfig] = None


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    model: ModelSection = ModelSection()
    reward_model: Optional[RewardModelSection] = None
    mesh: MeshConfig = MeshConfig()
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    rollout: RolloutConfig = RolloutConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    stages: tuple[Stage, ...] = ()  # empty: one stage built from the top-level sections


# ----------------------------------------------------------------------------------------------------------------------
# Loading, overrides, validation, serialisation.

import ast  # noqa: E402  (kept beside the code that uses it)
import difflib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import typing  # noqa: E402
from pathlib import Path  # noqa: E402

# objective name -> stage kind (starling_jax.train.program registers a build function per kind)
OBJECTIVE_KINDS = {
    "sft": "sft",
    "rm_plackett_luce": "rm",
    "rm_bradley_terry": "rm",
    "dpo": "dpo",
    "apa": "rl",
    "ppo": "rl",
    "grpo": "rl",
    "rloo": "rl",
}
SCHEDULES = ("cosine", "linear", "constant")
DPO_PAIRS = ("best_vs_rest", "all")
ON_BAD_ROW = ("error", "skip")
EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"


class ConfigError(InputError):
    """A bad experiment config: the message lists every problem found, each naming its field."""


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


def _close(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(options)}"


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
        if tp is int:
            return int(text.strip().replace("_", ""))
        if tp is float:
            return float(text.strip().replace("_", ""))
        if tp is str:
            return text
        if tp is ModelConfig:
            if text not in PRESETS:
                raise ValueError(f"unknown model preset {text!r}; {_close(text, sorted(PRESETS))}")
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
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    if isinstance(value, str) and tp in (int, float, bool):
        return parse_value(value, tp, where)
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _from_mapping(cls, mapping: dict, where: str):
    hints = _hints(cls)
    unknown = [k for k in mapping if k not in hints]
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                          f"{_close(unknown[0], list(hints))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()}
    return cls(**kwargs)


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
        raise ConfigError(f"--set {full}: unknown key {name!r} in {type(obj).__name__}; {_close(name, list(hints))}")
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
    for section in ("model", "data", "optim", "train", "rollout"):
        if getattr(stage, section) is not None:
            changes[section] = getattr(stage, section)
    return dataclasses.replace(exp, **changes)


def stages_of(exp: Experiment) -> list[tuple[str, Experiment]]:
    """[(stage name, resolved config)] in order; an experiment without stages is one stage named after its kind."""
    if not exp.stages:
        kind = OBJECTIVE_KINDS.get(exp.objective.name, exp.objective.name)
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


def _known_templates() -> Optional[tuple[str, ...]]:
    try:
        from starling_jax.data import templates
    except Exception:  # the data package is optional for validation: skip the check if it is missing
        return None
    names = getattr(templates, "TEMPLATES", None)
    return tuple(names) if names else None


def _known_tokenizers() -> Optional[tuple[str, ...]]:
    try:
        from starling_jax.data import tokenizer
    except Exception:
        return None
    # the names load_tokenizer knows besides paths (data/tokenizer.py)
    names = getattr(tokenizer, "KNOWN_TOKENIZERS", None) or ("openchat-3.5", "mistral-7b-v0.1")
    return tuple(names)


def _check_stage(name: str, c: Experiment, num_devices: Optional[int], earlier: dict, problems: list) -> None:
    def bad(field, msg):
        problems.append(f"stage {name!r}: {field}: {msg}")

    obj = c.objective.name
    if obj not in OBJECTIVE_KINDS:
        bad("objective.name", f"unknown objective {obj!r}; {_close(obj, list(OBJECTIVE_KINDS))}")
    kind = OBJECTIVE_KINDS.get(obj)
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
    if d.unseen_templates and d.source != "synthetic":
        bad("data.unseen_templates", "needs data.source='synthetic' (it names synthetic prompt templates)")
    elif not 0 <= d.unseen_templates < 8:
        bad("data.unseen_templates", f"must be in [0, 7] (synthetic has 8 prompt templates), got {d.unseen_templates}")
    if d.max_responses < 2 and kind in ("rm", "dpo"):
        bad("data.max_responses", f"a ranking needs at least 2 responses, got {d.max_responses}")
    if d.pairs not in DPO_PAIRS:
        bad("data.pairs", f"{d.pairs!r} is not one of {DPO_PAIRS}")
    if d.on_bad_row not in ON_BAD_ROW:
        bad("data.on_bad_row", f"{d.on_bad_row!r} is not one of {ON_BAD_ROW}")
    if d.source != "synthetic" and not os.path.exists(d.source) and "://" not in d.source:
        bad("data.source", f"{d.source!r} is neither 'synthetic' nor an existing path")
    if o.learning_rate <= 0:
        bad("optim.learning_rate", f"must be > 0, got {o.learning_rate}")
    if o.schedule not in SCHEDULES:
        bad("optim.schedule", f"{o.schedule!r} is not one of {SCHEDULES}")
    if o.grad_clip is not None and o.grad_clip <= 0:
        bad("optim.grad_clip", f"must be > 0 or None, got {o.grad_clip}")
    if not 0 <= m.trainable_top_layers <= m.config.num_layers:
        bad("model.trainable_top_layers", f"{m.trainable_top_layers} is not in [0, {m.config.num_layers}]")
    want_head = "score" if kind == "rm" else "lm"
    if kind and m.path is None and m.config.head != want_head:
        bad("model.config.head", f"objective {obj!r} trains a {want_head!r} head but the model has head="
            f"{m.config.head!r} (set model.config.head={want_head})")
    templates, tokenizers = _known_templates(), _known_tokenizers()
    # the reward_model section is shared by the experiment but only read by rl stages
    sections = [("model", m)] + ([("reward_model", c.reward_model)] if c.reward_model and kind == "rl" else [])
    for sec_name, sec in sections:
        if templates and sec.template != "auto" and sec.template not in templates:
            bad(f"{sec_name}.template", f"unknown chat template {sec.template!r}; {_close(sec.template, templates)}")
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
            elif sec_name == "reward_model" and earlier[ref] != "rm":
                bad("reward_model.path", f"{path!r} is a {earlier[ref]!r} stage, not a reward-model (rm) stage")
        elif path is not None and path.startswith("hf:"):
            from starling_jax import hub
            try:
                hub.parse(path)
            except hub.HubError as e:
                bad(f"{sec_name}.path", str(e))
        elif path is not None and not os.path.exists(path):
            bad(f"{sec_name}.path", f"{path!r} does not exist (a Hugging Face directory, 'hf:ORG/NAME[@REV]' or "
                f"'stage:NAME')")
    if kind == "rl":
        if c.reward_model is None:
            bad("reward_model", f"objective {obj!r} needs a reward_model section")
        r = c.rollout
        for field, value in (("rollout.prompts_per_step", r.prompts_per_step), ("rollout.max_new_tokens",
                             r.max_new_tokens), ("rollout.epochs", r.epochs), ("rollout.minibatch_size",
                             r.minibatch_size)):
            if value < 1:
                bad(field, f"must be >= 1, got {value}")
        if r.generation_batch < 0 or (r.generation_batch and r.prompts_per_step % r.generation_batch):
            bad("rollout.generation_batch", f"{r.generation_batch} must be 0 (the whole chunk) or a divisor of "
                f"rollout.prompts_per_step={r.prompts_per_step}")
        if r.minibatch_size >= 1 and r.prompts_per_step % r.minibatch_size:
            bad("rollout.prompts_per_step", f"{r.prompts_per_step} is not divisible by rollout.minibatch_size="
                f"{r.minibatch_size}")
        if r.temperature <= 0:
            bad("rollout.temperature", f"must be > 0, got {r.temperature}")
        ob = c.objective
        if obj in ("grpo", "rloo"):
            if ob.group_size < 2:
                bad("objective.group_size", f"{obj} needs at least 2 samples per prompt, got {ob.group_size}")
            elif r.prompts_per_step % ob.group_size:
                bad("rollout.prompts_per_step", f"{r.prompts_per_step} replies are not a whole number of groups of "
                    f"objective.group_size={ob.group_size}")
            if ob.kl_in not in (None, "reward", "loss"):
                bad("objective.kl_in", f"{ob.kl_in!r} is not one of reward, loss")
            if ob.kl_estimator not in (None, "k1", "k3"):
                bad("objective.kl_estimator", f"{ob.kl_estimator!r} is not one of k1, k3")
            if ob.loss_aggregation not in ("sequence", "token"):
                bad("objective.loss_aggregation", f"{ob.loss_aggregation!r} is not one of sequence, token")
            if ob.kl_target is not None and (ob.kl_in or ("loss" if obj == "grpo" else "reward")) == "loss":
                bad("objective.kl_target", "the adaptive KL controller acts on a KL penalty in the reward; with "
                    "kl_in='loss' set kl_target=None")
        if not 0 < r.top_p <= 1:
            bad("rollout.top_p", f"must be in (0, 1], got {r.top_p}")
        # The update scores rollouts under the temperature-scaled distribution (train/hydra.py); a top-k / top-p
        # filtered sampler would make log pi_old, the KL penalty and the ratios those of another distribution.
        if r.top_k > 0:
            bad("rollout.top_k", f"{r.top_k}: RL rollouts must be on-policy; top-k filtering is not supported in RL "
                "stages (use rollout.top_k=0; rollout.temperature is supported)")
        elif 0 < r.top_p < 1:
            bad("rollout.top_p", f"{r.top_p}: RL rollouts must be on-policy; top-p filtering is not supported in RL "
                "stages (use rollout.top_p=1.0; rollout.temperature is supported)")


def validate(exp: Experiment, num_devices: Optional[int] = None) -> Experiment:
    """Check the whole experiment before anything compiles; raise one ConfigError listing every problem.
    num_devices (if known) resolves mesh.fsdp = -1 and checks that the mesh matches the devices."""
    problems: list[str] = []
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
    earlier: dict[str, str] = {}
    for name, cfg in stages_of(exp):
        _check_stage(name, cfg, num_devices, earlier, problems)
        earlier[name] = OBJECTIVE_KINDS.get(cfg.objective.name, "?")
    if problems:
        raise ConfigError(f"experiment {exp.name!r} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return exp
