"""Images to vectors: models, runtimes, precision, batching, decoding, query edits."""
