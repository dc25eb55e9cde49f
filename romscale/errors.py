"""Errors a user can act on. Each message names the file or argument and what was expected."""


class RomscaleError(Exception):
    """Base class for every error romscale raises on purpose (bad input, unsupported model...)."""


class UnsupportedModelError(RomscaleError):
    pass


class CheckpointError(RomscaleError):
    """A saved folder or file is missing, truncated, corrupt or does not match the model."""


class AdapterError(RomscaleError):
    """An adapter folder is missing, corrupt, or does not fit with the others."""


class ModelInputError(RomscaleError):
    """A model path (--model) that is missing, of the wrong kind, or that its loader rejected."""
