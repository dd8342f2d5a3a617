"""Hydra's refusals of a command line as echo's one line, `echo: bad config: <what>: <fix>`, exit 2,
instead of Hydra's several lines and exit 1 (HYDRA_FULL_ERROR=1 set by the user keeps Hydra's report)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

FULL_ERROR = "HYDRA_FULL_ERROR"


@contextmanager
def one_line_errors(task_function: Callable) -> Iterator[None]:
    """Run `hydra.main`'s entry point; a config Hydra refuses ends the process with one line and
    exit 2. An error raised by `task_function` itself (a bug) propagates with its traceback."""
    if os.environ.get(FULL_ERROR):
        yield
        return
    os.environ[FULL_ERROR] = "1"
    try:
        yield
    except Exception as error:
        if not refused_by_hydra(error, getattr(task_function, "__wrapped__", task_function)):
            raise
        print(f"echo: bad config: {describe(error)}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop(FULL_ERROR, None)


def refused_by_hydra(error: BaseException, task_function: Callable) -> bool:
    """Whether `error` is Hydra's (or OmegaConf's) refusal of the config, raised outside `task_function`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(error, HydraException | OmegaConfBaseException):
        return False
    code, tb = getattr(task_function, "__code__", None), error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is code:
            return False
        tb = tb.tb_next
    return True


def describe(error: BaseException, argv: Sequence[str] | None = None) -> str:
    """What Hydra refused and how to fix it, in one line; `argv`: the command line's overrides."""
    import difflib

    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    argv = sys.argv[1:] if argv is None else argv
    if isinstance(error, MissingConfigException) and error.options and error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")  # model/encdek
        options = list(error.options)
        either = options[0] if len(options) == 1 else f"{', '.join(options[:-1])} or {options[-1]}"
        close = difflib.get_close_matches(name, options, n=1)
        did_you_mean = f" (did you mean {group}={close[0]}?)" if close else ""
        return f"{group}={name} is unknown: choose {group}={either}{did_you_mean}"
    if isinstance(error, OverrideParseException):
        return unreadable(error.override, error.message)
    cause = error.__cause__
    if isinstance(error, ConfigCompositionException) and isinstance(cause, ConfigAttributeError | ConfigKeyError):
        if cause.full_key and cause.key is not None and hasattr(cause.parent_node, "keys"):
            return unknown_key(str(cause.full_key), str(cause.key), list(cause.parent_node.keys()), argv)
    return _one_line(error)


def unknown_key(full_key: str, key: str, siblings: list, argv: Sequence[str]) -> str:
    """`foo=1: the config has no key foo: ...`, with the closest key if there is one. `full_key`: the
    first key of the override that is not in the config, `key` its last segment."""
    import difflib

    keys = {a: a.lstrip("+~").partition("=")[0].partition("@")[0] for a in argv}
    given = next((a for a in argv if f"{keys[a]}.".startswith(f"{full_key}.")), f"{full_key}=<value>")
    typed, _, value = given.lstrip("+~").partition("=")
    line = f"{given}: the config has no key {full_key}"
    close = difflib.get_close_matches(key, [str(k) for k in siblings], n=1, cutoff=0.7) if "/" not in key else []
    if close:
        start = len(full_key) - len(key)  # the segment that is not there, and what follows it
        suggested = f"{typed[:start]}{close[0]}{typed[start + len(key) :]}"
        return f"{line}: write {suggested}={value} (the closest key), or +{typed}={value} to add a new one"
    return f"{line}: to add one write +{typed}={value}"


def unreadable(override: str, message: str) -> str:
    """An override Hydra's grammar cannot read: quote it, and say to quote its value."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.startswith("See https")]
    detail = next((line for line in lines if not line.startswith("Error parsing override")), "")
    detail = "a character it cannot read unquoted" if detail.startswith("LexerNoViableAltException") else detail
    what = f"{override!r} cannot be read" + (f" ({detail})" if detail else "")
    key, equals, value = override.partition("=")
    if not equals:
        return f"{what}: write key=value, e.g. {override.strip()}=<value>"
    quoted = f"\"{key}='{value}'\"" if "'" not in value else f"'{key}=\"{value}\"'"
    return f"{what}: quote a value that holds brackets, commas, spaces or non-ASCII characters, e.g. {quoted}"


def _one_line(error: BaseException) -> str:
    """Hydra's message (and its cause's first line) in one line, without its lists of options and paths."""
    lines = []
    for line in str(error).strip().splitlines():
        if line.startswith(("Config search path:", "Available options", "See https")):
            break
        if line.strip():
            lines.append(line.strip())
    text = ""
    for line in lines:
        text += (" " if text.endswith(".") else "; ") + line if text else line
    cause = str(error.__cause__ or "").strip()
    if cause:
        text += f": {cause.splitlines()[0]}" if text else cause.splitlines()[0]
    return text or type(error).__name__
