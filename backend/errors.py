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


class UnsupportedFormat(InvalidImage):
    """An image in a format imsrc does not take (the API answers 415)."""


class InvalidQuery(ImsrcError):
    """A search parameter that cannot be used: a filter, a set of examples or a region (the API answers 422)."""


class NotFound(ImsrcError):
    """An image, category or collection that does not exist."""


class Conflict(ImsrcError):
    """A request the stored state does not allow now: a name taken, a model not ready (the API answers 409)."""


class ShuttingDown(ImsrcError):
    """The server is stopping: it takes no new work (the API answers 503 with Retry-After)."""


# The API's status for each error, by class (the most specific class that an error is wins).
HTTP_STATUS = {NotFound: 404, UnsupportedFormat: 415, InvalidImage: 400, InvalidQuery: 422, Conflict: 409,
               DatabaseError: 503, ModelUnavailable: 503, ShuttingDown: 503, DatasetUnavailable: 503, ImsrcError: 400}


def http_status(error: ImsrcError) -> int:
    """The HTTP status the API answers `error` with."""
    return next(HTTP_STATUS[c] for c in type(error).__mro__ if c in HTTP_STATUS)
