"""The `starling-jax` command line."""

import sys


def main(argv=None) -> int:
    raise SystemExit("starling-jax: the command line is being built; see README.md")


if __name__ == "__main__":
    sys.exit(main())
