"""imsrc: PostgreSQL-backed image similarity search. `from backend import ImageSearch`."""


def __getattr__(name):
    # Lazy, so that `python -m backend --help` and the embedder do not pay for torch/FAISS imports they skip.
    if name == "ImageSearch":
        from backend.service.image_search import ImageSearch

        return ImageSearch
    if name in ("SearchResponse", "SearchResult", "AddResult"):
        from backend.service import results

        return getattr(results, name)
    raise AttributeError(name)
