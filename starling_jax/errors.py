"""The error type for bad input, and how the command line turns any error a user can act on into one line.

Raise `InputError` (or a subclass: ConfigError, NectarError, HFFormatError, ...) with a message that names the file
(and row / field where there is one) and says what to do; `starling-jax` prints it as `error: <message>` and exits
with status 2, without a traceback (`--debug` or STARLING_JAX_DEBUG=1 shows it). The guard in starling_jax.commands.cli also
turns the library errors a damaged or wrong file raises (SyntaxError, JSONDecodeError, UnicodeDecodeError, OSError,
safetensors' SafetensorError, pyarrow's ArrowException, KeyError, ValueError) into such a line, with the file when the
exception carries it; a reader that knows the file should still catch those and raise InputError naming it.
"""

from __future__ import annotations

import difflib
import json

EXIT_BAD_INPUT = 2
DEBUG_ENV = "STARLING_JAX_DEBUG"


class InputError(ValueError):
    """Bad input a user can fix: the message names the file (row, field) and what to do. CLI exit status 2."""


def did_you_mean(name: str, options) -> str:
    """"did you mean a, b?" (up to 3 close matches of `name` among `options`), else "known: " and every option, in
    the order given: the tail of an unknown-name message."""
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(options)}"


def _library_errors() -> tuple[type, ...]:
    """Exception types of the libraries that read files, imported only if already loaded (keeps --help fast)."""
    import sys
    found = []
    if "safetensors" in sys.modules:
        from safetensors import SafetensorError
        found.append(SafetensorError)
    if "pyarrow" in sys.modules:
        import pyarrow
        found.append(pyarrow.ArrowException)
    if "jinja2" in sys.modules:
        import jinja2
        found.append(jinja2.TemplateError)
    return tuple(found)


def user_errors() -> tuple[type, ...]:
    """Every exception type the CLI guard reports as one line (exit 2) instead of a traceback."""
    return (InputError, SyntaxError, ValueError, KeyError, OSError) + _library_errors()


def describe(e: BaseException) -> str:
    """One line (or a short paragraph when the message itself carries a command to run) for an error: the message
    of our own errors as is; for library errors, what kind of problem it is, the file / position it carries, and the
    library's message."""
    if isinstance(e, InputError):
        return str(e)
    if isinstance(e, SyntaxError):
        where = f"{e.filename}:{e.lineno}" if e.filename else "<input>"
        return f"{where}: Python syntax error: {e.msg} (fix the file)"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not valid {e.encoding} text (byte {e.start}: {e.reason}); convert it to UTF-8"
    if isinstance(e, OSError):
        if e.filename is not None and e.strerror:
            return f"{e.filename}: {e.strerror}"
        return str(e) or type(e).__name__
    if isinstance(e, KeyError):
        key = e.args[0] if e.args else ""
        return key if isinstance(key, str) and " " in key else f"unknown name or missing field {key!r}"
    name = type(e).__name__
    if name == "SafetensorError":
        return f"corrupt or truncated safetensors file ({e}); re-download or re-convert it"
    if name.startswith("Arrow") or type(e).__module__.startswith("pyarrow"):
        return f"unreadable Arrow/Parquet data ({name}: {e}); re-download or re-export the file"
    if name.endswith("TemplateError") or name.startswith("Template"):
        return f"chat template error ({name}: {e})"
    return str(e) or name
