"""The in-memory index and what ranks with it: numpy in, numpy out, no SQL."""
