"""Near-duplicates: groups of stored images that are the same picture (re-encoded, resized, lightly cropped, colour-
shifted), found with the index (each image's nearest neighbours above a similarity threshold), and what a person
decided about them (kept in PostgreSQL: a pair decided once is not offered again).

The default threshold comes from bench/duplicates.py (precision and recall on a generated set; see the README).
"""

import numpy as np

DEFAULT_THRESHOLD = 0.92  # bench/duplicates.py: precision 0.99, recall 0.68 with efficientnet_lite0
NEIGHBOURS = 8  # nearest images looked at per image: a picture stored more often than this still joins one group
CHUNK = 4096  # images searched per FAISS call


def similar_pairs(index, threshold: float) -> dict[tuple[int, int], float]:
    """(a, b) with a < b -> similarity, for every stored pair at least `threshold` alike among each image's
    NEIGHBOURS nearest."""
    pairs: dict[tuple[int, int], float] = {}
    for _, ids, vectors in index.partitions():
        for start in range(0, len(ids), CHUNK):
            found, scores = index.neighbours(vectors[start:start + CHUNK], NEIGHBOURS + 1)
            for a, row_ids, row_scores in zip(ids[start:start + CHUNK].tolist(), found.tolist(), scores.tolist()):
                for b, score in zip(row_ids, row_scores):
                    if score < threshold:
                        break
                    if b >= 0 and b != a:
                        pairs[(min(a, b), max(a, b))] = score
    return pairs


def groups(pairs: dict[tuple[int, int], float], decided: set[tuple[int, int]]) -> list[list[int]]:
    """Connected groups of the undecided pairs (union-find), largest first, each sorted by id."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        if (a, b) not in decided:
            parent[root(a)] = root(b)
    members: dict[int, list[int]] = {}
    for x in parent:
        members.setdefault(root(x), []).append(x)
    return sorted((sorted(g) for g in members.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


def collapse(ids: list[int], vectors: np.ndarray, threshold: float) -> list[int]:
    """Of results in rank order with their vectors (n, d), those not at least `threshold` alike to a result kept
    before them (clip-retrieval's deduplication of results)."""
    kept: list[int] = []
    for n in range(len(ids)):
        if not kept or float(np.max(vectors[kept] @ vectors[n])) < threshold:
            kept.append(n)
    return [ids[n] for n in kept]
