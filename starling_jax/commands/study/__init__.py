"""Studies: a grid of experiment variants ("arms") x seeds, run resumably (optionally in parallel processes), measured
with one protocol and aggregated with paired bootstrap intervals.

    starling-jax study experiments/studies/NAME.py --workdir D [--jobs N] [--seeds 0,1,2] [--arms a,b] [--quick]

A study file defines `get_study() -> Study`. Seeds vary the synthetic data (one generation per seed, shared by every
arm), the data order, the initialisation of new heads and the sampling keys (`with_seed`); arms differ only by what
the study varies. Stages named in `shared_stages` (e.g. the SFT policy and the reward model) are trained once per
seed and linked into every arm's workdir, and the runner checks that their configs are identical across arms.

Outputs: D/cells/ARM/seedS/ (each cell's run, its cell.json with per-prompt measurements and wall time),
D/shared/seedS/, D/logs/, and D/results.json, D/results.md (mean and 95% paired bootstrap interval over seeds and
prompts; differences against the baseline arm), D/results.png (true reward vs KL to the SFT policy; reward-model
ranking accuracy). See starling_jax.commands.study.runner and docs/REPRODUCTION.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from typing import Optional

from starling_jax.config import ConfigError, Experiment


@dataclasses.dataclass(frozen=True)
class Arm:
    """One variant: a whole experiment, and which of its stages is the policy to evaluate (None: no policy)."""
    name: str
    experiment: Experiment
    policy_stage: Optional[str] = "policy"


@dataclasses.dataclass(frozen=True)
class Selection:
    """A selection study's rule: within each family of arms (default: all arms, one family named "all"), the arm with
    the best mean of `metric` in measurement `group` (e.g. "policy/tuning", "rm/tuning": measured on the tuning split
    only) over every seed and prompt is chosen; the runner writes the grid and the choice to `path` (relative to the
    study file), which the experiments read. settings[arm] = the dotted --set values that arm stands for."""
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
    reference_stage: Optional[str] = "sft"  # the policy KL is measured against (the SFT policy every arm starts from)
    reward_stage: Optional[str] = "rm"  # scores the policies' replies; its ranking accuracy is measured too
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

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise ConfigError(f"study {self.name!r}: no arm {name!r}; arms: {', '.join(a.name for a in self.arms)}")

    @property
    def baseline_arm(self) -> str:
        return self.baseline or self.arms[0].name


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


def with_seed(exp: Experiment, seed: int, vary_data: bool = True) -> Experiment:
    """The experiment at study seed `seed`: the synthetic data (data.synthetic_seed; kept when vary_data is False, e.g.
    a fixed task's problems and split), its order (data.shuffle_seed) and every stage's train.seed (new heads' init,
    rollout and evaluation sampling keys) are all set to `seed`."""
    def data(d):
        if d is None:
            return None
        return dataclasses.replace(d, shuffle_seed=seed, **({"synthetic_seed": seed} if vary_data else {}))

    def train(t):
        return None if t is None else dataclasses.replace(t, seed=seed)

    stages = tuple(dataclasses.replace(s, data=data(s.data), train=train(s.train)) for s in exp.stages)
    return dataclasses.replace(exp, data=data(exp.data), train=train(exp.train), stages=stages)


__all__ = ["Arm", "Selection", "Study", "load_study", "read_selection", "with_seed"]
