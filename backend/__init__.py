"""imsrc: PostgreSQL-backed image similarity search. `from backend import ImageSearch`."""
import os

# libgomp, the OpenMP of torch and FAISS, lets its threads spin 300,000 rounds (milliseconds) after each parallel
# region before they sleep: between two searches a core went to spinning, and a lone search on 2 cores took 30%
# longer (bench/load.py). 10,000 rounds still covers the gaps between a forward pass's layers. Read when libgomp
# loads, so set here, before torch or FAISS is imported through imsrc; a value already set wins, and so does an
# OMP_WAIT_POLICY (libgomp would let GOMP_SPINCOUNT override it).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def __getattr__(name):
    # Lazy, so that `python -m backend --help` and the embedder do not pay for torch/FAISS imports they skip.
    if name == "ImageSearch":
        from backend.service.image_search import ImageSearch

        return ImageSearch
    if name in ("SearchResponse", "SearchResult", "AddResult"):
        from backend.service import results

        return getattr(results, name)
    raise AttributeError(name)
