"""A derived model's category means in its base model's space, for "no close match"."""

import numpy as np

from backend.search.category_index import CategoryIndex
from backend.search.confidence import key_of, moved_on


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
