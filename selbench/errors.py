"""Errors selbench raises for problems a user can fix; the CLI prints them without a traceback."""


class SelbenchError(Exception):
    """Base class: a clear, user-facing problem (bad input, bad plugin, bad config)."""


class ConfigError(SelbenchError):
    """A config file or option is invalid; the message names the file and key."""


class PoolError(SelbenchError):
    """A pool cannot be read: missing directory, missing or corrupt shard."""


class UndecodableImageError(PoolError):
    """One sample's image does not decode; ``uid`` and ``reason`` say which and why."""

    def __init__(self, message: str, uid: str, reason: str) -> None:
        super().__init__(message)
        self.uid, self.reason = uid, reason


class UnknownMethodError(SelbenchError):
    """No strategy is registered under the requested name."""


class PluginError(SelbenchError):
    """A plugin failed to load, raised inside ``select``, or returned an invalid selection."""


class StorageError(SelbenchError):
    """A file could not be written (disk full, quota, file size limit); nothing half-written
    is left behind, and the next run redoes the work."""


class UndeclaredNeedError(PluginError):
    """A strategy used a context service (embeddings, proxy, target) it did not declare."""
