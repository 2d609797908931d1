"""Batch stages: datasets, ingestion, re-embedding, clustering, training heads, evaluation, checks."""
