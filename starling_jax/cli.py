"""The `starling-jax` command line: run | train | eval | generate | chat | plan | convert | bench.

Each subcommand lives in its own module, which defines `add_arguments(parser)` and `cli(args) -> int`; this file only
dispatches (modules are imported lazily so `starling-jax --help` stays fast).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    # name: (module, one-line help)
    "run": ("starling_jax.train.loop", "run all stages of an experiment end to end and print its summary"),
    "train": ("starling_jax.train.loop", "train an experiment's stages (resumes from WORKDIR by default)"),
    "eval": ("starling_jax.eval.cli", "reward-model ranking metrics of an experiment or checkpoint on held-out data"),
    "generate": ("starling_jax.chat", "generate replies to prompts with a checkpoint"),
    "chat": ("starling_jax.chat", "chat interactively with a checkpoint (OpenChat template, streamed)"),
    "plan": ("starling_jax.plan", "per-device memory and FLOPs of an experiment on a mesh, without hardware"),
    "convert": ("starling_jax.hf", "convert between a Hugging Face directory and a starling_jax checkpoint"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="starling-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else list(argv)
    wanted = argv[0] if argv and argv[0] in COMMANDS else None
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if name == wanted:  # import only the module of the command being run
            mod = importlib.import_module(module)
            (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(COMMANDS[args.command][0])
    handler = getattr(mod, f"{args.command}_cli", None) or mod.cli
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
