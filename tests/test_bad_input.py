"""Bad input never crashes: each case below is a bad input to the command line -> the exit status, a pattern the one
line on stderr must match, and no "Traceback" anywhere in the output.

Cases run in-process through starling_jax.cli.main (cheap); a few run as a real subprocess to check what a user sees.

To add a case: append Case(id, argv, status, pattern) to CASES. `argv` is a function of a `Files` helper (a tmp
directory plus ready-made inputs: files.write(name, text_or_bytes), files.hf_dir(), ...) returning the argument list;
`pattern` is a regular expression searched in stderr (write it to name the file and the field, so the test checks the
message says where the problem is).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from starling_jax import cli
from starling_jax.errors import DEBUG_ENV

REPO = Path(__file__).resolve().parent.parent


class Files:
    """A tmp directory with helpers that make the inputs the cases need (built lazily, once per test)."""

    def __init__(self, root: Path):
        self.root = root

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

CASES = [
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
    Case("generate on a missing checkpoint", lambda f: ["generate", f.path("missing"), "--prompt", "hi"], 2,
         r"checkpoint '.*missing' does not exist"),
    Case("study file that does not exist", lambda f: ["study", f.path("nope.py"), "--workdir", f.path("d")], 2,
         r"study file .*nope\.py does not exist"),
    Case("study file without get_study", lambda f: ["study", f.write("s.py", "x = 1\n"), "--workdir", f.path("d")],
         2, r"s\.py: a study file must define get_study\(\)"),
    Case("study with an unknown arm", lambda f: ["study", _STUDY, "--workdir", f.path("d"), "--arms", "nope"], 2,
         r"no arm 'nope'; arms: plackett_luce, bradley_terry"),
    Case("study with bad seeds", lambda f: ["study", _STUDY, "--workdir", f.path("d"), "--seeds", "a,b"], 2,
         r"--seeds 'a,b': expected comma-separated integers"),
]


def run_main(argv, capsys):
    status = cli.main([str(a) for a in argv])
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
    assert err.startswith("error: "), err


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


def test_what_a_user_sees_in_a_subprocess(tmp_path):
    """The real entry point: one line on stderr, exit 2, no traceback; with --debug the traceback is back."""
    bad = Files(tmp_path).write("syn.py", "def get_config(:\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop(DEBUG_ENV, None)
    done = subprocess.run([sys.executable, "-m", "starling_jax.cli", "run", bad], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr, done.stderr
    assert re.match(r"error: .*syn\.py:1: Python syntax error", done.stderr)
    done = subprocess.run([sys.executable, "-m", "starling_jax.cli", "--debug", "run", bad], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 1 and "Traceback" in done.stderr
