"""Full vectors kept on disk for a compressed index's exact re-rank: float16 rows, memory-mapped, by image id.

A compressed index type holds a few hundred bytes per vector in RAM (its codes); the full vectors it re-scores its
candidates with live in files the kernel pages in on demand. Rows come from two kinds of source: a snapshot's
vector blobs (read in place, never copied) and this process's own append file (rows added since: a rebuild's
stream from PostgreSQL, or single adds), which is unlinked as soon as it is open, so that nothing is left behind
when the process ends. RAM per vector is the lookup alone: 16 bytes (its id and where its row is).

A row is never rewritten: an id added again gets a new row, and the newest one wins; rows of deleted ids stay in
the append file until the index is built anew, or the process starts again from a snapshot (which holds only the
live rows). Where the index folder cannot be written, the append file goes to the system's temporary folder.
"""
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

SEAL_ROWS = 65_536  # ids added since the last merge are looked up in a dict; past this many they join the arrays
# Rows scored at once: their float16 and float32 copies stay under 50 MB at 2048-d, where a filtered search's
# deepest page (k = 1,000) re-scores 32,000 rows, whose buffers (390 MB) were otherwise kept from then on.
SCORE_BLOCK = 4096
ROW_BITS = 40  # a location is (source << ROW_BITS) | row: a trillion rows a source, millions of sources


class VectorStore:
    """Float16 rows by id, in memory-mapped sources; see the module docstring."""

    def __init__(self, dim: int, folder: Path | None = None):
        self.dim, self.folder = dim, folder
        self._sources: list[np.ndarray] = []  # (rows, dim) float16 each; the append file's is re-mapped as it grows
        self._keys = np.zeros(0, np.int64)  # sorted ids ...
        self._locations = np.zeros(0, np.int64)  # ... and where each one's newest row is
        self._recent: dict[int, int] = {}  # id -> location, added since the last merge (they win over _keys)
        self._file = None  # the append file, once something is added
        self._source_of_file = -1
        self._file_rows = 0
        # scores() gathers and widens rows in these, kept between calls: a fresh array of a re-rank's size is a
        # fresh mapping from the OS, whose every page faults on first touch (most of the re-rank's time, measured).
        self._rows16 = np.zeros((0, dim), np.float16)
        self._rows32 = np.zeros((0, dim), np.float32)

    def __len__(self) -> int:
        """Rows stored, live or not."""
        return sum(len(s) for s in self._sources)

    def release_pages(self) -> None:
        """Unmap the pages of the sources that a pass over every row (a rebuild, a checksum) brought into this
        process: they stay in the OS's page cache, and a later read maps them again."""
        for source in self._sources:
            release_pages(source)

    # -- adding -----------------------------------------------------------------------------------
    def add_source(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Rows (n, dim) float16 read in place (a snapshot's blob), for ids (n,): the caller keeps them valid."""
        rows = rows.reshape(len(ids), self.dim)
        self._sources.append(rows)
        self._index(np.asarray(ids, np.int64), (len(self._sources) - 1 << ROW_BITS) + np.arange(len(ids)))

    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Store vectors (n, dim) for ids (n,), appended to this process's file."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        if self._file is None:
            self._open_file()
        rows = np.ascontiguousarray(vectors, dtype=np.float16)
        # At the end of the rows counted so far, not the file's: a write that failed part-way (a full disk) left
        # bytes that the next one overwrites.
        self._file.seek(self._file_rows * self.dim * 2)
        self._file.write(rows.tobytes())
        self._file.flush()
        first = self._file_rows
        self._file_rows += len(ids)
        self._sources[self._source_of_file] = np.memmap(self._file, np.float16, "r", shape=(self._file_rows, self.dim))
        self._index(ids, (self._source_of_file << ROW_BITS) + np.arange(first, self._file_rows))

    def _open_file(self) -> None:
        try:
            Path(self.folder).mkdir(parents=True, exist_ok=True)
            fd, path = tempfile.mkstemp(prefix="imsrc-vectors-", suffix=".f16", dir=self.folder)
        except (OSError, TypeError):  # no folder given, or one that cannot be written: the index still serves
            fd, path = tempfile.mkstemp(prefix="imsrc-vectors-", suffix=".f16")
        self._file = os.fdopen(fd, "w+b")
        try:
            os.unlink(path)  # the open file lives on; the disk space goes when the process does (POSIX)
        except OSError:
            pass  # Windows cannot unlink an open file: it stays in the temporary folder
        self._sources.append(np.zeros((0, self.dim), np.float16))
        self._source_of_file = len(self._sources) - 1

    def _index(self, ids: np.ndarray, locations: np.ndarray) -> None:
        self._recent.update(zip(ids.tolist(), locations.tolist()))
        if len(self._recent) >= SEAL_ROWS:
            self._merge()

    def _merge(self) -> None:
        """Move the recent ids into the sorted arrays (a recent one replaces the same id's older row)."""
        recent = np.fromiter(self._recent.keys(), np.int64, len(self._recent))
        where = np.fromiter(self._recent.values(), np.int64, len(self._recent))
        keep = ~np.isin(self._keys, recent)
        keys, locations = np.concatenate([self._keys[keep], recent]), np.concatenate([self._locations[keep], where])
        order = np.argsort(keys, kind="stable")
        self._keys, self._locations, self._recent = keys[order], locations[order], {}

    # -- reading ----------------------------------------------------------------------------------
    def _locate(self, ids: np.ndarray) -> np.ndarray:
        """Each id's row location; KeyError for an id never stored."""
        ids = np.asarray(ids, np.int64)
        positions = np.minimum(np.searchsorted(self._keys, ids), max(len(self._keys) - 1, 0))
        found = self._keys[positions] == ids if len(self._keys) else np.zeros(len(ids), bool)
        locations = np.where(found, self._locations[positions] if len(self._keys) else 0, -1)
        if self._recent:
            locations = np.fromiter(map(self._recent.get, ids.tolist(), locations.tolist()), np.int64, len(ids))
        if len(locations) and locations.min() < 0:
            raise KeyError(f"no stored vector for image {int(ids[np.argmin(locations)])}")
        return locations

    def get(self, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The vectors (n, dim) of ids (n,), in their order."""
        found = np.empty((len(ids), self.dim), np.float16)
        self._gather(ids, found)
        return widen(found) if dtype == np.float32 else found.astype(dtype, copy=False)

    def _gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        """Copy the rows of ids into out (n, dim) float16."""
        locations = self._locate(ids)
        sources, rows = locations >> ROW_BITS, locations & ((1 << ROW_BITS) - 1)
        for s in np.unique(sources).tolist():
            mask = sources == s
            out[mask] = self._sources[s][rows[mask]]

    def scores(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Inner products (n,) of the query (dim,) with the stored vectors of ids (n,), SCORE_BLOCK rows at a time
        (so that scoring many holds little). Not for two threads at once (every search of an index holds its lock)."""
        if len(ids) > SCORE_BLOCK:
            return np.concatenate([self.scores(ids[i:i + SCORE_BLOCK], query) for i in range(0, len(ids), SCORE_BLOCK)])
        n = len(ids)
        if n > len(self._rows32):
            self._rows16 = np.empty((min(max(n, 2 * len(self._rows32)), SCORE_BLOCK), self.dim), np.float16)
            self._rows32 = np.empty((len(self._rows16), self.dim), np.float32)
        self._gather(ids, self._rows16[:n])
        return widen(self._rows16[:n], self._rows32[:n]) @ query

    def nbytes(self) -> int:
        """RAM held by the lookup (the rows themselves are paged in from disk)."""
        return self._keys.nbytes + self._locations.nbytes + len(self._recent) * 100  # a dict entry with its ints

    def disk_bytes(self) -> int:
        """Bytes of rows in this store's sources (snapshot blobs and the append file)."""
        return len(self) * self.dim * 2


def release_pages(array: np.ndarray) -> None:
    """Drop this process's mapping of the whole pages under a memory-mapped array (an np.memmap or a contiguous
    view of one), so that they no longer count in its RSS; the file is untouched, its pages stay in the OS's page
    cache, and the next read maps them again. Other parts of the same mapping keep theirs. A no-op for an array
    in memory, and where the OS has no madvise (Windows)."""
    mapping = getattr(array, "_mmap", None)  # np.memmap's mapping, which its views share
    if mapping is None or mapping.closed or not hasattr(mmap, "MADV_DONTNEED") or not array.nbytes:
        return
    start = array.ctypes.data - np.frombuffer(mapping, np.uint8).ctypes.data
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        mapping.madvise(mmap.MADV_DONTNEED, first, last - first)


def widen(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float16 rows (a writable array) as float32, exactly, into out (float32, of their shape) when given. By
    torch's vectorised cast: NumPy's takes a slow path for every subnormal, which real embeddings are full of (71
    ms against 2 ms for 10,000 x 1280, measured)."""
    if out is None:
        out = np.empty(rows.shape, np.float32)
    if rows.dtype != np.float16 or out.dtype != np.float32 or out.shape != rows.shape:
        raise ValueError(f"widen: {rows.dtype} {rows.shape} into {out.dtype} {out.shape}")
    torch.from_numpy(out).copy_(torch.from_numpy(rows))
    return out
