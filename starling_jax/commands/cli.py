"""The `starling-jax` command line: run | train | feedback | eval | generate | chat | plan | convert | study.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `cli(args) -> int`; this file only
dispatches (modules are imported lazily so `starling-jax --help` stays fast) and guards: every subcommand runs inside
one guard that turns bad input (starling_jax.errors.InputError and its subclasses, and the errors a damaged or wrong
file raises: see errors.user_errors) into one line `error: ...` and exit status 2, never a traceback. `--debug` (before
or after the subcommand) or STARLING_JAX_DEBUG=1 lets the exception through with its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from starling_jax.errors import DEBUG_ENV, EXIT_BAD_INPUT, InputError, describe, user_errors

COMMANDS = {
    # name: (module, one-line help)
    "run": ("starling_jax.commands.train", "run all stages of an experiment end to end and print its summary"),
    "train": ("starling_jax.commands.train", "train an experiment's stages (resumes from WORKDIR by default)"),
    "feedback": ("starling_jax.commands.train", "AI feedback: sample K replies per prompt, rank them with a judge, "
                                                "write Nectar rows (an experiment's feedback stages)"),
    "eval": ("starling_jax.commands.eval.cli", "MT-Bench/AlpacaEval answers (policy), RM-judged win rates "
                                               "(compare), RewardBench (rm), ranking metrics of an experiment's RM"),
    "generate": ("starling_jax.commands.chat", "generate replies to prompts with a checkpoint"),
    "chat": ("starling_jax.commands.chat", "chat interactively with a checkpoint (its own chat template, streamed)"),
    "plan": ("starling_jax.commands.plan", "per-device memory and FLOPs of an experiment on a mesh, without hardware"),
    "convert": ("starling_jax.commands.convert",
                "convert between a Hugging Face directory and a starling_jax checkpoint"),
    "study": ("starling_jax.commands.study.runner",
              "run a study (arms x seeds) resumably and aggregate it with intervals"),
}


def _debug_flag(parser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)")


class _Stderr(logging.StreamHandler):
    """A handler writing to sys.stderr as it is when a line is logged (main() called again in one process, as tests
    and notebooks do, may find it replaced since the first call)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """The package's log lines (logging.getLogger("starling_jax.*")) go to stderr as plain messages; other libraries'
    loggers (absl/orbax, jax) keep their own settings."""
    logger = logging.getLogger("starling_jax")
    if not logger.handlers:
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def default_platforms() -> None:
    """With libtpu installed (the [tpu] extra, for `plan --target`), jax starts a TPU backend in every process that
    does not name its platforms, even on a host without TPU chips: libtpu then prints a screen of warnings and holds a
    host-wide lock file that the next process cannot take. On such a host (no TPU chip and no NVIDIA GPU visible) and
    when JAX_PLATFORMS is unset, use the CPU; TPU topologies for `plan --target` still load (compile only)."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    from jax._src import hardware_utils
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0 and not hardware_utils.has_visible_nvidia_gpu():
        import jax
        os.environ["JAX_PLATFORMS"] = "cpu"  # for child processes
        jax.config.update("jax_platforms", "cpu")  # jax read the environment when it was imported


def main(argv=None) -> int:
    setup_logging()
    default_platforms()
    parser = argparse.ArgumentParser(prog="starling-jax", description=__doc__.splitlines()[0])
    _debug_flag(parser, False)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    try:
        for name, (module, help_text) in COMMANDS.items():
            p = sub.add_parser(name, help=help_text)
            _debug_flag(p, argparse.SUPPRESS)  # accepted after the subcommand too, without overriding the top one
            if name == wanted:  # import only the module of the command being run
                mod = importlib.import_module(module)
                (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
        args = parser.parse_args(argv)
        debug = debug or args.debug
        mod = importlib.import_module(COMMANDS[args.command][0])
        handler = getattr(mod, f"{args.command}_cli", None) or mod.cli
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if debug:
            raise
        print(f"error: a package this command needs is missing ({e}); install it with pip "
              f"(pip install -e '.[test]' installs them all)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except user_errors() as e:
        if debug:
            raise
        hint = "" if isinstance(e, (InputError, OSError)) else " [--debug shows the traceback]"
        print(f"error: {describe(e)}{hint}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
