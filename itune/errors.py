"""Typed errors for users: each names the offending file, line or record, the value and the fix."""


class ItuneError(Exception):
    """Base class of every error itune raises for bad input or configuration."""


class ConfigError(ItuneError, ValueError):
    """A run configuration is invalid (every problem found is listed in the message)."""


class DataFormatError(ItuneError, ValueError):
    """An input file or record cannot be read (the message names file, line or record and the fix)."""


class ManifestError(ItuneError, ValueError):
    """Prepared data does not match its manifest, or the manifest does not match the run."""


class WorkerError(ItuneError, RuntimeError):
    """A worker process died (killed by a signal, e.g. the out-of-memory killer) before returning its result."""
