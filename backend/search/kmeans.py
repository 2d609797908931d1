"""Spherical k-means on unit vectors (FAISS), for prototype slots and automatic categories."""

import faiss
import numpy as np

KMEANS_ITERATIONS = 25


def spherical_kmeans(vectors: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k unit centroids (k, d) of unit vectors (n, d), by k-means on the sphere; a vector's cluster is the centroid
    of largest inner product (some may have none)."""
    kmeans = faiss.Kmeans(vectors.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                          min_points_per_centroid=1, max_points_per_centroid=100_000)
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    return kmeans.centroids
