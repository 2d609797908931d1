"""Whether a query is like anything a collection holds ("no close match" otherwise), calibrated on the collection
itself, or for a derived model judged in its base model's space."""

import numpy as np

from backend.search.category_index import CategoryIndex
from backend.search.confidence import Calibration, assess, key_of, moved_on


class BaseSpace:
    """A derived model's "no close match", judged in its base model's space. A head trained on the categories maps
    images unlike all of them onto them too (21 of 23 scikit-image photos came out "close" to a Fashion-MNIST
    category through it, none without it), so the query's base vector is compared with the mean base vector of each
    category, as the threshold was measured when the head was trained (on the images it was not trained on)."""

    def __init__(self, sessions, base_model: str, dim: int):
        self.sessions, self.base_model, self.dim = sessions, base_model, dim
        self._means, self._key = np.zeros((0, dim), np.float32), None

    def reset(self) -> None:
        """Read the categories' means again at the next query."""
        self._key = None

    def similarities(self, base_vector: np.ndarray, index: CategoryIndex) -> np.ndarray:
        """The base vector's similarity to each category's mean base vector, best first; the means are read again
        when the derived model's index moves on (moved_on)."""
        if moved_on(self._key, index):
            from backend.storage import prototypes as prototype_store

            with self.sessions() as s:
                _, means = prototype_store.category_means(s, self.base_model)
            self._means, self._key = means.reshape(-1, self.dim), key_of(index)
        return -np.sort(-(self._means @ base_vector))


class QueryConfidence:
    """A collection's judge of queries: backend.search.confidence's calibration of its own index, or BaseSpace for a
    derived model (its threshold measured when its head was trained)."""

    def __init__(self, sessions, embedder):
        self.embedder = embedder
        self.calibration = Calibration()
        self.base_space = BaseSpace(sessions, embedder.source.name, embedder.source.dim) \
            if embedder.source is not embedder else None

    def reset(self) -> None:
        """Draw "no close match" again at the next query: the collection's members moved."""
        self.calibration.reset()
        if self.base_space is not None:
            self.base_space.reset()

    @property
    def pending(self) -> bool:
        """Whether the threshold is drawn again at the next query."""
        return self.calibration.pending

    def threshold(self, index: CategoryIndex) -> float | None:
        """The best prototype similarity under which a query is "no close match"."""
        if self.base_space is not None:
            return self.embedder.head.report.get("base_no_match_threshold")
        return self.calibration.current(index)

    def of(self, index: CategoryIndex, vector: np.ndarray, base: np.ndarray | None = None, ranking=None):
        """The Confidence of a query, or None without prototypes (or, for a derived model, without the base vector);
        `ranking` is stage 1's (category, similarity) list over every category, when a search made one. Call with
        the search lock held."""
        if self.base_space is not None:
            sims = self.base_space.similarities(base, index) if base is not None else np.zeros(0)
        else:
            sims = np.array([sim for _, sim in ranking]) if ranking is not None else \
                index.rank_prototypes(vector[None, :])[1][0]
        return assess(sims, self.threshold(index))
