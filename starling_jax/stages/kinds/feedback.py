"""The feedback stage kind: AI feedback inside the training loop (the half of Starling that made Nectar).

    Stage(name="feedback", objective=ObjectiveConfig(name="feedback"), model=ModelSection(path=...),
          feedback=FeedbackConfig(k=7, judge="task"), train=TrainConfig(steps=S))

Each loop step takes the next feedback.prompts_per_step training prompts (a fixed order from data.shuffle_seed;
held-out, tuning and unseen prompts are never judged), samples feedback.k replies to each from the stage's model
(starling_jax.generation.feedback.sample_k: its chat template, temperature, stop tokens), ranks them with the judge and appends
Nectar rows to WORKDIR/<stage>/feedback.jsonl. A later stage reads them with data.source = "stage:<stage>" (the rm
stage, unchanged). The position and the number of rows written are the stage's checkpointed data state, so a killed
run resumes where it stopped (the file is cut back to the checkpoint's rows) and samples the same replies: each
step's key is fold_in(train.seed, step).

Judges (feedback.judge): "task" - the data source's own (data/tasks.py judge, or the synthetic true utility);
"package.module:function" - fn(messages, reply) -> score, higher is better; "reward_model" - the experiment's
reward_model section scores every reply; "llm" - feedback.judge_model reads a K-wise ranking prompt with the replies
shuffled and answers "[[C]] > [[A]] > ..."; rows it cannot parse are counted and left out, and its agreement with
itself under two shuffles is measured on feedback.agreement_prompts prompts.

The stage trains nothing and exports no model (only its summary): "stage:NAME" names its rows, not weights. It runs
in one process (its generation is not sharded over hosts): on a pod, run it first on one host.
"""

from __future__ import annotations

import json
import logging
import os
import random
import jax
import jax.numpy as jnp
import numpy as np

from starling_jax.config import Experiment, ModelSection
from starling_jax.data import load_tokenizer, pipelines, tasks
from starling_jax.data.nectar import parse_prompt
from starling_jax.generation import feedback as fb
from starling_jax.stages import program as prog
from starling_jax.stages.rollout import RewardScorer, conversation_of, trained_reward_template

log = logging.getLogger(__name__)
ROWS_FILE = "feedback.jsonl"


def rows_path(workdir: str, stage: str) -> str:
    """Where the feedback stage `stage` of an experiment run in `workdir` writes its rows."""
    return os.path.join(workdir, stage, ROWS_FILE)


def _truncate_lines(path: str, keep: int) -> None:
    """Keep the first `keep` lines of `path` (rows written after the checkpoint being resumed)."""
    if not os.path.exists(path):
        if keep:
            raise FileNotFoundError(f"{path}: missing, but the checkpoint says {keep} rows were written; rerun with "
                                    f"--fresh")
        return
    with open(path) as f:
        lines = f.readlines()
    if len(lines) < keep:
        raise ValueError(f"{path}: {len(lines)} rows, but the checkpoint says {keep} were written; rerun with --fresh")
    with open(path, "w") as f:
        f.writelines(lines[:keep])


def _score_judge(ctx: prog.StageContext, splits):
    """judge(conversations, replies per conversation) -> scores per conversation, for every judge but "llm"."""
    c, f = ctx.config, ctx.config.feedback
    if f.judge == "reward_model":
        rm_config, rm_params = prog.load_model(ctx, c.reward_model, jax.random.key(0))
        template, tokenizer_name, note = trained_reward_template(ctx.experiment, c.reward_model)
        if note:
            log.info("[%s] %s", ctx.stage_name, note)
        scorer = RewardScorer(rm_config, rm_params, load_tokenizer(tokenizer_name), template,
                              c.reward_model.max_length)

        def judge(convs, replies):
            flat_c = [m for m, answers in zip(convs, replies) for _ in answers]
            flat_r = [a for answers in replies for a in answers]
            scores = np.asarray(scorer(flat_c, flat_r), np.float64).tolist()
            out, i = [], 0
            for answers in replies:
                out.append(scores[i:i + len(answers)])
                i += len(answers)
            return out
        return judge
    if f.judge == "task":
        fn = tasks.get(c.data.source).judge if c.data.source.startswith("task:") else splits.true_utility
    else:
        fn = fb.load_function(f.judge)
    return lambda convs, replies: [[float(fn(m, a)) for a in answers] for m, answers in zip(convs, replies)]


class _LLMJudge:
    """judge(prompt text) -> reply text: greedy decoding of feedback.judge_model in its own template."""

    def __init__(self, ctx: prog.StageContext):
        f = ctx.config.feedback
        tok_source = f.judge_model if not f.judge_model.startswith("stage:") else ctx.config.model.tokenizer
        self.config, self.params = prog.load_model(ctx, ModelSection(path=f.judge_model), jax.random.key(0))
        self.tokenizer = load_tokenizer(tok_source)
        self.template, self.max_new_tokens = f.judge_template, f.judge_max_new_tokens

    def many(self, prompts: list[str]) -> list[str]:
        convs = [[{"role": "user", "content": p}] for p in prompts]
        out = fb.sample_k(self.params, self.config, self.tokenizer, self.template, convs, 1, jax.random.key(0),
                          self.max_new_tokens, temperature=0.0, batch_size=max(1, min(8, len(convs))))
        return [o[0] for o in out]


class FeedbackSource:
    """The stage's BatchSource: each next_batch samples, judges and writes one step's rows."""

    def __init__(self, ctx: prog.StageContext):
        c = self.c = ctx.config
        f = self.f = c.feedback
        self.stage_name, self.workdir = ctx.stage_name, ctx.workdir
        if jax.process_count() > 1:
            raise ValueError(f"stage {ctx.stage_name!r}: the feedback stage runs in one process (its sampling is not "
                             f"sharded over hosts); run `starling-jax feedback` in one process, then the training "
                             f"stages on the pod")
        self.splits = splits = pipelines.load_splits(c.data)
        need = c.train.steps * f.prompts_per_step
        if need > len(splits.train):
            raise ValueError(f"stage {ctx.stage_name!r}: train.steps={c.train.steps} x feedback.prompts_per_step="
                             f"{f.prompts_per_step} = {need} prompts, but data.source {c.data.source!r} has "
                             f"{len(splits.train)} training prompts; lower train.steps")
        order = np.random.default_rng(c.data.shuffle_seed).permutation(len(splits.train))[:need]
        self.conversations = [conversation_of(splits.train[i], f"train row {i}") for i in order]
        self.model_config, self.params = prog.load_model(ctx, c.model, jax.random.key(c.train.seed))
        self.tokenizer = load_tokenizer(c.model.tokenizer)
        self.true_utility = splits.true_utility
        if f.judge == "llm":
            self.llm, self.judge = _LLMJudge(ctx), None
        else:
            self.llm, self.judge = None, _score_judge(ctx, splits)
        os.makedirs(ctx.workdir, exist_ok=True)
        self.path = os.path.join(ctx.workdir, ROWS_FILE)
        self.position, self.rows_written = 0, 0
        self.counts = {"skipped_empty_answer": 0, "unparseable_ranking": 0, "rows_without_signal": 0}
        self.sums = {"score": 0.0, "scored": 0, "true": 0.0, "true_n": 0, "best_true": 0.0, "prompts": 0}

    def _rank(self, convs: list, replies: list, step: int):
        """(ranks per kept conversation or None, scores per conversation or None)."""
        if self.llm is None:
            scores = self.judge(convs, replies)
            return [fb.rank_by_scores(s) for s in scores], scores
        rng = random.Random(self.c.train.seed * 1_000_003 + step)
        shown = [fb.shuffled_prompt(m, answers, rng) for m, answers in zip(convs, replies)]
        verdicts = self.llm.many([prompt for _, prompt in shown])
        ranks = [fb.ranks_from_reply(reply, order) for (order, _), reply in zip(shown, verdicts)]
        return ranks, None

    def next_batch(self, state) -> dict:
        f, step = self.f, self.position
        convs = self.conversations[step * f.prompts_per_step:(step + 1) * f.prompts_per_step]
        key = jax.random.fold_in(jax.random.key(self.c.train.seed), step)
        replies = fb.sample_k(self.params, self.model_config, self.tokenizer, self.c.model.template, convs, f.k, key,
                              f.max_new_tokens, temperature=f.temperature, top_p=f.top_p,
                              batch_size=min(f.generation_batch, len(convs) * f.k))
        ranks, scores = self._rank(convs, replies, step)
        if step == 0:  # a fresh stage starts a fresh file (a resumed one was cut back to its checkpoint: set_state)
            _truncate_lines(self.path, 0)
        rows, true_means = [], []
        for i, (m, answers) in enumerate(zip(convs, replies)):
            if self.true_utility is not None:
                truth = [float(self.true_utility(m, a)) for a in answers]
                self.sums["true"] += sum(truth)
                self.sums["true_n"] += len(truth)
                self.sums["best_true"] += max(truth)
                true_means.append(np.mean(truth))
            if any(not a.strip() for a in answers):
                self.counts["skipped_empty_answer"] += 1
                continue
            if ranks[i] is None:
                self.counts["unparseable_ranking"] += 1
                continue
            if scores is not None:
                self.sums["score"] += sum(scores[i])
                self.sums["scored"] += len(scores[i])
                self.counts["rows_without_signal"] += len(set(scores[i])) == 1
            rows.append(fb.nectar_row(m, answers, [f"{self.stage_name}:sample"] * len(answers), ranks[i],
                                      source=f"starling_jax feedback ({f.judge})"))
        self.sums["prompts"] += len(convs)
        with open(self.path, "a") as out:
            for r in rows:
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.rows_written += len(rows)
        self.position += 1
        batch = {"rows": np.float32(len(rows)), "prompts": np.float32(len(convs))}
        if scores is not None:  # the same keys every step
            batch["judge_score"] = np.float32(np.mean([x for row in scores for x in row]))
        if self.true_utility is not None:
            batch["true_reward"] = np.float32(np.mean(true_means))
        return batch

    def get_state(self) -> dict:
        return {"position": self.position, "rows_written": self.rows_written, "counts": dict(self.counts),
                "sums": dict(self.sums)}

    def set_state(self, state: dict) -> None:
        self.position, self.rows_written = int(state["position"]), int(state["rows_written"])
        self.counts.update(state["counts"])
        self.sums.update(state["sums"])
        _truncate_lines(self.path, self.rows_written)

    def summary(self) -> dict:
        s, f = self.sums, self.f
        out = {"rows": self.rows_written, "prompts": s["prompts"], "k": f.k, "judge": f.judge,
               "path": os.path.abspath(self.path), **self.counts,
               "mean_judge_score": s["score"] / s["scored"] if s["scored"] else None}
        if s["true_n"]:
            out["sample_true_reward"] = s["true"] / s["true_n"]  # mean over every sampled reply
            out["best_of_k_true_reward"] = s["best_true"] / s["prompts"]  # mean over prompts of the best reply's
        if self.llm is not None and f.agreement_prompts:
            out["judge_self_agreement"] = self._agreement()
        return out

    def _agreement(self) -> dict:
        """The LLM judge ranks the first rows' replies again under two fresh independent shuffles."""
        with open(self.path) as fh:
            rows = [json.loads(line) for _, line in zip(range(self.f.agreement_prompts), fh)]
        items = [(parse_prompt(r["prompt"]), [a["answer"] for a in r["answers"]]) for r in rows]
        return fb.self_agreement(lambda i, rng: fb.llm_rank(lambda p: self.llm.many([p])[0], items[i][0],
                                                            items[i][1], rng), len(items), seed=self.c.train.seed)


def _count_step(state, batch):
    metrics = {k: jnp.asarray(v) for k, v in batch.items()}
    return {"step": state["step"] + 1}, metrics



def check_feedback(c, algorithm, earlier: dict) -> list[tuple[str, str]]:
    """The feedback kind's checks of a stage config (validation runs them): sizes, sampling, and a judge that can
    judge (its data source, reward model or checkpoint)."""
    problems: list[tuple[str, str]] = []

    def bad(field, msg):
        problems.append((field, msg))

    f = c.feedback
    for field, value in (("feedback.k", f.k - 1), ("feedback.prompts_per_step", f.prompts_per_step),
                         ("feedback.max_new_tokens", f.max_new_tokens), ("feedback.generation_batch",
                         f.generation_batch), ("feedback.judge_max_new_tokens", f.judge_max_new_tokens)):
        if value < 1:
            bad(field, f"must be >= {2 if field == 'feedback.k' else 1}, got {value + (field == 'feedback.k')}")
    if f.temperature <= 0:
        bad("feedback.temperature", f"must be > 0, got {f.temperature}")
    if not 0 < f.top_p <= 1:
        bad("feedback.top_p", f"must be in (0, 1], got {f.top_p}")
    if f.judge == "task":
        if not (c.data.source.startswith("task:") or c.data.source == "synthetic"):
            bad("feedback.judge", f"'task' needs a data source that knows its answers ('task:NAME' or 'synthetic'), "
                f"got data.source={c.data.source!r}; name a judge function 'package.module:function' instead")
    elif f.judge == "reward_model":  # the section itself is checked as every stage's (feedback_reads)
        if c.reward_model is None:
            bad("feedback.judge", "'reward_model' needs a reward_model section")
    elif f.judge == "llm":
        if not f.judge_model:
            bad("feedback.judge_model", "judge='llm' needs the judging checkpoint (HF dir, 'hf:ORG/NAME' or "
                "'stage:NAME')")
        elif f.judge_model.startswith("stage:") and f.judge_model[6:] not in earlier:
            bad("feedback.judge_model", f"{f.judge_model!r} does not name an earlier stage")
        elif not f.judge_model.startswith(("stage:", "hf:")) and not os.path.exists(f.judge_model):
            bad("feedback.judge_model", f"{f.judge_model!r} does not exist")
    elif ":" not in f.judge:
        bad("feedback.judge", f"{f.judge!r}: expected 'task', 'reward_model', 'llm' or 'package.module:function'")
    return problems


def feedback_reads(c: Experiment) -> tuple[str, ...]:
    """The model sections a feedback stage loads: the policy it samples, and the reward model where that judges."""
    return ("model", "reward_model") if c.feedback.judge == "reward_model" else ("model",)


@prog.register_stage_kind("feedback", check=check_feedback, reads=feedback_reads, writes_rows=True)
def build_feedback_stage(ctx: prog.StageContext) -> prog.StageProgram:
    """StageProgram of a feedback stage (see the module docstring)."""
    source = FeedbackSource(ctx)
    step = jax.jit(_count_step, donate_argnums=0)

    def finish(state, workdir: str) -> dict:
        summary = source.summary()
        log.info("[%s] %d Nectar rows -> %s (%s)", ctx.stage_name, summary["rows"], summary["path"],
                 ", ".join(f"{k} {v}" for k, v in summary.items() if k not in ("path", "judge_self_agreement")))
        return summary

    return prog.StageProgram(state={"step": jnp.zeros((), jnp.int32)}, step=step, batches=source, export=None,
                             model_config=source.model_config, finish=finish,
                             tokens_per_batch=lambda batch: int(batch["prompts"]) * ctx.config.feedback.k)
