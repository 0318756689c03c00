"""Errors a user can act on. Each message names the problem and the fix."""


class CheckpointError(ValueError):
    """A model directory is missing a file, or a file is corrupt or does not match the others."""


class ContextLengthError(ValueError):
    """The prompt does not fit the model's context window."""


class InputError(ValueError):
    """A chat request is malformed (wrong keys, wrong history shape, wrong types)."""


class ExportError(ValueError):
    """An export cannot be written as asked: its destination exists, or the format cannot hold the model."""
