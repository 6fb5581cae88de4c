"""User-facing errors.

Every problem a user can cause or fix (bad config, missing files, misbehaving rewards) is raised as a
`PrdpError` whose message is one sentence saying what went wrong and how to fix it. Hosts show that
message as is; anything else is a bug and is reported with a pointer to the log.
"""


class PrdpError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(PrdpError):
    """An invalid configuration value; the message names the field."""


class ModelLoadError(PrdpError):
    """The base model could not be found or loaded."""


class PromptError(PrdpError):
    """The prompt source is missing, empty or malformed."""


class RewardError(PrdpError):
    """A reward is unknown, failed, or returned something unusable."""


class ExportError(PrdpError):
    """A LoRA could not be exported."""


def library_reason(exc: BaseException, clause: bool = False) -> str:
    """The gist of a library's error, to quote inside one of our sentences: the first line of its message (with
    `clause`, only up to its first full stop), else the exception's type name."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    return reason.split(". ")[0].rstrip(".")[:200] if clause else reason
