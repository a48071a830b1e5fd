"""Bad input never crashes: each case below is a bad input to the command line -> the exit status, a pattern the one
line on stderr must match, and no "Traceback" anywhere in the output.

Cases run in-process through starling_jax.commands.cli.main (cheap); a few run as a real subprocess to check what a user sees.

To add a case: append Case(id, argv, status, pattern) to CASES. `argv` is a function of a `Files` helper (a tmp
directory plus ready-made inputs: files.write(name, text_or_bytes), files.hf_dir(), ...) returning the argument list;
`pattern` is a regular expression searched in stderr (write it to name the file and the field, so the test checks the
message says where the problem is).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from starling_jax.commands import cli
from starling_jax.errors import DEBUG_ENV

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["train", "tiny_sft", "--set", "train.steps=2", "--set", "data.synthetic_prompts=50", "--workdir", "w"]


_SHARED: dict = {}  # inputs built once per test session (tiny HF directories), read-only: copy before damaging


@pytest.fixture(scope="module", autouse=True)
def _remove_shared_inputs():
    """The shared inputs live in a temporary directory of their own; remove it when this module's tests are done."""
    yield
    for path in _SHARED.values():
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
    _SHARED.clear()


def _shared_hf_dir(head: str) -> str:
    if head not in _SHARED:
        import tempfile

        import jax
        import numpy as np

        from starling_jax.io import hf
        from starling_jax import models
        config = models.get_preset("tiny", head=head)
        path = os.path.join(tempfile.mkdtemp(prefix="bad_input_"), f"hf_{head}")
        shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))  # no compilation
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
        hf.save(path, config, params)
        _SHARED[head] = path
    return _SHARED[head]


class Files:
    """A tmp directory with helpers that make the inputs the cases need."""

    def __init__(self, root: Path):
        self.root = root

    def hf_dir(self, head: str = "lm") -> str:
        """A tiny random-init HF directory (MistralForCausalLM, or ...ForSequenceClassification for head="score")."""
        return _shared_hf_dir(head)

    def hf_copy(self, name: str, head: str = "lm") -> str:
        """A private copy of hf_dir(head), to damage."""
        dst = self.root / name
        shutil.copytree(_shared_hf_dir(head), dst)
        return str(dst)

    def damaged_hf(self, how: str) -> str:
        """A tiny HF directory whose model.safetensors is truncated ("truncated"), has a garbled header ("header"),
        or is replaced by a pickled pytorch_model.bin ("bin_only")."""
        d = self.hf_copy(f"hf_{how}")
        st = os.path.join(d, "model.safetensors")
        if how == "truncated":
            with open(st, "r+b") as f:
                f.truncate(os.path.getsize(st) // 2)
        elif how == "header":
            data = bytearray(Path(st).read_bytes())
            data[8:40] = b"x" * 32
            Path(st).write_bytes(bytes(data))
        elif how == "bin_only":
            os.remove(st)
            Path(d, "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really a pickle")
        else:
            raise ValueError(how)
        return d

    def nectar(self, name: str, mutate=None, n: int = 12, text=None) -> str:
        """A JSONL of n synthetic Nectar rows, after mutate(rows) (edits in place), or the given text/bytes."""
        if text is None:
            from starling_jax.data import synthetic
            rows = synthetic.make_rows(n, seed=0)
            if mutate:
                mutate(rows)
            text = "\n".join(json.dumps(r) for r in rows) + "\n"
        return self.write(name, text)

    def path(self, name: str) -> str:
        return str(self.root / name)

    def write(self, name: str, content) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content)
        return str(p)


@dataclasses.dataclass
class Case:
    id: str
    argv: Callable[[Files], list]
    status: int
    pattern: str


_STUDY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "studies",
                      "rm_kwise_vs_pairwise.py")

def _with_objective(objective: dict) -> str:
    """tiny_dpo's saved config.json with its dpo stage's objective replaced."""
    from starling_jax.stages.experiment import load_experiment, to_dict
    d = to_dict(load_experiment("tiny_dpo"))
    d["stages"][1]["objective"] = objective
    return json.dumps(d)


_RL_WITHOUT_HELDOUT = """
from starling_jax.algorithms.apa import APAOptions
from starling_jax.config import (DataConfig, Experiment, ModelSection, RewardModelSection, RolloutConfig,
                                 TrainConfig)
from starling_jax.models import PRESETS

def get_config():
    tiny = PRESETS["tiny"]
    return Experiment(name="rl_no_heldout", model=ModelSection(config=tiny, trainable_top_layers=1),
                      reward_model=RewardModelSection(config=tiny.replace(head="score"), max_length=48),
                      data=DataConfig(synthetic_prompts=32, heldout_fraction=0.0, max_length=40, max_prompt_length=32),
                      objective=APAOptions(),
                      rollout=RolloutConfig(prompts_per_step=8, max_new_tokens=4, minibatch_size=8, eval_prompts=8),
                      train=TrainConfig(steps=1, batch_size=8))
"""

CASES = [
    Case("rl stage without held-out rows (never reports training prompts as held-out)",
         lambda f: ["train", f.write("rl_no_heldout.py", _RL_WITHOUT_HELDOUT), "--workdir", f.path("w")], 2,
         r"no held-out rows to report on .*data\.heldout_fraction > 0"),
    Case("rl stage with a negative number of evaluation prompts",
         lambda f: ["train", f.write("rl_no_heldout.py", _RL_WITHOUT_HELDOUT), "--set", "rollout.eval_prompts=-1",
                    "--workdir", f.path("w")], 2, r"rollout\.eval_prompts: must be >= 0 \(0: the stage samples no"),
    Case("data.report_rows beside a carved held-out split", lambda f: TRAIN + ["--set", "data.report_rows=16"], 2,
         r"data\.report_rows: generates the held-out and unseen splits itself"),
    Case("data.report_rows on Nectar files",
         lambda f: TRAIN + ["--set", f"data.source={f.write('n.jsonl', '')}", "--set", "data.heldout_fraction=0",
                            "--set", "data.report_rows=16"], 2, r"data\.report_rows: needs data\.source='synthetic'"),
    Case("an objective option out of its range",
         lambda f: ["train", "tiny_dpo", "--set", "stages.dpo.objective.dpo_beta=0", "--workdir", f.path("w")], 2,
         r"--set stages\.dpo\.objective\.dpo_beta=0: must be greater than 0, got 0\.0"),
    Case("another algorithm's option",
         lambda f: ["train", "tiny_dpo", "--set", "stages.dpo.objective.apa_lambda=1", "--workdir", f.path("w")], 2,
         r"unknown key 'apa_lambda' in DPOOptions; .*set stages\.dpo\.objective\.name first"),
    Case("a saved config whose objective has the wrong type",
         lambda f: ["train", f.write("run/config.json", _with_objective({"name": "dpo", "dpo_beta": "high"}))], 2,
         r"config\.json.*stages\[1\]\.objective\.dpo_beta: expected float, got 'high'"),
    Case("experiment file with a syntax error",
         lambda f: ["run", f.write("syn.py", "def get_config(:\n")], 2, r"syn\.py:1: Python syntax error"),
    Case("experiment whose get_config raises",
         lambda f: ["run", f.write("raises.py", "def get_config():\n    raise RuntimeError('boom')\n")], 2,
         r"raises\.py: get_config\(\) raised RuntimeError: boom"),
    Case("experiment file that raises on import",
         lambda f: ["train", f.write("imp.py", "import no_such_module_xyz\n")], 2,
         r"imp\.py: importing the experiment file raised ModuleNotFoundError"),
    Case("truncated config.json",
         lambda f: ["train", f.write("run/config.json", '{"name": "x", ')], 2, r"config\.json: invalid JSON at line 1"),
    Case("unknown experiment name", lambda f: ["run", "no_such_experiment"], 2, r"no experiment 'no_such_experiment'"),
    Case("convert from an unknown preset", lambda f: ["convert", "preset:nope", f.path("out")], 2,
         r"unknown model preset 'nope'; known presets: .*tiny"),
    # --- train / run: experiments, model.path, data.source
    Case("model.path that is not a HF directory",
         lambda f: TRAIN + ["--set", f"model.path={f.write('notmodel/readme.txt', 'hi') and f.path('notmodel')}"], 2,
         r"notmodel: no config\.json"),
    Case("model.path with a truncated safetensors",
         lambda f: TRAIN + ["--set", f"model.path={f.damaged_hf('truncated')}"], 2,
         r"hf_truncated/model\.safetensors: corrupt or truncated safetensors"),
    Case("data.source directory without data files",
         lambda f: TRAIN + ["--set", f"data.source={f.write('d/notes.txt', 'x') and f.path('d')}"], 2,
         r"no data files under '.*d' .*found only notes\.txt"),
    Case("data.source with no usable rows",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('empty.jsonl', text='')}"], 2,
         r"empty\.jsonl': no usable rows"),
    Case("bad Nectar row in strict mode",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('bad.jsonl', _bad_rank)}"], 2,
         r"bad\.jsonl: row 3 .*field answers\[0\]\.rank: .*on_bad_row='skip'"),
    Case("truncated Nectar JSONL line in strict mode",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('cut.jsonl', text=_truncated_jsonl())}"], 2,
         r"cut\.jsonl: line 3: not valid JSON"),
    Case("non-UTF-8 Nectar JSONL in strict mode",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('latin1.jsonl', text=_latin1_jsonl())}"], 2,
         r"latin1\.jsonl: line 2: not UTF-8"),
    Case("0-byte Nectar .json",
         lambda f: TRAIN + ["--set", f"data.source={f.write('zero.json', b'')}"], 2, r"zero\.json: empty file"),
    Case("corrupt Nectar .parquet",
         lambda f: TRAIN + ["--set", f"data.source={f.write('bad.parquet', b'PAR1 this is not parquet PAR1')}"], 2,
         r"bad\.parquet: unreadable Parquet file"),
    Case("non-numeric utilities in strict mode",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('u.jsonl', _bad_utilities)}"], 2,
         r"u\.jsonl: row 1 .*field utilities\[2\]: expected a finite number, got 'high'"),
    Case("metadata of the wrong type in strict mode",
         lambda f: TRAIN + ["--set", f"data.source={f.nectar('t.jsonl', _bad_turns)}"], 2,
         r"t\.jsonl: row 0 .*field turns: expected a whole number >= 1, got 'n/a'"),
    Case("non-UTF-8 .json Nectar file",
         lambda f: TRAIN + ["--set", "data.source=" + f.write("l.json", b'[{"prompt": "caf\xe9"}]')], 2,
         r"l\.json: not UTF-8 text"),
    Case("damaged .jsonl.gz",
         lambda f: TRAIN + ["--set", "data.source=" + f.write("z.jsonl.gz", b"\x1f\x8b\x08\x00garbage")], 2,
         r"z\.jsonl\.gz: damaged compressed file"),
    Case("plan of an experiment with a syntax error",
         lambda f: ["plan", f.write("syn.py", "x = (\n"), "--devices", 8], 2, r"syn\.py:\d+: Python syntax error"),
    # --- generate / chat
    Case("generate on a missing checkpoint", lambda f: ["generate", f.path("missing"), "--prompt", "hi"], 2,
         r"checkpoint '.*missing' does not exist"),
    Case("generate on a directory that is no checkpoint",
         lambda f: ["generate", f.write("plain/a.txt", "x") and f.path("plain"), "--prompt", "hi"], 2,
         r"plain' is neither a Hugging Face directory .* nor a starling_jax stage export"),
    Case("generate on a corrupt safetensors header",
         lambda f: ["generate", f.damaged_hf("header"), "--prompt", "hi"], 2,
         r"hf_header/model\.safetensors: corrupt or truncated safetensors"),
    Case("generate on a .bin-only directory", lambda f: ["generate", f.damaged_hf("bin_only"), "--prompt", "hi"], 2,
         r"hf_bin_only: only pickled checkpoints \(pytorch_model\.bin\); starling_jax never unpickles"),
    Case("generate --max-new-tokens 0", lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--max-new-tokens", 0],
         2, r"--max-new-tokens 0: must be >= 1"),
    Case("generate --max-new-tokens beyond the context",
         lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--max-new-tokens", 100000], 2,
         r"--max-new-tokens 100000: the model's context is 512 tokens, so at most 511"),
    Case("generate --temperature -1", lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--temperature", -1], 2,
         r"--temperature -1\.0: must be >= 0"),
    Case("generate --top-p 0", lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--top-p", 0], 2,
         r"--top-p 0\.0: must be in \(0, 1\]"),
    Case("generate --top-p 1.5", lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--top-p", 1.5], 2,
         r"--top-p 1\.5: must be in \(0, 1\]"),
    Case("generate --top-k -1", lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--top-k", -1], 2,
         r"--top-k -1: must be >= 0"),
    Case("generate with a reward-model checkpoint", lambda f: ["generate", f.hf_dir("score"), "--prompt", "hi"], 2,
         r"hf_score: this is a reward model \(head 'score'\); generation needs a language model"),
    Case("generate on a run whose export's model_config.json is damaged",
         lambda f: ["generate", _damaged_export(f, "config"), "--prompt", "hi"], 2,
         r"run_config/sft/export/model_config\.json: 7 bytes, \d+ when it was written \(damaged\); .*run the stage "
         r"again"),
    Case("generate on a run whose exported parameters are cut short",
         lambda f: ["generate", _damaged_export(f, "params"), "--prompt", "hi"], 2,
         r"run_params/sft/export/params/d/[0-9a-f]+: 10 bytes, \d+ when it was written \(damaged\).*run the stage "
         r"again"),
    Case("generate on a run whose exported parameters have bytes flipped (same length)",
         lambda f: ["generate", _damaged_export(f, "flipped"), "--prompt", "hi"], 2,
         r"run_flipped/sft/export/params/d/[0-9a-f]+: crc32 [0-9a-f]{8} differs .* the stage export .*run the stage "
         r"again"),
    Case("generate on an export without digests whose model_config.json is damaged",
         lambda f: ["generate", _damaged_export(f, "config", with_digests=False), "--prompt", "hi"], 2,
         r"run_config_legacy/sft/export/model_config\.json: damaged .*run the stage again"),
    Case("generate on an export without digests whose parameters are cut short",
         lambda f: ["generate", _damaged_export(f, "params", with_digests=False), "--prompt", "hi"], 2,
         r"run_params_legacy/sft/export/params: the exported parameters cannot be read .*run the stage again"),
    Case("generate with a damaged tokenizer.json",
         lambda f: ["generate", _with_file(f, "tokenizer.json", '{"version": "1.0", "trunc'), "--prompt", "hi"], 2,
         r"hf_tokenizer\.json/tokenizer\.json: cannot read this tokenizer\.json"),
    Case("generate with a 0-byte tokenizer.model",
         lambda f: ["generate", _with_file(f, "tokenizer.model", b""), "--prompt", "hi"], 2,
         r"hf_tokenizer\.model/tokenizer\.model: cannot read this SentencePiece model"),
    Case("generate with a damaged tokenizer_config.json",
         lambda f: ["generate", _with_file(f, "tokenizer_config.json", '{"bos_token": ', with_sp_model=True),
                    "--prompt", "hi"], 2,
         r"tokenizer_config\.json: cannot read this tokenizer_config\.json"),
    Case("chat --temperature -1", lambda f: ["chat", f.hf_dir(), "--temperature", -1], 2,
         r"--temperature -1\.0: must be >= 0"),
    Case("chat on a .bin-only directory", lambda f: ["chat", f.damaged_hf("bin_only")], 2, r"only pickled checkpoints"),
    Case("chat with a reward-model checkpoint", lambda f: ["chat", f.hf_dir("score")], 2, r"this is a reward model"),
    Case("chat --top-p 0", lambda f: ["chat", f.hf_dir(), "--top-p", 0], 2, r"--top-p 0\.0: must be in \(0, 1\]"),
    Case("chat --max-new-tokens beyond the context", lambda f: ["chat", f.hf_dir(), "--max-new-tokens", 512], 2,
         r"--max-new-tokens 512: the model's context is 512 tokens"),
    Case("chat on a missing checkpoint", lambda f: ["chat", f.path("missing")], 2, r"does not exist"),
    # --- convert
    Case("generate --max-new-tokens abc (argparse)",
         lambda f: ["generate", f.hf_dir(), "--prompt", "hi", "--max-new-tokens", "abc"], 2,
         r"argument --max-new-tokens: invalid int value: 'abc'"),
    Case("convert from a missing source", lambda f: ["convert", f.path("missing"), f.path("out")], 2,
         r"missing: not a directory"),
    Case("convert from a truncated safetensors", lambda f: ["convert", f.damaged_hf("truncated"), f.path("out")], 2,
         r"hf_truncated/model\.safetensors: corrupt or truncated safetensors"),
    Case("convert from a converted directory whose safetensors has bytes flipped (same length)",
         lambda f: ["convert", _flipped_conversion(f), f.path("out")], 2,
         r"converted/model\.safetensors: crc32 [0-9a-f]{8} differs .*re-convert or re-copy the directory"),
    Case("convert from a .bin-only directory", lambda f: ["convert", f.damaged_hf("bin_only"), f.path("out")], 2,
         r"only pickled checkpoints"),
    Case("convert into a non-empty directory",
         lambda f: ["convert", "preset:tiny", f.write("full/config.json", "{}") and f.path("full")], 2,
         r"full: output directory is not empty \(config\.json\); .* --overwrite"),
    Case("convert into a file", lambda f: ["convert", "preset:tiny", f.write("afile", "x")], 2,
         r"afile: exists and is not a directory"),
    Case("convert --peft with an adapter made for another base (hidden size 32, not 64)",
         lambda f: ["convert", f.hf_dir(), f.path("o"), "--peft", _peft_for_other_base(f)], 2,
         r"other_base/adapter_model\.safetensors: tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
         r"lora_A\.weight has shape \[4, 32\], expected \[4, 64\]"),
    Case("convert --peft on a preset source", lambda f: ["convert", "preset:tiny", f.path("o"), "--peft", "x"], 2,
         r"--peft applies only to a Hugging Face directory source"),
    Case("convert a truncated GGUF", lambda f: ["convert", f.write("m.gguf", b"GGUF\x03\x00\x00\x00"), f.path("o")],
         2, r"m\.gguf: cannot read GGUF"),
    Case("generate from a malformed hub id", lambda f: ["generate", "hf:no-slash", "--prompt", "hi"], 2,
         r"hf:no-slash.*expected hf:ORG/NAME"),
    Case("eval policy with a missing questions file",
         lambda f: ["eval", "policy", f.path("ckpt"), "--questions", f.path("q.jsonl"), "--format", "mt_bench",
                    "--out", f.path("a.jsonl")], 2, r"q\.jsonl: no such file"),
    Case("eval policy with a malformed MT-Bench question",
         lambda f: ["eval", "policy", f.path("ckpt"), "--questions", f.write("q.jsonl", '{"question_id": 1}\n'),
                    "--format", "mt_bench", "--out", f.path("a.jsonl")], 2, r"q\.jsonl: row 0: field 'turns'"),
    Case("eval policy with a truncated JSONL line",
         lambda f: ["eval", "policy", f.path("ckpt"), "--questions", f.write("q.jsonl", '{"question_id": 1, "tu'),
                    "--format", "alpaca_eval", "--out", f.path("a.json")], 2, r"q\.jsonl:1: invalid JSON"),
    Case("eval policy on a missing checkpoint",
         lambda f: ["eval", "policy", f.path("ckpt"), "--questions", f.write("q.json", '[{"instruction": "hi"}]'),
                    "--format", "alpaca_eval", "--out", f.path("a.json")], 2, r"ckpt: does not exist"),
    Case("eval policy with an unknown format",
         lambda f: ["eval", "policy", f.path("ckpt"), "--questions", "q", "--format", "gsm8k", "--out", "o"], 2,
         r"invalid choice: 'gsm8k'"),
    Case("eval compare with a prompts file of an unknown type",
         lambda f: ["eval", "compare", f.path("a"), f.path("b"), "--prompts", f.write("p.csv", "x\n"), "--judge",
                    f.path("rm")], 2, r"p\.csv: unsupported file type"),
    Case("eval compare with a negative temperature",
         lambda f: ["eval", "compare", f.path("a"), f.path("b"), "--prompts", f.write("p.txt", "x\n"), "--judge",
                    f.path("rm"), "--temperature", "-1"], 2, r"--temperature and --tie-margin must be >= 0"),
    Case("eval rm with a RewardBench row missing 'rejected'",
         lambda f: ["eval", "rm", f.path("rm"), "--rewardbench",
                    f.write("rb.json", '[{"prompt": "p", "chosen": "c", "subset": "s"}]')], 2,
         r"rb\.json: row 0: field 'rejected' must be a string"),
    Case("eval rm on a directory that is no model",
         lambda f: ["eval", "rm", f.write("empty/readme.txt", "x").rsplit("/", 1)[0], "--rewardbench",
                    f.write("rb.json", '[{"prompt": "p", "chosen": "c", "rejected": "r", "subset": "s"}]')], 2,
         r"empty: neither a Hugging Face model directory .* nor a starling_jax run"),
    Case("eval on a HF policy directory", lambda f: ["eval", f.hf_dir()], 2,
         r"hf_lm is a Hugging Face policy directory, not an experiment or a run\. .*starling-jax eval policy"),
    Case("eval on a HF reward-model directory", lambda f: ["eval", f.hf_dir("score")], 2,
         r"hf_score is a Hugging Face reward model directory, not an experiment or a run\. .*starling-jax eval rm"),
    Case("convert a run with no finished stage",
         lambda f: ["convert", _run_without_exports(f), f.path("out")], 2, r"no finished stage"),
    Case("study file that does not exist", lambda f: ["study", f.path("nope.py"), "--workdir", f.path("d")], 2,
         r"study file .*nope\.py does not exist"),
    Case("study file without get_study", lambda f: ["study", f.write("s.py", "x = 1\n"), "--workdir", f.path("d")],
         2, r"s\.py: a study file must define get_study\(\)"),
    Case("study with an unknown arm", lambda f: ["study", _STUDY, "--workdir", f.path("d"), "--arms", "nope"], 2,
         r"no arm 'nope'; arms: plackett_luce, bradley_terry"),
    Case("study with bad seeds", lambda f: ["study", _STUDY, "--workdir", f.path("d"), "--seeds", "a,b"], 2,
         r"--seeds 'a,b': expected comma-separated integers"),
    # --- LoRA (model.lora)
    Case("lora target that matches no projection", lambda f: TRAIN + ["--set", "model.lora.targets=q,qkv"], 2,
         r"model\.lora\.targets: 'qkv' matches no projection; did you mean v, q, k\?"),
    Case("lora rank larger than a targeted projection", lambda f: TRAIN + ["--set", "model.lora.rank=40"], 2,
         r"model\.lora\.rank: 40 is larger than the 'k' projection's width 32; use a rank <= 32"),
    Case("lora layers below the trained top", lambda f: TRAIN + ["--set", "model.trainable_top_layers=1", "--set",
                                                                 "model.lora.layers=[0]"], 2,
         r"model\.lora\.layers: \[0\] must be distinct indices of the layers that train, 1\.\.1"),
    Case("lora dropout in a dpo stage",
         lambda f: ["train", "tiny_dpo", "--set", "stages.dpo.model.lora.dropout=0.1", "--workdir", f.path("w")], 2,
         r"stage 'dpo': model\.lora\.dropout: 0\.1: a dpo stage compares the policy's log-probs"),
    Case("convert --adapters of a stage without LoRA",
         lambda f: ["convert", _run_with_export(f), f.path("out"), "--adapters"], 2,
         r"this stage trained no LoRA adapters \(no lora\.json\)"),
]



def _bad_rank(rows):
    rows[3]["answers"][0]["rank"] = "x"


def _bad_utilities(rows):
    rows[1]["utilities"][2] = "high"


def _bad_turns(rows):
    rows[0]["turns"] = "n/a"


def _truncated_jsonl() -> str:
    from starling_jax.data import synthetic
    lines = [json.dumps(r) for r in synthetic.make_rows(6, seed=0)]
    lines[2] = lines[2][: len(lines[2]) // 2]  # a line cut in the middle
    return "\n".join(lines) + "\n"


def _latin1_jsonl() -> bytes:
    from starling_jax.data import synthetic
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in synthetic.make_rows(4, seed=0)]
    lines[1] = lines[1].replace(b"Human: ", "Human: caf\u00e9 ".encode("latin-1"), 1)
    return b"\n".join(lines) + b"\n"


def _run_without_exports(f: Files) -> str:
    """A WORKDIR whose config.json names the main job's stages, none of them trained."""
    from starling_jax.stages.experiment import load_experiment, to_dict
    exp = load_experiment(str(REPO / "experiments" / "tiny_starling.py"))
    return f.write("run/config.json", json.dumps(to_dict(exp))).rsplit("/", 1)[0]


def _run_with_export(f: Files) -> str:
    """A WORKDIR whose stage 'sft' (tiny_sft, full layers) looks finished: its export's summary and model config (the
    weights are never read: `convert --adapters` stops at the missing lora.json)."""
    import dataclasses

    from starling_jax.stages.experiment import load_experiment, to_dict
    exp = load_experiment(str(REPO / "experiments" / "tiny_sft.py"))
    f.write("done/sft/export/summary.json", "{}")
    f.write("done/sft/export/model_config.json", json.dumps(dataclasses.asdict(exp.model.config)))
    return f.write("done/config.json", json.dumps(to_dict(exp))).rsplit("/", 1)[0] + "/sft"


def _with_file(f: Files, name: str, content, with_sp_model: bool = False) -> str:
    """A copy of the tiny HF directory with one more (damaged) file, e.g. a tokenizer file; with_sp_model: and the
    Mistral SentencePiece model as its tokenizer.model (so the directory's tokenizer files are read)."""
    d = f.hf_copy(f"hf_{name}")
    if with_sp_model:
        from starling_jax.data.tokenizer import mistral_model_path
        shutil.copy(mistral_model_path(), os.path.join(d, "tokenizer.model"))
    f.write(os.path.join(d, name), content)
    return d


def _peft_for_other_base(f: Files) -> str:
    """A PEFT LoRA directory (io/peft.py, rank 4, q_proj) for the tiny preset with hidden size 32 instead of 64."""
    import jax
    import numpy as np

    from starling_jax import models
    from starling_jax.io import peft
    from starling_jax.models import lora
    config = models.get_preset("tiny", hidden_size=32)
    options = lora.LoraOptions(rank=4, alpha=8.0, targets=("q",))
    adapters = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), lora.abstract(config, options))
    peft.save(f.path("other_base"), config, adapters, options)
    return f.path("other_base")


def _flipped_conversion(f: Files) -> str:
    """What `convert preset:tiny` writes (with digests.json), then 64 bytes in the middle of its safetensors flipped."""
    out = f.path("converted")
    assert cli.main(["convert", "preset:tiny", out]) == 0
    st = os.path.join(out, "model.safetensors")
    with open(st, "r+b") as fh:
        fh.seek(os.path.getsize(st) // 2)
        fh.write(b"\xff" * 64)
    return out


def _damaged_export(f: Files, what: str, with_digests: bool = True) -> str:
    """A WORKDIR with a finished sft stage export (tiny, random) whose model_config.json is truncated ("config"),
    whose parameter files are cut to 10 bytes ("params") or have bytes flipped in place ("flipped"). with_digests
    False: the export's digests.json removed (an export made before exports carried digests)."""
    import jax
    import numpy as np

    from starling_jax import models
    from starling_jax.digests import MANIFEST
    from starling_jax.step.checkpoint import save_export
    run = f.path(f"run_{what}" + ("" if with_digests else "_legacy"))
    export = Path(run, "sft", "export")
    config = models.get_preset("tiny")
    shapes = jax.eval_shape(lambda: models.init_params(config, jax.random.key(0)))  # no compilation
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.02 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
    save_export(str(export), config, params, {"stage": "sft"})
    if not with_digests:
        os.remove(export / MANIFEST)
    if what == "config":
        (export / "model_config.json").write_text('{"vocab')
    else:
        for p in (export / "params").rglob("*"):
            if p.is_file() and p.parent.name == "d":  # the array data files (orbax OCDBT)
                with open(p, "r+b") as fh:
                    if what == "params":
                        fh.truncate(10)
                    else:
                        fh.seek(os.path.getsize(p) // 2)
                        fh.write(b"\xff" * 64)
    return run


def run_main(argv, capsys):
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors (a usage line, then "PROG: error: ...", status 2)
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ and other default outputs land in tmp
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    status, out, err = run_main(case.argv(Files(tmp_path)), capsys)
    assert "Traceback" not in out + err
    assert status == case.status, err
    assert re.search(case.pattern, err), f"stderr {err!r} does not match {case.pattern!r}"
    # the one line; for an export made before exports carried digests, after the line saying it loads unverified
    assert (re.match(r"(stage export \S+ has no digests\.json .* loading it unverified\n)?error: ", err)
            or re.search(r"^usage: .*\nstarling-jax \w+: error: ", err, re.S)), err


def test_debug_flag_and_env_show_the_traceback(tmp_path, capsys, monkeypatch):
    bad = Files(tmp_path).write("raises.py", "def get_config():\n    raise RuntimeError('boom')\n")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    for argv in (["--debug", "run", bad], ["run", bad, "--debug"]):
        with pytest.raises(Exception, match="boom"):
            cli.main(argv)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(Exception, match="boom"):
        cli.main(["run", bad])
    monkeypatch.setenv(DEBUG_ENV, "0")
    assert cli.main(["run", bad]) == 2


@pytest.mark.slow
def test_what_a_user_sees_in_a_subprocess(tmp_path):
    """The real entry point: one line on stderr, exit 2, no traceback; with --debug the traceback is back."""
    bad = Files(tmp_path).write("syn.py", "def get_config(:\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, "-m", "starling_jax.commands.cli", "run", bad], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert re.match(r"error: .*syn\.py:1: Python syntax error", done.stderr)
    done = subprocess.run([sys.executable, "-m", "starling_jax.commands.cli", "--debug", "run", bad], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr


def test_convert_overwrite_replaces_the_model_files(tmp_path, capsys):
    """Refused without --overwrite (the directory is left as it was); with it, the old model files go (no stale shard
    next to the new single file), other files stay, and the result loads."""
    from starling_jax.io import hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old shard")
    (out / "config.json").write_text("{}")
    (out / "README.md").write_text("notes")
    source = Files(tmp_path).hf_dir()
    assert cli.main(["convert", source, str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"
    assert cli.main(["convert", source, str(out), "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "digests.json", "model.safetensors"]
    config, _ = hf.load(str(out))
    assert config.hidden_size == 64


def test_a_long_conversation_is_cut_to_the_room_the_reply_leaves():
    """Session.prompt_ids keeps the last max_seq_len - max_new_tokens ids (never a negative slice)."""
    import argparse

    from starling_jax import models
    from starling_jax.commands.chat import Session
    from starling_jax.data import get_template, load_tokenizer
    from starling_jax.errors import InputError
    s = Session.__new__(Session)  # the prompt logic alone, without loading a model
    s.config, s.tokenizer = models.get_preset("tiny"), load_tokenizer("openchat-3.5")
    s.template = get_template("openchat_3.5")
    messages = [{"role": "user", "content": "word " * 600}]
    full = s.tokenizer.encode_chat(messages, template=s.template)
    assert len(full) > 512
    s.args = argparse.Namespace(max_new_tokens=500)
    assert s.prompt_ids(messages) == full[-12:]
    s.args = argparse.Namespace(max_new_tokens=512)
    with pytest.raises(InputError, match="leaves no room for a prompt"):
        s.prompt_ids(messages)
