"""The one exception type users see: a message that names the key or file and what to do."""


class TransferlabError(Exception):
    """Bad input or a failed run, explained in one line."""


class ConfigError(TransferlabError):
    """A config value that composes but cannot run (e.g. ``target.lr=-1``)."""


class NonFiniteLossError(TransferlabError):
    """The training loss became NaN or infinite."""


class Preempted(TransferlabError):
    """SIGTERM arrived: a checkpoint was written and the run stopped; the same command resumes it."""

    exit_code = 143  # 128 + SIGTERM: interrupted, not failed and not finished


class Interrupted(Preempted):
    """Ctrl-C (SIGINT), handled like SIGTERM: a checkpoint, what was measured kept, a clean stop."""

    exit_code = 130  # 128 + SIGINT, what shells report for Ctrl-C


class DataError(TransferlabError):
    """A data file or column that cannot be used as it is (names it, and what to do)."""


def user_message(e: BaseException) -> str:
    """The one line a user sees. An error raised in a DataLoader worker comes back wrapped
    ("Caught DataError in DataLoader worker process 0." + the worker's traceback): its own message
    is the traceback's last line."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    if len(lines) > 1 and lines[0].startswith("Caught "):
        for prefix in (f"{type(e).__module__}.{type(e).__qualname__}: ", f"{type(e).__name__}: "):
            if lines[-1].startswith(prefix):
                return lines[-1][len(prefix):]
    return lines[0]
