"""Errors imsrc reports to a person: each carries a message that says what to do."""


class ImsrcError(Exception):
    """Base class: the command line prints the message and exits non-zero; the API maps it to a 4xx/503."""


class DatabaseError(ImsrcError):
    """The database cannot be reached or lacks what imsrc needs (pgvector, the schema)."""


class ModelUnavailable(ImsrcError):
    """An embedding model's weights cannot be obtained."""


class DatasetUnavailable(ImsrcError):
    """A dataset cannot be found locally nor downloaded."""


class InvalidImage(ImsrcError):
    """Bytes that do not decode to a usable image."""


class InvalidQuery(ImsrcError):
    """A search parameter that cannot be used: a filter, a set of examples or a region (the API answers 422)."""


class NotFound(ImsrcError):
    """An image, category or collection that does not exist."""


class Conflict(ImsrcError):
    """A request the stored state does not allow now: a name taken, a model not ready (the API answers 409)."""
