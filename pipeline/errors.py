"""Errors the CLI turns into one-line messages (and exit code 1) instead of tracebacks."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: the message names the file or option at fault and what to do about it."""


class ConfigError(PipelineError):
    """An option, or a combination of options, that cannot work."""


class DataError(PipelineError):
    """The dataset on disk is not laid out or encoded as expected."""


class WeightsError(PipelineError):
    """Backbone weights that cannot be resolved, downloaded or loaded."""


class CacheError(PipelineError):
    """A feature cache that is missing, unreadable, or incompatible with the request."""


class ExportError(PipelineError):
    """A model part that cannot be exported to ONNX, or an ONNX file this tool cannot use."""


class StreamError(PipelineError):
    """A live source that cannot be opened, or that was lost."""
