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
