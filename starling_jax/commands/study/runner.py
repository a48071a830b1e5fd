"""Run a study's grid (shared stages per seed, then one cell per arm and seed), resumably and optionally in parallel
processes, then aggregate it (starling_jax.commands.study.report). The `starling-jax study` command.

A cell is finished when D/cells/ARM/seedS/cell.json exists; an interrupted cell resumes from its stages'
checkpoints (the training loop's own resume). Each cell and each seed's shared stages run in a child process
(`starling-jax study FILE --workdir D --cell ARM@S`), which isolates their memory and lets `--jobs N` run N at once:
a seed's cells start as soon as its shared stages are trained, beside the shared stages of the seeds after it
(_pipeline).
`--export-raw DIR` writes a workdir's finished cells to a raw results folder and `--report-only --raw DIR` regenerates
the report from such a folder alone (starling_jax.commands.study.raw); `--reuse DIR` adopts identical finished cells
from another workdir or from such a folder, so a study longer than one machine's life is finished on the next one.

Why this file is long (~490 lines): the grid, the reuse of another study's finished work, the selection it writes and
the command line all work on one layout of cell directories (D/cells/ARM/seedS) kept here; the seam to cut when it
grows is the command line (add_arguments .. cli) into a module of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from starling_jax.commands.study import Arm, Study, evaluate as ev, load_study, raw, report, with_seed
from starling_jax.config import ConfigError, Experiment
from starling_jax.data import load_tokenizer, pipelines, synthetic
from starling_jax.files import write_json
from starling_jax.stages.experiment import apply_overrides, from_dict, stages_of, to_dict
from starling_jax.stages.export import load_weights
from starling_jax.stages.loop import StageInterrupted, TrainingDiverged, run_experiment
from starling_jax.stages.rollout import RewardScorer
from starling_jax.step.checkpoint import load_export


def cell_experiment(study: Study, arm: Arm, seed: int, quick: bool = False) -> Experiment:
    """The arm's experiment at `seed`; in a selection study (one that measures neither reporting split) every
    data section says data.reporting=false, so no stage of the cell generates, samples or scores a reporting row.
    A stage's own output read as data (source "stage:NAME", e.g. feedback rows sampled from training prompts) holds
    no reporting row, and its held-out part is that stage's validation set: left as it is."""
    exp = with_seed(arm.experiment, seed)
    if not {"heldout", "unseen"} & set(study.splits):
        def quiet(d):
            return d if d is None or d.source.startswith("stage:") else dataclasses.replace(d, reporting=False)
        exp = dataclasses.replace(exp, data=quiet(exp.data),
                                  stages=tuple(dataclasses.replace(s, data=quiet(s.data)) for s in exp.stages))
    return apply_overrides(exp, study.quick) if quick else exp


def check_shared(study: Study, seeds: Sequence[int], quick: bool = False) -> None:
    """Every arm must resolve each shared stage to the same config (else the arms would differ by more than the
    study varies); raise ConfigError naming the arm and stage otherwise."""
    names = {a.name for a in study.arms}
    if len(names) != len(study.arms):
        raise ConfigError(f"study {study.name!r}: arm names must be unique")
    if study.baseline_arm not in names:
        raise ConfigError(f"study {study.name!r}: baseline {study.baseline_arm!r} is not an arm")
    for seed in seeds:
        first = None
        for arm in study.arms:
            stages = dict(stages_of(cell_experiment(study, arm, seed, quick)))
            reference = None if study.reference_stage == "base" else study.reference_stage
            for needed in (reference, study.reward_stage, arm.policy_stage, *study.shared_stages):
                if needed is not None and needed not in stages:
                    raise ConfigError(f"study {study.name!r}: arm {arm.name!r} has no stage {needed!r} "
                                      f"(stages: {', '.join(stages)})")
            shared = {n: {k: v for k, v in to_dict(stages[n]).items() if k != "name"} for n in study.shared_stages}
            if first is None:
                first = (arm.name, shared)
            elif shared != first[1]:
                bad = [n for n in shared if shared[n] != first[1][n]]
                raise ConfigError(f"study {study.name!r}: shared stage(s) {', '.join(bad)} differ between arms "
                                  f"{first[0]!r} and {arm.name!r}; a shared stage must be the same in every arm")


def _cell_dir(workdir: str, arm: str, seed: int) -> str:
    return os.path.join(workdir, "cells", arm, f"seed{seed}")


def _shared_dir(workdir: str, seed: int) -> str:
    return os.path.join(workdir, "shared", f"seed{seed}")


def _write_json(path: str, obj) -> None:
    write_json(path, obj, indent=1, default=_jsonable)


def _jsonable(x):
    import numpy as np
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON-serialisable: {type(x).__name__}")


def run_shared(study: Study, workdir: str, seed: int, quick: bool = False) -> None:
    """Train the shared stages of `seed` once (in D/shared/seedS), from the first arm's experiment."""
    if not study.shared_stages:
        return
    exp = cell_experiment(study, study.arms[0], seed, quick)
    exp = dataclasses.replace(exp, stages=tuple(s for s in exp.stages if s.name in study.shared_stages))
    directory = _shared_dir(workdir, seed)
    if os.path.exists(os.path.join(directory, "done.json")):
        return
    t0 = time.perf_counter()
    run_experiment(exp, directory)
    _write_json(os.path.join(directory, "done.json"), {"seed": seed, "wall_s": time.perf_counter() - t0})


def run_cell(study: Study, workdir: str, arm_name: str, seed: int, quick: bool = False) -> dict:
    """Train one cell (its shared stages linked in) and measure it; writes and returns its cell.json record."""
    arm = study.arm(arm_name)
    exp = cell_experiment(study, arm, seed, quick)
    directory = _cell_dir(workdir, arm.name, seed)
    path = os.path.join(directory, "cell.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    os.makedirs(directory, exist_ok=True)
    for name in study.shared_stages:
        source = os.path.join(_shared_dir(workdir, seed), name)
        if not os.path.isdir(os.path.join(source, "export")):
            raise FileNotFoundError(f"shared stage {name!r} of seed {seed} is not trained ({source}); run the whole "
                                    f"study, not a single cell")
        link = os.path.join(directory, name)
        if not os.path.lexists(link):
            os.symlink(os.path.relpath(source, directory), link)
    t0 = time.perf_counter()
    summary = run_experiment(exp, directory)
    train_s = time.perf_counter() - t0
    groups = measure_cell(study, arm, exp, directory, seed, quick)
    record = {"arm": arm.name, "seed": seed, "quick": quick, "config_sha256": config_digest(_canonical(exp)),
              "train_wall_s": train_s,
              "wall_s": time.perf_counter() - t0, "summary": _strip_samples(summary), "groups": groups}
    _write_json(path, record)
    return record


def _strip_samples(summary: dict) -> dict:
    return {stage: {k: v for k, v in s.items() if not k.startswith("samples")} for stage, s in summary.items()}


def measure_cell(study: Study, arm: Arm, exp: Experiment, directory: str, seed: int, quick: bool) -> dict:
    """Per-prompt measurements of a trained cell: {"rm/heldout", "rm/unseen", "policy/heldout", "reference/heldout",
    "policy/unseen", ...: {metric: [rows], "prompt": [rows]}}."""
    import jax


    stages = dict(stages_of(exp))
    n = study.quick_eval_prompts if quick else study.eval_prompts
    if study.reference_stage == "base":  # the policy's prompts (its reward stage may read another stage's output)
        data_stage = arm.policy_stage or study.reward_stage
    else:
        data_stage = study.reference_stage or study.reward_stage or arm.policy_stage
    splits = pipelines.load_splits(stages[data_stage].data)  # every stage of the main job reads the same data
    named = splits.named()
    split_rows = {k: named[k][:n] for k in study.splits if named[k]}
    if not split_rows:
        raise ConfigError(f"study {study.name!r}: the data has no rows in the splits it measures "
                          f"({', '.join(study.splits)})")

    def export(stage):
        config, params, _ = load_export(os.path.join(directory, stage, "export"))
        return config, params

    groups: dict = {}
    rm = None
    if study.reward_stage is not None:
        rm = export(study.reward_stage)
        rm_cfg = stages[study.reward_stage]
        rm_tok = load_tokenizer(rm_cfg.model.tokenizer)
        for split, rows in split_rows.items():
            if split not in study.rm_splits:
                continue
            groups[f"rm/{split}"] = _cached(
                _rm_cache(study, rm_cfg, directory, seed, split, rows),
                lambda rows=rows: ev.reward_model_measurements(rm, rows, tokenizer=rm_tok,
                                                               template=rm_cfg.model.template, data=rm_cfg.data))
    if arm.policy_stage is not None:
        if study.reference_stage is None:
            raise ConfigError(f"study {study.name!r}: evaluating a policy needs a reference_stage (its KL is measured "
                              f"against it)")
        pol_cfg = stages[arm.policy_stage]
        section = pol_cfg.reward_model or exp.reward_model
        if rm is None or section is None:
            raise ConfigError(f"study {study.name!r}: evaluating a policy needs reward_stage and a reward_model section")
        scorer = RewardScorer(rm[0], rm[1], load_tokenizer(section.tokenizer), section.template, section.max_length)
        tok = load_tokenizer(pol_cfg.model.tokenizer)
        policy = export(arm.policy_stage)
        reference = load_weights(pol_cfg.model.path) if study.reference_stage == "base" \
            else export(study.reference_stage)
        rollout = dataclasses.replace(pol_cfg.rollout, max_new_tokens=study.max_new_tokens)
        for split, rows in split_rows.items():
            key = jax.random.fold_in(jax.random.key(seed), ev.SPLIT_KEYS[split])

            def measure(who, rows=rows, key=key):
                return ev.policy_measurements(policy, reference, scorer, rows, tokenizer=tok,
                                              template=pol_cfg.model.template, data=pol_cfg.data, rollout=rollout,
                                              key=key, true_utility=splits.true_utility or synthetic.true_utility,
                                              who=who)
            m = measure(("policy",))
            groups[f"policy/{split}"] = {"prompt": m["prompt"], **m["policy"]}
            cache = _reference_cache(study, exp, pol_cfg, section, directory, seed, split, rows)
            groups[f"reference/{split}"] = _cached(cache, lambda: _reference_group(measure(("reference",))))
    return groups


def _reference_group(m: dict) -> dict:
    return {"prompt": m["prompt"], **m["reference"]}


def _reference_cache(study: Study, exp: Experiment, pol_cfg, section, directory: str, seed: int, split: str,
                     rows) -> Optional[str]:
    """Where a seed's reference measurement of `split` is kept for every cell of that seed, or None (measured per
    cell). The reference group depends on the reference model, the reward model that scores it, the prompts, the
    sampling key and the measurement settings, never on the policy: with a "base" reference and a shared reward stage,
    the cells of one seed measure the same thing, so the first measures and the others read it. The file name is a
    digest of all of those (the reward model by its shared directory), so an arm that changes any of them (its data,
    template, reward model section) gets its own file."""
    if study.reference_stage != "base" or study.reward_stage not in study.shared_stages:
        return None
    rm_dir = os.path.realpath(os.path.join(directory, study.reward_stage))
    what = {"seed": seed, "split": split, "rm": rm_dir, "max_new_tokens": study.max_new_tokens,
            "base": pol_cfg.model.path, "tokenizer": pol_cfg.model.tokenizer, "template": pol_cfg.model.template,
            "data": to_dict(pol_cfg.data), "reward_model": to_dict(section),
            "prompts": [r["messages"] for r in rows]}
    return os.path.join(os.path.dirname(rm_dir), "reference", f"{split}-{json_digest(what)[:16]}.json")


def _rm_cache(study: Study, rm_cfg, directory: str, seed: int, split: str, rows) -> Optional[str]:
    """Where a seed's measurement of its shared reward model on `split` is kept for every cell of that seed, or None
    (a reward model trained per cell is measured per cell). It depends on the reward model (its shared directory),
    the rows and how they are read (tokenizer, template, data section), never on the arm's policy."""
    if study.reward_stage not in study.shared_stages:
        return None
    rm_dir = os.path.realpath(os.path.join(directory, study.reward_stage))
    what = {"seed": seed, "split": split, "rm": rm_dir, "tokenizer": rm_cfg.model.tokenizer,
            "template": rm_cfg.model.template, "data": to_dict(rm_cfg.data),
            "rows": [[r["messages"], r.get("responses"), r.get("utilities")] for r in rows]}
    return os.path.join(os.path.dirname(rm_dir), "measured", f"rm-{split}-{json_digest(what)[:16]}.json")


def _cached(path: Optional[str], compute) -> dict:
    """compute() (a measurement group of numpy arrays and lists), kept in `path` as JSON for the next caller. The
    cells of one seed run at once (--jobs), so they reach the same measurement together: an exclusive lock on
    PATH.lock lets one of them measure while the others wait and then read its file (the kernel releases the lock
    when its holder exits, killed or not, so a stopped cell never blocks the next)."""
    import fcntl
    import numpy as np
    if path is None:
        return compute()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[study] waiting for another cell of this seed to finish {os.path.basename(path)}", flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(path):
            with open(path) as f:
                group = json.load(f)
            return {k: v if k in ("prompt", "samples") else np.asarray(v, np.float64) for k, v in group.items()}
        group = compute()
        _write_json(path, group)
        return group


# ----------------------------------------------------------------------------------------------------------------------
# Reusing another study's finished work.

def _canonical(exp: Experiment) -> dict:
    return json.loads(json.dumps(to_dict(exp)))


def json_digest(obj) -> str:
    """SHA-256 (hex) of a JSON-able object, keys sorted."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def config_digest(canonical: Optional[dict]) -> Optional[str]:
    """SHA-256 of a canonical experiment (_canonical, _saved_config): a cell's identity in raw results."""
    return None if canonical is None else json_digest(canonical)


def _adopt(directory: str, record: dict, arm_name: str, source: Optional[str]) -> None:
    """Write a finished cell's record as our arm's cell.json in `directory`, reused from `source` (None: a cell of
    this same study, adopted from its raw results: it keeps the record's own provenance)."""
    record = dict(record, arm=arm_name, reused_from=os.path.abspath(source) if source else record.get("reused_from"))
    os.makedirs(directory, exist_ok=True)
    _write_json(os.path.join(directory, "cell.json"), record)


def _saved_config(directory: str) -> Optional[dict]:
    """The config saved in `directory`, in today's form (as it loads: one saved before per-algorithm options compares
    equal to the same experiment now); None when there is none or it does not load (nothing to reuse)."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        saved = json.load(f)
    try:
        return _canonical(from_dict(saved))
    except ConfigError:
        return None


def reuse_finished(study: Study, workdir: str, seeds: Sequence[int], arm_names: Sequence[str],
                   sources: Sequence[str], quick: bool = False) -> list[str]:
    """Adopt what other study workdirs (`sources`) already trained on an IDENTICAL experiment, instead of training it
    again: a seed's shared stages (linked, when the source's saved config has the same top-level sections and the
    same configs for our shared stages) and whole cells (their cell.json copied under our arm's name with
    "reused_from", when the source cell's saved config equals our cell's experiment exactly, seed included).
    Returns one line per adoption (the runner prints them). Identity is checked on the full saved config, so a study
    cannot borrow a cell that differs in anything, including evaluation settings.

    A source may also be a raw results folder of this study (results/NAME, e.g. committed by a run on another
    machine): its cells whose config_sha256 is the digest of our cell's experiment are adopted, and with them their
    seed's shared-stage time (D/shared/seedS/reused.json); their stages are not there, so a cell of that seed that
    still has to run trains the seed's shared stages itself. Such cells are this study's own, run in an earlier part:
    the report counts their time with the cells' and does not list them as reused."""
    notes = []
    for source in sources:
        if os.path.isfile(os.path.join(source, raw.STUDY_JSON)):
            notes += _reuse_raw(study, workdir, seeds, arm_names, source, quick)
    sources = [s for s in sources if not os.path.isfile(os.path.join(s, raw.STUDY_JSON))]
    for seed in seeds:
        mine = _shared_dir(workdir, seed)
        if study.shared_stages and not os.path.exists(os.path.join(mine, "done.json")) and not os.path.lexists(mine):
            exp = cell_experiment(study, study.arms[0], seed, quick)
            want = _canonical(dataclasses.replace(exp, stages=tuple(s for s in exp.stages
                                                                    if s.name in study.shared_stages)))
            for source in sources:
                theirs = _shared_dir(source, seed)
                saved = _saved_config(theirs)
                if saved is None or not os.path.exists(os.path.join(theirs, "done.json")):
                    continue
                saved["stages"] = [s for s in saved.get("stages", []) if s.get("name") in study.shared_stages]
                if saved == want:
                    os.makedirs(os.path.dirname(mine), exist_ok=True)
                    os.symlink(os.path.abspath(theirs), mine)
                    notes.append(f"shared stages of seed {seed}: reused {theirs}")
                    break
        for arm_name in arm_names:
            directory = _cell_dir(workdir, arm_name, seed)
            if os.path.exists(os.path.join(directory, "cell.json")):
                continue
            want = _canonical(cell_experiment(study, study.arm(arm_name), seed, quick))
            for source in sources:
                found = None
                cells = os.path.join(source, "cells")
                for other in sorted(os.listdir(cells)) if os.path.isdir(cells) else ():
                    theirs = _cell_dir(source, other, seed)
                    if os.path.exists(os.path.join(theirs, "cell.json")) and _saved_config(theirs) == want:
                        found = theirs
                        break
                if found:
                    with open(os.path.join(found, "cell.json")) as f:
                        record = json.load(f)
                    _adopt(directory, record, arm_name, found)
                    notes.append(f"cell {arm_name} seed {seed}: reused {found}")
                    break
    return notes


def _reuse_raw(study: Study, workdir: str, seeds: Sequence[int], arm_names: Sequence[str], source: str,
               quick: bool) -> list[str]:
    """reuse_finished from a raw results folder: its identical cells (by config_sha256) become our cell.json."""
    records, shared, _ = raw.read(source, study)
    by_digest = {(r["seed"], r["config_sha256"]): r for r in records if r.get("config_sha256")}
    notes = []
    for seed in seeds:
        for arm_name in arm_names:
            directory = _cell_dir(workdir, arm_name, seed)
            if os.path.exists(os.path.join(directory, "cell.json")):
                continue
            want = config_digest(_canonical(cell_experiment(study, study.arm(arm_name), seed, quick)))
            record = by_digest.get((seed, want))
            if record is None:
                continue
            _adopt(directory, record, arm_name, None)
            notes.append(f"cell {arm_name} seed {seed}: reused {source} ({record['config_sha256'][:12]})")
            done = os.path.join(_shared_dir(workdir, seed), "reused.json")
            if seed in shared and not os.path.exists(done):
                os.makedirs(os.path.dirname(done), exist_ok=True)
                _write_json(done, {"seed": seed, "wall_s": shared[seed], "reused_from": os.path.abspath(source)})
    return notes


# ----------------------------------------------------------------------------------------------------------------------
# The grid.

def _child(study_path: str, workdir: str, what: list, quick: bool, log: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "starling_jax.commands.cli", "study", study_path, "--workdir", workdir, *what]
    if quick:
        cmd.append("--quick")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    env = dict(os.environ)
    env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    # the cells of a study compile mostly the same programs (one arm's seeds all of them): JAX's persistent cache
    # lets a later cell read what an earlier one compiled (set JAX_COMPILATION_CACHE_DIR to share one across studies)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.abspath(workdir), "xla_cache"))
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def _pipeline(shared: dict, cells: list, parallel: int) -> list[tuple[str, list, str, Optional[str]]]:
    """The grid's jobs in the order the pool starts them, each with the label of the job it waits for (a cell waits
    for its seed's shared stages when they still have to run): first the cells of the seeds whose shared stages are
    trained, then the first `parallel` seeds' shared stages and, seed by seed, its cells followed by the shared stages
    `parallel` seeds on. So a seed's cells run as soon as they can (a study stopped part way has whole seeds' cells to
    export, not only shared stages), and the next seeds' shared stages train beside them (no core waits for the last
    seed's shared stages alone). shared: {seed: (label, args, log)}; cells: [(seed, (label, args, log))] in the
    grid's order."""
    jobs = [(*job, None) for s, job in cells if s not in shared]
    ahead = list(shared)  # the seeds whose shared stages still have to run, in the grid's order
    jobs += [(*shared[s], None) for s in ahead[:parallel]]
    for i, seed in enumerate(ahead):
        jobs += [(*job, shared[seed][0]) for s, job in cells if s == seed]
        if i + parallel < len(ahead):
            jobs.append((*shared[ahead[i + parallel]], None))
    return jobs


def _run_pool(jobs: list[tuple[str, list, str, Optional[str]]], study_path: str, workdir: str, quick: bool,
              parallel: int) -> list:
    """Run (label, args, log, after) child processes, at most `parallel` at once, each free slot taking the first
    pending job whose `after` (a label, or None) has finished; a job whose `after` failed is not run. Returns the
    labels that failed."""
    pending, running, failed, done = list(jobs), [], [], set()
    while pending or running:
        pending = [job for job in pending if job[3] not in failed]
        while len(running) < parallel:
            ready = next((job for job in pending if job[3] is None or job[3] in done), None)
            if ready is None:
                break
            pending.remove(ready)
            label, what, log, _ = ready
            print(f"[study] start {label} (log: {log})", file=sys.stderr, flush=True)
            running.append((label, log, time.perf_counter(), _child(study_path, workdir, what, quick, log)))
        if not running:
            break
        time.sleep(0.5)
        for item in list(running):
            label, log, t0, proc = item
            if proc.poll() is not None:
                running.remove(item)
                took = time.perf_counter() - t0
                if proc.returncode == 0:
                    print(f"[study] done {label} in {took:.0f} s", file=sys.stderr, flush=True)
                    done.add(label)
                else:
                    print(f"[study] FAILED {label} (exit {proc.returncode}); see {log}", file=sys.stderr, flush=True)
                    failed.append(label)
    return failed


def run_study(study: Study, study_path: str, workdir: str, *, jobs: int = 1, seeds: Optional[Sequence[int]] = None,
              arms: Optional[Sequence[str]] = None, quick: bool = False, reuse: Sequence[str] = ()) -> dict:
    """Run every unfinished cell (each after its seed's shared stages), then aggregate into
    D/results.{json,md,png}. reuse: other study workdirs whose identical shared stages and cells are adopted instead
    of retrained (reuse_finished)."""
    seeds = list(seeds if seeds is not None else study.seeds)
    arm_names = list(arms) if arms is not None else [a.name for a in study.arms]
    if quick:
        seeds, arm_names = seeds[:1], arm_names[:1]
    for a in arm_names:
        study.arm(a)
    check_shared(study, seeds, quick)
    os.makedirs(workdir, exist_ok=True)
    for source in reuse:
        if not os.path.isdir(source):
            raise FileNotFoundError(f"--reuse {source}: no such study workdir")
    for note in reuse_finished(study, workdir, seeds, arm_names, reuse, quick):
        print(f"[study] {note}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    logs = os.path.join(workdir, "logs")
    todo = [(a, s) for s in seeds for a in arm_names
            if not os.path.exists(os.path.join(_cell_dir(workdir, a, s), "cell.json"))]
    shared = {s: (f"shared stages of seed {s}", ["--shared", str(s)], os.path.join(logs, f"shared_seed{s}.log"))
              for s in seeds if study.shared_stages and any(seed == s for _, seed in todo)
              and not os.path.exists(os.path.join(_shared_dir(workdir, s), "done.json"))}
    cells = [(s, (f"cell {a} seed {s}", ["--cell", f"{a}@{s}"], os.path.join(logs, f"{a}_seed{s}.log")))
             for a, s in todo]
    failed = _run_pool(_pipeline(shared, cells, jobs), study_path, workdir, quick, jobs)
    records = []
    for s in seeds:
        for a in arm_names:
            path = os.path.join(_cell_dir(workdir, a, s), "cell.json")
            if os.path.exists(path):
                with open(path) as f:
                    records.append(json.load(f))
    results = report.aggregate(study, records, shared_times(workdir, seeds), this_run_s=time.perf_counter() - t0,
                               failed=failed)
    report.write(study, results, workdir)
    write_selection(study, study_path, results)
    return results


def choose(study: Study, results: dict) -> Optional[dict]:
    """The selection study's grid and choice (Study.selection), or None while any arm lacks any of the study's seeds
    (or the run was shortened): {"study", "group", "metric", "maximize", "seeds", "grid": [...], "choice": {family:
    {"arm", "settings", "mean"}}}."""
    sel = study.selection
    if sel is None or results.get("quick") or sorted(results["seeds"]) != sorted(study.seeds):
        return None
    if sorted(results["complete_arms"]) != sorted(a.name for a in study.arms):
        return None
    summary = results["summary"].get(sel.group)
    if summary is None:
        raise ConfigError(f"study {study.name!r}: selection group {sel.group!r} was not measured (groups: "
                          f"{', '.join(results['summary'])})")
    per_seed: dict = {}
    for cell in results["cells"]:
        per_seed.setdefault(cell["arm"], {})[cell["seed"]] = cell["means"][sel.group][sel.metric]
    grid = [{"arm": arm, "settings": sel.settings[arm], **{k: m[sel.metric][k] for k in ("mean", "lo", "hi")},
             "per_seed": [per_seed[arm][s] for s in sorted(per_seed[arm])]} for arm, m in summary.items()]
    families = sel.families or {"all": tuple(a.name for a in study.arms)}
    sign = 1.0 if sel.maximize else -1.0
    choice = {}
    for family, arms in families.items():
        best = max((g for g in grid if g["arm"] in arms), key=lambda g: sign * g["mean"])
        choice[family] = {"arm": best["arm"], "settings": best["settings"], "mean": best["mean"]}
    return {"study": study.name, "group": sel.group, "metric": sel.metric, "maximize": sel.maximize,
            "seeds": sorted(study.seeds), "interval": results["interval"], "grid": grid, "choice": choice}


def write_selection(study: Study, study_path: str, results: dict) -> None:
    """Write choose()'s record to the selection's path (beside the study file), or say why not yet."""
    if study.selection is None:
        return
    record = choose(study, results)
    path = os.path.join(os.path.dirname(os.path.abspath(study_path)), study.selection.path)
    if record is None:
        print(f"[study] selection not written: it needs every arm at every seed of {list(study.seeds)}, not "
              f"shortened ({path} unchanged)", file=sys.stderr, flush=True)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _write_json(path, record)
    chosen = ", ".join(f"{family}: {c['arm']}" for family, c in record["choice"].items())
    print(f"[study] selection: {chosen} -> {path}", file=sys.stderr, flush=True)


def shared_times(workdir: str, seeds: Optional[Sequence[int]] = None) -> dict:
    """{seed: wall seconds} of the shared stages trained (or adopted) for each seed (None: every seed there is)."""
    if seeds is None:
        root = os.path.join(workdir, "shared")
        names = os.listdir(root) if os.path.isdir(root) else []
        seeds = sorted(int(n[len("seed"):]) for n in names if n.startswith("seed") and n[len("seed"):].isdigit())
    out = {}
    for s in seeds:
        for name in ("done.json", "reused.json"):  # trained here, or adopted with a raw folder's cells
            path = os.path.join(_shared_dir(workdir, s), name)
            if os.path.exists(path):
                with open(path) as f:
                    out[s] = json.load(f)["wall_s"]
                break
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Command line.

def add_arguments(parser) -> None:
    parser.add_argument("study", help="experiments/studies/NAME.py (defines get_study())")
    parser.add_argument("--workdir", default=None,
                        help="the study's directory (cells, results.json/.md/.png); with --raw: where the regenerated "
                             "report goes (default: the raw folder)")
    parser.add_argument("--jobs", type=int, default=1, help="cells to run at once, each in its own process")
    parser.add_argument("--seeds", default=None, help="comma-separated subset of the study's seeds")
    parser.add_argument("--arms", default=None, help="comma-separated subset of the study's arms")
    parser.add_argument("--quick", action="store_true", help="one shortened cell (first arm, first seed), for CI")
    parser.add_argument("--report-only", action="store_true", help="aggregate the finished cells; run nothing")
    parser.add_argument("--raw", default=None, metavar="DIR",
                        help="with --report-only: regenerate the report from a raw results folder (results/NAME) "
                             "alone, no workdir needed")
    parser.add_argument("--export-raw", default=None, metavar="DIR",
                        help="write the workdir's finished cells as a raw results folder (results/NAME); run nothing")
    parser.add_argument("--reuse", action="append", default=[], metavar="DIR",
                        help="another study's workdir, or this study's raw results folder (results/NAME, e.g. "
                             "committed by a run on another machine): its shared stages and cells whose saved config "
                             "is identical to one of ours are adopted instead of retrained (repeatable)")
    parser.add_argument("--cell", default=None, help=argparse_suppress())
    parser.add_argument("--shared", default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} {text!r}: expected comma-separated integers, e.g. 0,1,2") from None


def _report_from_raw(study: Study, args) -> int:
    """--report-only --raw DIR [--workdir OUT]: results.json/.md/.png regenerated from the raw folder alone."""
    if not args.report_only:
        raise ConfigError("--raw regenerates a report: use it with --report-only")
    if args.export_raw is not None or args.quick or args.seeds or args.arms or args.reuse:
        raise ConfigError("--report-only --raw takes no --export-raw, --quick, --seeds, --arms or --reuse: the raw "
                          "folder is the whole study")
    out = args.workdir or args.raw
    results = raw.report(study, args.raw)
    os.makedirs(out, exist_ok=True)
    report.write(study, results, out)
    print(f"results: {os.path.join(out, 'results.md')}", file=sys.stderr)
    return 0


def cli(args) -> int:
    try:
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        study = load_study(args.study)
        if args.raw is not None:
            return _report_from_raw(study, args)
        if args.workdir is None:
            raise ConfigError("--workdir is required (except with --report-only --raw)")
        if args.export_raw is not None:
            missing = raw.export(study, args.study, args.workdir, args.export_raw, shared_times(args.workdir),
                                 digest=lambda cell: config_digest(_saved_config(cell)))
            if missing:
                print(f"not finished, not exported: {', '.join(missing)}", file=sys.stderr)
            print(f"raw results: {args.export_raw} (its report: starling-jax study {args.study} --report-only "
                  f"--raw {args.export_raw})", file=sys.stderr)
            return 0
        if args.shared is not None:
            run_shared(study, args.workdir, _int_list(args.shared, "shared")[0], args.quick)
            return 0
        if args.cell is not None:
            arm, _, seed = args.cell.rpartition("@")
            run_cell(study, args.workdir, arm, _int_list(seed, "cell")[0], args.quick)
            return 0
        seeds = _int_list(args.seeds, "seeds") if args.seeds else None
        arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
        if args.report_only:
            records = []
            for root, _, files in os.walk(os.path.join(args.workdir, "cells")):
                if "cell.json" in files:
                    with open(os.path.join(root, "cell.json")) as f:
                        records.append(json.load(f))
            if not records:
                raise FileNotFoundError(f"{args.workdir}: no finished cells to report")
            seeds_done = sorted({r["seed"] for r in records})
            results = report.aggregate(study, records, shared_times(args.workdir, seeds_done), this_run_s=0.0,
                                       failed=[])
            report.write(study, results, args.workdir)
            write_selection(study, args.study, results)
        else:
            results = run_study(study, args.study, args.workdir, jobs=args.jobs, seeds=seeds, arms=arms,
                                quick=args.quick, reuse=args.reuse)
    except (TrainingDiverged, StageInterrupted) as e:  # bad input is left to the guard of commands/cli.py
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"results: {os.path.join(args.workdir, 'results.md')}", file=sys.stderr)
    return 1 if results.get("failed") else 0
