"""imsrc: PostgreSQL-backed image similarity search. `from backend import ImageSearch`."""


def __getattr__(name):
    # Lazy, so that `python -m backend --help` and the embedder do not pay for torch/FAISS imports they skip.
    if name in ("ImageSearch", "SearchResponse", "SearchResult", "AddResult"):
        from backend import service

        return getattr(service, name)
    raise AttributeError(name)
