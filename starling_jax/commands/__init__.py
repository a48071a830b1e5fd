"""The command line: `starling-jax` (cli.py) and each command's module (chat, plan, convert, eval/, study/)."""
