"""What one query's search returns (numpy only: no FAISS to import for it)."""
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Hits:
    """One query's answer: image ids, scores and categories, best first, and the prototype ranking used."""

    ids: np.ndarray  # int64 (m,)
    scores: np.ndarray  # float32 (m,)
    categories: np.ndarray  # int64 (m,)
    prototype_ranking: list[tuple[int, float]] = field(default_factory=list)  # (category, similarity), best first
    searched_categories: list[int] = field(default_factory=list)
    prototype_ms: float = 0.0  # stage 1 time, per query
    search_ms: float = 0.0  # stage 2 (FAISS) time, this query
