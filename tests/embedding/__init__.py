"""Tests of models, runtimes, precision, batching, decoding."""
