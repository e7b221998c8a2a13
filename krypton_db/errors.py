"""Exception types. Every message names what is wrong and what is allowed."""


class KryptonError(Exception):
    """Base class for krypton_db errors."""


class ModelError(KryptonError, ValueError):
    """A model file cannot be loaded (corrupt, unsupported op, dynamic shapes, ...)."""


class InputError(KryptonError, ValueError):
    """A user-supplied input (image, batch, option) is invalid."""
