"""Studies: a grid of experiment variants ("arms") x seeds, run resumably (optionally in parallel processes), measured
with one protocol and aggregated with paired bootstrap intervals.

    starling-jax study experiments/studies/NAME.py --workdir D [--jobs N] [--seeds 0,1,2] [--arms a,b] [--quick]

A study file defines `get_study() -> Study`. Seeds vary the synthetic data (one generation per seed, shared by every
arm), the data order, the initialisation of new heads and the sampling keys (`with_seed`); arms differ only by what
the study varies. Stages named in `shared_stages` (e.g. the SFT policy and the reward model) are trained once per
seed and linked into every arm's workdir, and the runner checks that their configs are identical across arms.

A study states its primary comparisons before it runs (`Study.primary`, each a `Comparison`: group, metric, arm,
baseline, direction and why); the report gives those first with their unadjusted 95% intervals and labels every other
difference exploratory, with Holm-adjusted intervals (starling_jax.commands.study.report).

Outputs: D/cells/ARM/seedS/ (each cell's run, its cell.json with per-prompt measurements and wall time),
D/shared/seedS/, D/logs/, and D/results.json, D/results.md (mean and 95% paired bootstrap interval over seeds and
prompts, each seed's own figure; the primary comparisons; differences against the baseline arm), D/results.png (true
reward vs KL to the SFT policy; reward-model ranking accuracy). `--export-raw` writes a workdir's per-prompt records
to a compact folder (starling_jax.commands.study.raw) from which `--report-only --raw` regenerates the report. See
starling_jax.commands.study.runner and docs/REPRODUCTION.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Optional

from starling_jax.config import ConfigError, Experiment
from starling_jax.stages.experiment import with_seed  # noqa: F401  (re-exported: a study's seeds)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant: a whole experiment, and which of its stages is the policy to evaluate (None: no policy)."""
    name: str
    experiment: Experiment
    policy_stage: Optional[str] = "policy"


SPLITS = ("heldout", "unseen", "tuning")  # the splits a cell can be measured on (Study.splits)
POLICY_METRICS = ("true_reward", "gain", "kl", "gain_per_kl", "rm_score", "length")
RM_METRICS = ("pair_accuracy", "top1_accuracy", "kendall_tau")
UTILITY_TERMS = ("relevance", "length", "fluency", "period", "off_topic", "repetition", "junk")  # utility_terms()
DIRECTIONS = ("greater", "less", "two-sided")


def group_metrics(group: str) -> tuple[str, ...]:
    """The metrics the report gives for a measurement group ("policy/heldout", "rm/unseen", ...); () if unknown."""
    kind, _, split = group.partition("/")
    if split not in SPLITS:
        return ()
    if kind == "policy":
        return POLICY_METRICS + tuple(f"term_{t}" for t in UTILITY_TERMS)
    return RM_METRICS if kind == "rm" else ()


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A preregistered comparison: the paired difference arm - baseline of `metric` in `group`, and the direction the
    study expects ("greater": arm above baseline, "less": below, "two-sided": either), with the reason, stated in
    the study file before any cell runs. baseline REFERENCE ("reference") with metric "gain": the arm's own paired
    gain over the reference policy (the question of a one-arm study: does training help at all?)."""
    group: str
    metric: str
    arm: str
    baseline: str
    direction: str
    why: str

    def label(self) -> str:
        return f"{self.arm} - {self.baseline}, {self.group} {self.metric}"


REFERENCE = "reference"  # Comparison.baseline naming the reference policy rather than an arm


def on_splits(kind: str, metric: str, arm: str, baseline: str, direction: str, why: str,
              splits: tuple[str, ...] = ("heldout", "unseen")) -> tuple[Comparison, ...]:
    """The same preregistered comparison on each reporting split (kind: "policy" or "rm")."""
    return tuple(Comparison(group=f"{kind}/{split}", metric=metric, arm=arm, baseline=baseline, direction=direction,
                            why=why) for split in splits)


@dataclasses.dataclass(frozen=True)
class Selection:
    """A selection study's rule: within each family of arms (default: all arms, one family named "all"), the arm with
    the best mean of `metric` in measurement `group` (e.g. "policy/tuning", "rm/tuning": measured on the tuning split
    only) over every seed and prompt is chosen (a tie goes to the arm the study lists first); the runner writes the
    grid and the choice to `path` (relative to the study file), which the experiments read. settings[arm] = the dotted
    --set values that arm stands for."""
    group: str
    metric: str
    path: str
    settings: dict
    maximize: bool = True
    families: Optional[dict] = None  # {family: (arm, ...)}


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    arms: tuple[Arm, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    baseline: Optional[str] = None  # the arm the others are compared with (default: the first)
    shared_stages: tuple[str, ...] = ()  # trained once per seed, linked into every arm (configs must be identical)
    # the policy KL and gain are measured against: a stage (the SFT policy every arm starts from), or "base": the
    # policy stage's own starting model (model.path), for recipes that start from a released chat model (no SFT stage)
    reference_stage: Optional[str] = "sft"
    reward_stage: Optional[str] = "rm"  # scores the policies' replies; its ranking accuracy is measured too
    # the splits the reward model's ranking accuracy is measured on (None: every measured split). Needs rows with
    # true utilities for every answer (synthetic data; task:ifeval, whose rows carry checked replies); () for a task
    # whose rows carry one answer each (task:arithmetic)
    reward_model_splits: Optional[tuple[str, ...]] = None
    eval_prompts: int = 256  # per split (held-out, unseen): the first N rows
    max_new_tokens: int = 24  # reply length when sampling for evaluation (every arm alike)
    quick: tuple[str, ...] = ()  # --set overrides that shorten a cell for CI (`--quick`: first arm, first seed)
    quick_eval_prompts: int = 16
    budget: str = ""  # the CPU budget, in words (measured where known)
    description: str = ""
    # which splits a cell is measured on: ("heldout", "unseen") for reporting studies; ("tuning",) for selection
    # studies, which never look at the reporting prompts
    splits: tuple[str, ...] = ("heldout", "unseen")
    selection: Optional[Selection] = None
    primary: tuple[Comparison, ...] = ()  # preregistered comparisons; every other difference is exploratory

    def __post_init__(self):
        check_primary(self)

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"study {self.name!r}: no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    @property
    def baseline_arm(self) -> str:
        return self.baseline or self.arms[0].name

    @property
    def rm_splits(self) -> tuple[str, ...]:
        """The splits the reward model's ranking is measured on (reward_model_splits, default every split)."""
        return self.splits if self.reward_model_splits is None else self.reward_model_splits


def check_primary(study: Study) -> None:
    """Raise ConfigError naming the comparison and field unless every primary comparison is well formed: a known
    group and metric, two different arms of the study that both have what the group measures, a known direction
    and a stated reason, no comparison twice."""
    if not isinstance(study.primary, tuple) or not all(isinstance(c, Comparison) for c in study.primary):
        raise ConfigError(f"study {study.name!r}: primary must be a tuple of starling_jax.commands.study.Comparison")
    names = [a.name for a in study.arms]
    seen = set()
    for i, c in enumerate(study.primary):
        where = f"study {study.name!r}: primary[{i}] ({c.label()})"
        known = group_metrics(c.group) if c.group.partition("/")[2] in study.splits else ()
        if not known:
            groups = [f"{k}/{s}" for k in ("policy", "rm") for s in study.splits]
            raise ConfigError(f"{where}: group {c.group!r} is not one of {', '.join(groups)}")
        if c.metric not in known:
            raise ConfigError(f"{where}: metric {c.metric!r} is not measured in {c.group}; one of {', '.join(known)}")
        if c.baseline == REFERENCE and (c.metric != "gain" or not c.group.startswith("policy/")):
            raise ConfigError(f"{where}: baseline {REFERENCE!r} compares a policy's gain over the reference policy: "
                              f"use metric 'gain' in a policy group")
        for field in ("arm",) if c.baseline == REFERENCE else ("arm", "baseline"):
            if getattr(c, field) not in names:
                raise ConfigError(f"{where}: {field} {getattr(c, field)!r} is not an arm; arms: {', '.join(names)}")
        if c.arm == c.baseline:
            raise ConfigError(f"{where}: arm and baseline are the same arm")
        if c.group.startswith("policy/"):
            for name in (c.arm,) if c.baseline == REFERENCE else (c.arm, c.baseline):
                if study.arm(name).policy_stage is None:
                    raise ConfigError(f"{where}: arm {name!r} has no policy stage to measure in {c.group}")
        elif study.reward_stage is None or c.group.partition("/")[2] not in study.rm_splits:
            raise ConfigError(f"{where}: the study measures no reward model in {c.group}")
        if c.direction not in DIRECTIONS:
            raise ConfigError(f"{where}: direction {c.direction!r} is not one of {', '.join(DIRECTIONS)}")
        if not c.why.strip():
            raise ConfigError(f"{where}: say why (the reason this comparison is primary, stated before the runs)")
        key = (c.group, c.metric, c.arm, c.baseline)
        if key in seen:
            raise ConfigError(f"{where}: stated twice")
        seen.add(key)


def load_study(path: str) -> Study:
    """The Study of a Python file defining get_study()."""
    p = Path(path)
    if p.suffix != ".py" or not p.is_file():
        raise FileNotFoundError(f"study file {path} does not exist (expected experiments/studies/NAME.py)")
    spec = importlib.util.spec_from_file_location(f"starling_study_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    folder = str(p.resolve().parent)
    sys.path.insert(0, folder)  # a study file may import helpers beside it (experiments/studies/_base.py)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    if not hasattr(module, "get_study"):
        raise ConfigError(f"{p}: a study file must define get_study() -> Study")
    study = module.get_study()
    if not isinstance(study, Study):
        raise ConfigError(f"{p}: get_study() returned {type(study).__name__}, expected starling_jax.commands.study.Study")
    return study


def read_selection(path: str, family: str = "all") -> dict:
    """The chosen settings ({dotted field: value}) of one family in a selection file a selection study wrote
    (Study.selection), e.g. experiments/studies/selected/main_job_policy.json."""
    import json
    try:
        with open(path) as f:
            record = json.load(f)
        return dict(record["choice"][family]["settings"])
    except FileNotFoundError:
        raise ConfigError(f"selection file {path} does not exist: run the selection study that writes it") from None
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"selection file {path}: no choice for {family!r} ({type(e).__name__}: {e}); rerun the "
                          f"selection study that writes it") from None


__all__ = ["Arm", "Comparison", "Selection", "on_splits", "Study", "load_study", "read_selection", "with_seed"]
