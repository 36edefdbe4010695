"""Errors a user can cause. Each carries one line that says what is wrong and what to do.

The CLI prints `str(err)` on stderr and exits 1; `--debug` shows the traceback instead.
Classes subclass builtins where one fits, so library callers can catch either (as zarr does).
"""


class SaectlError(Exception):
    """A user-facing error: the message is one line naming the problem and the fix."""


class ConfigError(SaectlError, ValueError):
    """A flag, YAML field or parameter value is invalid."""


class NotFoundError(SaectlError, FileNotFoundError):
    """A model, dataset, artifact or file does not exist."""


class HubUnreachableError(NotFoundError):
    """The hub cannot be reached and what it names is not in the local cache: the address (which
    pins the commit) is unknown until it can be (`saectl run --dry-run` says "will run")."""


class ArtifactError(SaectlError):
    """An artifact is incomplete, locked, damaged, or not one of saectl's."""
