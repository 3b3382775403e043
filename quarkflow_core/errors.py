"""Typed errors raised by the core; the edges (CLI, API, UI) turn them into messages."""

from __future__ import annotations


class QuarkflowError(Exception):
    """Base class. ``code`` is a stable machine-readable identifier."""

    code = "error"

    def __init__(self, detail: str, *, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if code is not None:
            self.code = code


class ConfigError(QuarkflowError):
    """A setting is missing or invalid; ``detail`` names the variable."""

    code = "config_error"


class DatabaseUnavailable(QuarkflowError):
    code = "database_unavailable"


class StorageError(QuarkflowError):
    code = "storage_error"


class ObjectNotFound(StorageError):
    code = "not_found"


class NotFound(QuarkflowError):
    code = "not_found"


class AlreadyExists(QuarkflowError):
    code = "already_exists"


class InvalidInput(QuarkflowError):
    code = "invalid_input"


class PermissionDenied(QuarkflowError):
    code = "permission_denied"


class AuthenticationFailed(QuarkflowError):
    code = "authentication_failed"


class Conflict(QuarkflowError):
    """The state changed underneath the caller (e.g. the champion moved meanwhile)."""

    code = "conflict"
