"""The feedback stage kind and the verifiable task sources.

- task:arithmetic: 210 distinct problems, answers read as the reply's last integer, held-out problems disjoint from
  the training ones (the split is by prompt string and each problem has exactly one).
- feedback -> rm in one experiment: the rows the stage writes are Nectar rows ranked by the judge (recomputed here
  from the file), and the rm stage reads them unchanged through data.source = "stage:feedback".
- a killed feedback stage resumes from its checkpoint and writes exactly the rows of an uninterrupted run.
- the LLM judge: replies shown shuffled are mapped back to the answers' own order; unparseable verdicts are counted
  and left out; the judge's self-agreement is reported.
- the `feedback` command and its bad inputs.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from starling_jax.generation import feedback as fb
from starling_jax.algorithms import options
from starling_jax.config import (CheckpointConfig, ConfigError, DataConfig, Experiment, FeedbackConfig, LoggingConfig,
                                 ModelSection, ObjectiveConfig, OptimConfig, RewardModelSection, Stage, TrainConfig)
from starling_jax.stages.validation import validate
from starling_jax.data import pipelines, tasks
from starling_jax.data.nectar import parse_prompt, read_rows
from starling_jax.models import PRESETS
from starling_jax.stages.kinds import feedback as feedback_stage
from starling_jax.stages import loop

POLICY = PRESETS["tiny"].replace(num_layers=1)
RM = POLICY.replace(head="score")
DATA = DataConfig(source="task:arithmetic", heldout_fraction=0.3, max_length=48, max_prompt_length=32,
                  max_responses=3)
JUDGE = "starling_jax.data.tasks:arithmetic_judge"


def experiment(steps=2, judge=JUDGE, with_rm=True, every=0) -> Experiment:
    stages = [Stage(name="feedback", objective=ObjectiveConfig(name="feedback"),
                    feedback=FeedbackConfig(k=3, judge=judge, prompts_per_step=8, max_new_tokens=6,
                                            generation_batch=24, agreement_prompts=2),
                    train=TrainConfig(steps=steps, seed=3))]
    if with_rm:
        stages.append(Stage(name="rm", objective=options("rm_plackett_luce"),
                            model=ModelSection(config=RM, tokenizer="openchat-3.5", template="openchat_3.5"),
                            data=dataclasses.replace(DATA, source="stage:feedback", heldout_fraction=0.25),
                            optim=OptimConfig(learning_rate=1e-3), train=TrainConfig(steps=2, batch_size=8)))
    return Experiment(name="feedback_test", data=DATA,
                      model=ModelSection(config=POLICY, tokenizer="openchat-3.5", template="openchat_3.5"),
                      checkpoint=CheckpointConfig(every=every, keep=3),
                      logging=LoggingConfig(every=1, tensorboard=False, progress=False), stages=tuple(stages))


def test_arithmetic_task_rows_answers_and_disjoint_heldout_problems():
    rows = tasks.arithmetic_rows(0)
    problems = [tuple(sorted(tasks.problem_of(parse_prompt(r["prompt"])))) for r in rows]
    assert len(rows) == 210 and len(set(problems)) == 210
    m = [{"role": "user", "content": "What is 7 + 12?"}]
    assert tasks.arithmetic_correct(m, "7 + 12 = 19.") == 1.0
    assert tasks.arithmetic_correct(m, "19, or 20") == 0.0  # the last integer is the answer
    assert tasks.arithmetic_correct(m, "The sum is 1,9") == 0.0 and tasks.reply_answer("1,900") == 1900
    assert tasks.arithmetic_judge(m, "19") == 1.0
    assert tasks.arithmetic_judge(m, "17") == pytest.approx(0.4) and tasks.arithmetic_judge(m, "99") == 0.0
    assert tasks.arithmetic_judge(m, "nineteen") == -0.5
    splits = pipelines.load_splits(DATA)
    train = {tuple(sorted(tasks.problem_of(r["messages"]))) for r in splits.train}
    held = {tuple(sorted(tasks.problem_of(r["messages"]))) for r in splits.heldout}
    assert not train & held and len(held) == pytest.approx(63, abs=2) and len(train | held) == 210
    assert splits.true_utility is tasks.arithmetic_correct
    with pytest.raises(ValueError, match="no such task; known: task:arithmetic"):
        tasks.get("task:algebra")


@pytest.fixture(scope="module")
def chained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("feedback"))
    return workdir, loop.run_experiment(experiment(), workdir)


@pytest.mark.slow
def test_feedback_rows_are_judged_nectar_rows_that_the_rm_stage_reads(chained):
    workdir, summaries = chained
    s = summaries["feedback"]
    path = feedback_stage.rows_path(workdir, "feedback")
    raw = [json.loads(line) for line in open(path)]
    assert s["rows"] == len(raw) == 16 - s["skipped_empty_answer"] and s["prompts"] == 16 and s["k"] == 3
    train_problems = {r["messages"][-1]["content"] for r in pipelines.load_splits(DATA).train}
    for r in raw:
        messages = parse_prompt(r["prompt"])
        assert messages[-1]["content"] in train_problems  # only training prompts are ever sampled and judged
        answers = [a["answer"] for a in r["answers"]]
        scores = [tasks.arithmetic_judge(messages, a) for a in answers]
        assert [a["rank"] for a in r["answers"]] == fb.rank_by_scores(scores)
    rows, report = read_rows(path)  # the Nectar reader takes them unchanged
    assert report.rows_kept == len(raw)
    assert "rows read %d, kept %d" % (len(raw), len(raw)) in summaries["rm"]["data"]
    assert not os.path.exists(os.path.join(workdir, "feedback", "export", "params"))  # rows, not weights
    with pytest.raises(FileNotFoundError, match="exports no model"):
        loop.load_export(os.path.join(workdir, "feedback", "export"))


@pytest.mark.slow
def test_a_killed_feedback_stage_resumes_to_the_rows_of_an_uninterrupted_run(tmp_path, monkeypatch):
    exp = experiment(steps=3, with_rm=False, every=1)
    straight = str(tmp_path / "straight")
    loop.run_experiment(exp, straight)
    want = open(feedback_stage.rows_path(straight, "feedback")).read()

    class Killed(Exception):
        pass
    original = feedback_stage.FeedbackSource.next_batch

    def dies_in_step_3(self, state):
        out = original(self, state)  # step 3's rows reach the file, then the process dies before its checkpoint
        if self.position == 3:
            raise Killed()
        return out
    monkeypatch.setattr(feedback_stage.FeedbackSource, "next_batch", dies_in_step_3)
    resumed = str(tmp_path / "resumed")
    with pytest.raises(Killed):
        loop.run_experiment(exp, resumed)
    monkeypatch.setattr(feedback_stage.FeedbackSource, "next_batch", original)
    summary = loop.run_experiment(exp, resumed)["feedback"]
    assert open(feedback_stage.rows_path(resumed, "feedback")).read() == want
    assert summary["prompts"] == 24


class _LengthJudge:
    """A stand-in LLM judge that ranks the shown replies by length (longest best), except every third prompt,
    which it answers with prose."""
    calls = 0

    def __init__(self, ctx):
        pass

    def many(self, prompts):
        out = []
        for p in prompts:
            _LengthJudge.calls += 1
            shown = re.findall(r"\[Response ([A-Z])\]\n(.*?)\n\[End of Response", p, re.S)
            order = sorted(shown, key=lambda x: (-len(x[1]), x[0]))
            out.append("I cannot decide." if _LengthJudge.calls % 3 == 0 else
                       " > ".join(f"[[{name}]]" for name, _ in order))
        return out


@pytest.mark.slow
def test_llm_judge_unshuffles_counts_unparseable_and_reports_self_agreement(tmp_path, monkeypatch):
    monkeypatch.setattr(feedback_stage, "_LLMJudge", _LengthJudge)
    exp = experiment(steps=2, judge="llm", with_rm=False)
    exp = dataclasses.replace(exp, stages=(dataclasses.replace(
        exp.stages[0], feedback=dataclasses.replace(exp.stages[0].feedback, judge_model=str(tmp_path))),))
    s = loop.run_experiment(exp, str(tmp_path / "run"))["feedback"]
    raw = [json.loads(line) for line in open(feedback_stage.rows_path(str(tmp_path / "run"), "feedback"))]
    assert s["unparseable_ranking"] >= 1 and s["rows"] + s["unparseable_ranking"] + s["skipped_empty_answer"] == 16
    for r in raw:  # the ranks follow the replies' own order: longest first (ties by the label shown, so any order)
        lengths = [len(a["answer"]) for a in r["answers"]]
        ranks = [a["rank"] for a in r["answers"]]
        assert all(lengths[i] >= lengths[j] for i in range(3) for j in range(3) if ranks[i] < ranks[j])
    agreement = s["judge_self_agreement"]
    assert agreement["items"] == 2 and agreement["ranked_twice"] + agreement["unparseable"] >= 1


def test_feedback_config_checks():
    exp = experiment()
    bad_source = dataclasses.replace(exp, stages=(exp.stages[0], dataclasses.replace(
        exp.stages[1], data=dataclasses.replace(DATA, source="stage:rm"))))
    with pytest.raises(ConfigError, match="'stage:rm' does not name an earlier feedback stage"):
        validate(bad_source)
    nectar_task = dataclasses.replace(exp, data=dataclasses.replace(DATA, source="synthetic"), stages=(
        dataclasses.replace(exp.stages[0], data=DataConfig(source=__file__)),))
    with pytest.raises(ConfigError, match="feedback.judge: 'task' needs a data source that knows its answers"):
        validate(dataclasses.replace(nectar_task, stages=(dataclasses.replace(
            nectar_task.stages[0], feedback=FeedbackConfig(judge="task")),)))
    with pytest.raises(ConfigError, match="feedback.k: must be >= 2, got 1"):
        validate(dataclasses.replace(exp, stages=(dataclasses.replace(exp.stages[0], feedback=FeedbackConfig(k=1)),)))
    with pytest.raises(ConfigError, match="judge='llm' needs the judging checkpoint"):
        validate(dataclasses.replace(exp, stages=(dataclasses.replace(
            exp.stages[0], feedback=FeedbackConfig(judge="llm")),)))
    with pytest.raises(ConfigError, match="data.source: 'task:algebra': no such task"):
        validate(dataclasses.replace(exp, data=dataclasses.replace(DATA, source="task:algebra")))


def test_a_reward_model_judge_has_its_section_checked_as_every_stage_reads_it(tmp_path):
    """judge="reward_model" loads the experiment's reward_model section, so validation checks it as an RL stage's:
    template, tokenizer, and a path that is an earlier rm stage or exists; a stage that judges otherwise does not
    load the section and leaves it alone."""
    exp = experiment(with_rm=False)
    sft = Stage(name="sft", objective=ObjectiveConfig(name="sft"), train=TrainConfig(steps=1, batch_size=2))

    def judged_by(section, first=()):
        stage = dataclasses.replace(exp.stages[0], feedback=dataclasses.replace(exp.stages[0].feedback,
                                                                                 judge="reward_model"))
        return dataclasses.replace(exp, reward_model=section, stages=(*first, stage))

    rm = RewardModelSection(config=RM, path=str(tmp_path), tokenizer="openchat-3.5", template="openchat_3.5")
    validate(judged_by(dataclasses.replace(rm, config=RewardModelSection().config)))
    with pytest.raises(ConfigError, match="feedback.judge: 'reward_model' needs a reward_model section"):
        validate(judged_by(None))
    for change, pattern in (
            (dict(template="chatml2"), r"reward_model.template: unknown chat template 'chatml2'"),
            (dict(tokenizer="gpt5"), r"reward_model.tokenizer: 'gpt5' is neither a known tokenizer"),
            (dict(path=str(tmp_path / "absent")), r"reward_model.path: '.*absent' does not exist"),
            (dict(path="stage:rm"), r"reward_model.path: 'stage:rm' does not name an earlier stage")):
        with pytest.raises(ConfigError, match=pattern):
            validate(judged_by(dataclasses.replace(rm, config=RewardModelSection().config, **change)))
    with pytest.raises(ConfigError, match=r"reward_model.path: 'stage:sft' is a 'sft' stage, not a reward-model"):
        validate(judged_by(dataclasses.replace(rm, config=RewardModelSection().config, path="stage:sft"), (sft,)))
    validate(dataclasses.replace(exp, reward_model=dataclasses.replace(rm, template="chatml2")))  # judge "task"


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "starling_jax.commands.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.slow
def test_feedback_command_runs_the_feedback_stage_and_names_bad_input(tmp_path):
    src = tmp_path / "fb_exp.py"
    src.write_text(
        "from starling_jax.config import *\nfrom starling_jax.models import PRESETS\n"
        "P = PRESETS['tiny'].replace(num_layers=1)\n"
        "def get_config():\n"
        "    return Experiment(name='fb', model=ModelSection(config=P, tokenizer='openchat-3.5', "
        "template='openchat_3.5'), data=DataConfig(source='task:arithmetic', max_length=48, max_prompt_length=32), "
        "logging=LoggingConfig(progress=False, tensorboard=False), stages=(Stage(name='fb', "
        "objective=ObjectiveConfig(name='feedback'), feedback=FeedbackConfig(k=2, prompts_per_step=2, "
        "max_new_tokens=4, generation_batch=4), train=TrainConfig(steps=1)),))\n")
    done = _cli("feedback", str(src), "--workdir", str(tmp_path / "w"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["fb"]["prompts"] == 2 and os.path.exists(summary["fb"]["path"])
    bad = _cli("feedback", "tiny_sft", "--workdir", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "has no feedback stage" in bad.stderr.strip().splitlines()[-1]
