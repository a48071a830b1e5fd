"""Validation of an experiment before anything compiles: every field against its type and its constraints, each
objective against the options type its name registered (experiment.check_types), the checks every stage gets (sizes,
lengths, the mesh, data sources, model sections), then each stage kind's own check hook (stages/program.py
StageKind.check) and its algorithm's; one ConfigError lists every problem.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from starling_jax.algorithms import registry
from starling_jax.config import LORA_TARGETS, ConfigError, Experiment, MeshConfig
from starling_jax.data import tasks, templates, tokenizer
from starling_jax.errors import did_you_mean
from starling_jax.generation.replies import row_calls
from starling_jax.io import hf, hub
from starling_jax.models.config import ModelConfig, architecture_conflicts
from starling_jax.stages.experiment import check_types, stages_of
from starling_jax.stages.program import ARCHITECTURE_FIX, STAGE_KINDS


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


def _check_stage(name: str, c: Experiment, num_devices: Optional[int], earlier: dict, exports: dict,
                 problems: list) -> None:
    def bad(field, msg):
        problems.append(f"stage {name!r}: {field}: {msg}")

    obj = c.objective.name
    algorithm = registry.ALGORITHMS.get(obj)
    if algorithm is None:
        bad("objective.name", f"unknown objective {obj!r}; {did_you_mean(obj, registry.names())}")
    kind = algorithm.kind if algorithm else None
    t, o, d, m = c.train, c.optim, c.data, c.model
    for field, value in (("train.steps", t.steps), ("train.batch_size", t.batch_size),
                         ("train.grad_accum", t.grad_accum),
                         ("data.max_length", d.max_length), ("data.max_prompt_length", d.max_prompt_length),
                         ("logging.every", c.logging.every), ("checkpoint.keep", c.checkpoint.keep),
                         ("train.eval_batches", t.eval_batches)):
        if value < 1:
            bad(field, f"must be >= 1, got {value}")
    for field, value in (("train.eval_every", t.eval_every), ("checkpoint.every", c.checkpoint.every),
                         ("optim.warmup_steps", o.warmup_steps), ("optim.weight_decay", o.weight_decay)):
        if value < 0:
            bad(field, f"must be >= 0, got {value}")
    # what train.grad_accum splits into micro-batches: the batch, or an rl stage's minibatch of rollouts (each
    # optimiser update's; train.batch_size is not read there)
    field, size = ("rollout.minibatch_size", c.rollout.minibatch_size) if kind == "rl" else ("train.batch_size",
                                                                                              t.batch_size)
    ways = mesh_data_parallelism(c.mesh, num_devices)
    if t.grad_accum >= 1 and size >= 1:  # else reported above, or by the rl kind's check (rollout.minibatch_size)
        if size % t.grad_accum:
            fix = (f" (each minibatch of rollouts is split into grad_accum micro-batches: set train.grad_accum to a "
                   f"divisor of {size} or rollout.minibatch_size to a multiple of {t.grad_accum})" if kind == "rl"
                   else "")
            bad(field, f"{size} is not divisible by train.grad_accum={t.grad_accum}{fix}")
        elif ways and (size // t.grad_accum) % ways:
            bad(field, f"the micro-batch {size}/{t.grad_accum} is not divisible by the mesh's data*fsdp = {ways} "
                f"devices")
    r = c.rollout
    if kind == "rl" and r.eval_prompts < 0:
        bad("rollout.eval_prompts", f"must be >= 0 (0: the stage samples no evaluation prompts), got {r.eval_prompts}")
    rows = len(row_calls(r.prompts_per_step, r.generation_batch)[0]) if r.prompts_per_step >= 1 else 0
    if kind == "rl" and ways and rows % ways:  # each rollout call's rows (the largest's) split over the data shards
        bad("rollout.generation_batch", f"{r.generation_batch}: each rollout call's {rows} rows are not divisible by "
            f"the mesh's data*fsdp = {ways} devices (set it to a multiple of {ways})")
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
    if d.report_rows and d.source != "synthetic" and not _task_reports(d.source):
        bad("data.report_rows", "needs data.source='synthetic' or a task with its own reporting split "
            "(task:ifeval): it generates the reporting rows")
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
    if m.lora is not None:
        _check_lora(m, kind, bad)
    want_head = algorithm.head if algorithm else "lm"
    if kind and m.path is None and m.config.head != want_head:
        bad("model.config.head", f"objective {obj!r} trains a {want_head!r} head but the model has head="
            f"{m.config.head!r} (set model.config.head={want_head})")
    templates, tokenizers = _known_templates(), _known_tokenizers()
    stage_kind = STAGE_KINDS.get(kind)
    # the reward_model section is shared by the experiment but only read by the kinds that say so
    sections = [(s, getattr(c, s)) for s in (stage_kind.reads_of(c) if stage_kind else ("model",)) if getattr(c, s)]
    for sec_name, sec in sections:
        if templates and sec.template != "auto" and sec.template not in templates:
            bad(f"{sec_name}.template",
                f"unknown chat template {sec.template!r}; {did_you_mean(sec.template, templates)}")
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
        if path is not None and sec.stated_config():
            actual, where = _checkpoint_architecture(path, exports)
            conflicts = architecture_conflicts(sec.config, actual) if actual is not None else []
            if conflicts:
                bad(f"{sec_name}.config", f"is not the architecture of {sec_name}.path={path!r} ({where}): "
                    f"{', '.join(conflicts)}; {ARCHITECTURE_FIX.format(name=sec_name)}")
    # the kind's and the algorithm's checks read the options: not of an objective of the wrong type (check_types
    # names it)
    if stage_kind is not None and stage_kind.check is not None and not registry.options_error(c.objective):
        for field, msg in stage_kind.check(c, algorithm, earlier):
            bad(field, msg)


def _checkpoint_architecture(path: str, exports: dict) -> tuple[Optional[ModelConfig], str]:
    """(the architecture model.path / reward_model.path loads, where it is read) when it is cheap to know without
    the weights: an earlier stage's export (exports), a local directory's config.json or a hub id's config.json in
    the Hugging Face cache (never downloaded); else (None, ""). A config.json that does not read is left to loading,
    which reports it."""
    if path.startswith("stage:"):
        ref = path[len("stage:"):]
        return exports.get(ref), f"the export of stage {ref!r}"
    if hub.is_hub_id(path):
        file = hub.cached_file(path, "config.json")
    else:
        file = os.path.join(path, "config.json")
        file = file if os.path.isfile(file) else None
    if file is None:
        return None, ""
    try:
        with open(file, encoding="utf-8") as f:
            return hf.config_from_hf(json.load(f), where=file), "its config.json"
    except (OSError, ValueError, TypeError, AttributeError):
        return None, ""


def _export_architecture(c: Experiment, algorithm, exports: dict) -> Optional[ModelConfig]:
    """The architecture of the model stage config `c` exports (None: it exports none, or it is not known cheaply):
    its model.config when stated (or initialised at random), else what its path holds; an rm stage's with the score
    head it trains (an LM's head is replaced, untied)."""
    kind = STAGE_KINDS.get(algorithm.kind) if algorithm is not None else None
    if kind is None or kind.writes_rows:  # a feedback stage writes rows, not a model
        return None
    m = c.model
    config = m.config if m.path is None or m.stated_config() else _checkpoint_architecture(m.path, exports)[0]
    if config is not None and algorithm.head == "score" and config.head != "score":
        config = config.replace(head="score", tie_embeddings=False)
    return config


def lora_widths(config) -> dict[str, int]:
    """The smaller side (input or output width) of each projection an adapter can sit on (config.LORA_TARGETS)."""
    D, F = config.hidden_size, config.mlp_dim
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {"q": min(D, q), "k": min(D, kv), "v": min(D, kv), "o": min(q, D), "gate": min(D, F), "up": min(D, F),
            "down": min(F, D)}


def _check_lora(m, kind: Optional[str], bad) -> None:
    """model.lora: a rank in [1, the narrowest targeted projection], a positive alpha, a dropout in [0, 1), known
    targets named once, and a stage kind that trains a model."""
    lo = m.lora
    if kind == "feedback":
        bad("model.lora", "a feedback stage trains nothing; sample from a LoRA-trained stage with model.path="
            "'stage:NAME' (its export holds the merged weights) and leave model.lora unset here")
    targets = tuple(lo.targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets:
        bad("model.lora.targets", f"empty: name the projections to adapt among {', '.join(LORA_TARGETS)}")
    elif unknown:
        bad("model.lora.targets", f"{unknown[0]!r} matches no projection; "
            f"{did_you_mean(unknown[0], LORA_TARGETS)}")
    elif len(set(targets)) != len(targets):
        bad("model.lora.targets", f"{list(targets)} names a projection twice")
    if lo.rank < 1:
        bad("model.lora.rank", f"must be >= 1, got {lo.rank} (leave model.lora unset to train the layers in full)")
    elif targets and not unknown:
        widths = lora_widths(m.config)
        narrow = min(targets, key=lambda t: widths[t])
        if lo.rank > widths[narrow]:
            bad("model.lora.rank", f"{lo.rank} is larger than the {narrow!r} projection's width {widths[narrow]}; use a "
                f"rank <= {widths[narrow]}")
    if not lo.alpha > 0:
        bad("model.lora.alpha", f"must be > 0, got {lo.alpha}")
    if not 0 <= lo.dropout < 1:
        bad("model.lora.dropout", f"must be in [0, 1), got {lo.dropout}")
    elif lo.dropout and kind in ("dpo", "rl"):
        bad("model.lora.dropout", f"{lo.dropout}: a {kind} stage compares the policy's log-probs with the "
            f"reference's (and with those it sampled), which dropout would make noise (TRL disables dropout there "
            f"too); use 0")
    L = m.config.num_layers
    if lo.layers is not None and 0 <= m.trainable_top_layers <= L:
        top = m.trainable_top_layers or L
        outside = [i for i in lo.layers if not L - top <= i < L]
        if not lo.layers or outside or len(set(lo.layers)) != len(lo.layers):
            bad("model.lora.layers", f"{list(lo.layers)} must be distinct indices of the layers that train, "
                f"{L - top}..{L - 1} (the top model.trainable_top_layers={m.trainable_top_layers} of {L}; the layers "
                f"below are the frozen trunk), or None for all of them")


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
    exports: dict[str, ModelConfig] = {}  # earlier stage -> the architecture of its export, where it is known
    for name, cfg in stages_of(exp):
        _check_stage(name, cfg, num_devices, earlier, exports, problems)
        earlier[name] = registry.ALGORITHMS.get(cfg.objective.name)
        exported = _export_architecture(cfg, earlier[name], exports)
        if exported is not None:
            exports[name] = exported
    if problems:
        raise ConfigError(f"experiment {exp.name!r} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return exp


def _task_reports(source: str) -> bool:
    """Whether `source` is a task that generates its own reporting split (data.report_rows)."""
    if not source.startswith("task:"):
        return False
    try:
        return tasks.get(source).make_report_rows is not None
    except ValueError:
        return False
