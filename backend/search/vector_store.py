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
import warnings
from pathlib import Path

import numpy as np
import torch

from backend.search.id_map import IdMap

# Rows scored at once: their float16 and float32 copies (6 MB at 2048-d) stay in the CPU's cache from the copy to
# the cast to the product (10,000 rows of 2048 from a million: 11.6 ms in blocks of 512, 20.2 in blocks of 4,096,
# measured), and a filtered search's deepest page (k = 1,000 re-scores 32,000 rows) keeps no 390 MB of buffers.
SCORE_BLOCK = 512
ROW_BITS = 40  # a location is (source << ROW_BITS) | row: a trillion rows a source, millions of sources


class VectorStore:
    """Float16 rows by id, in memory-mapped sources; see the module docstring."""

    def __init__(self, dim: int, folder: Path | None = None):
        self.dim, self.folder = dim, folder
        self._sources: list[np.ndarray] = []  # (rows, dim) float16 each; the append file's is re-mapped as it grows
        self._tensors: list[torch.Tensor] = []  # the same rows as torch sees them, to copy from
        self._locations = IdMap()  # id -> where its newest row is
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
        self._set_source(len(self._sources), rows.reshape(len(ids), self.dim))
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
        self._set_source(self._source_of_file,
                         np.memmap(self._file, np.float16, "r", shape=(self._file_rows, self.dim)))
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
        self._source_of_file = len(self._sources)
        self._set_source(self._source_of_file, np.zeros((0, self.dim), np.float16))

    def _set_source(self, position: int, rows: np.ndarray) -> None:
        """Make rows the source at position (a new one at the end)."""
        with warnings.catch_warnings():  # rows mapped read-only, which torch warns of: _copy_rows only reads them
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(rows)
        if position == len(self._sources):
            self._sources.append(rows)
            self._tensors.append(tensor)
        else:
            self._sources[position], self._tensors[position] = rows, tensor

    def _index(self, ids: np.ndarray, locations: np.ndarray) -> None:
        self._locations.set(ids, locations)

    def seal(self) -> None:
        """Move the look-ups of the rows added since the last merge into sorted arrays: after a bulk load."""
        self._locations.seal()

    # -- reading ----------------------------------------------------------------------------------
    def _locate(self, ids: np.ndarray) -> np.ndarray:
        """Each id's row location; KeyError for an id never stored."""
        locations = self._locations.get(ids)
        if len(locations) and locations.min() < 0:
            raise KeyError(f"no stored vector for image {int(np.asarray(ids).ravel()[np.argmin(locations)])}")
        return locations

    def get(self, ids: np.ndarray, dtype=np.float32) -> np.ndarray:
        """The vectors (n, dim) of ids (n,), in their order."""
        locations = self._locate(ids)
        order = np.argsort(locations, kind="stable")
        rows = np.empty((len(ids), self.dim), np.float16)
        self._copy_rows(locations[order], rows)
        found = np.empty_like(rows)
        found[order] = rows
        return widen(found) if dtype == np.float32 else found.astype(dtype, copy=False)

    def _copy_rows(self, locations: np.ndarray, out: np.ndarray) -> None:
        """Copy the rows at sorted locations into out (n, dim) float16: one torch index_select a source, which
        copies once and on every core (NumPy's fancy index and masked assignment copied twice, on one: 21 against
        4 ms for 10,000 rows of 2048, measured), in the order the rows lie in their files."""
        if not len(locations):
            return
        sources, rows = locations >> ROW_BITS, torch.from_numpy(locations & ((1 << ROW_BITS) - 1))
        found = torch.from_numpy(out)
        bounds = np.flatnonzero(np.r_[True, sources[1:] != sources[:-1], True])
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            torch.index_select(self._tensors[int(sources[a])], 0, rows[a:b], out=found[a:b])

    def scores(self, ids: np.ndarray, query: np.ndarray) -> np.ndarray:
        """Inner products (n,) of the query (dim,) with the stored vectors of ids (n,), SCORE_BLOCK rows at a time
        (so that scoring many holds little), read in the order they lie on disk. Not for two threads at once (every
        search of an index holds its lock)."""
        locations = self._locate(ids)
        order = np.argsort(locations, kind="stable")
        query = torch.from_numpy(np.ascontiguousarray(query, np.float32))
        found = np.empty(len(ids), np.float32)
        for start in range(0, len(ids), SCORE_BLOCK):
            block = order[start:start + SCORE_BLOCK]
            n = len(block)
            if n > len(self._rows32):  # made once, a block's worth, and kept
                self._rows16 = np.empty((SCORE_BLOCK, self.dim), np.float16)
                self._rows32 = np.empty((SCORE_BLOCK, self.dim), np.float32)
            self._copy_rows(locations[block], self._rows16[:n])
            # By torch, as the copy and the cast before it: NumPy's BLAS has threads of its own, which waited on
            # torch's still-spinning ones for the same cores (8.2 against 0.85 ms for 320 rows, measured).
            found[block] = torch.mv(torch.from_numpy(widen(self._rows16[:n], self._rows32[:n])), query).numpy()
        return found

    def nbytes(self) -> int:
        """RAM held by the lookup (the rows themselves are paged in from disk)."""
        return self._locations.nbytes()

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
