"""The index snapshot file: every category's FAISS index as FAISS writes it, one after another, then a footer.

    MAGIC | category blobs ... | prototypes (float32) | [full vectors] | footer (JSON) | footer length (u64)
          | footer CRC-32 (u32) | END

A compressed index type (rabitq) also writes each category's full vectors, ids (int64) then rows (float16), each
64-byte aligned: after a load its exact re-rank reads them from this file, in place.

The footer says what the file was built from (model, index type, dim, the database's fingerprint, vectors per
category) and where each blob lies, with its CRC-32. Reading maps the file into memory and checks every CRC (two
threads: zlib releases the GIL) but copies nothing: FAISS reads each category's codes in place until that category
changes (backend.search.category_index.CategoryIndex.from_stored), so a million vectors load in the time it takes
to checksum them.
A CRC finds the damage a disk or a copy does; it is no defence against someone who may write the snapshot folder,
and needs none: such a person could replace the database's files as well.
"""
import json
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

from backend.search.category_index import CategoryIndex
from backend.search.vector_store import release_pages

FORMAT = 3  # 1: .npz plus .json beside it; 2: .npz with the metadata inside, vectors stored twice
MAGIC, END = b"IMSRC-SNAPSHOT3\n", b"\nIMSRC-END"
TAIL = struct.Struct("<QI")  # footer length, footer CRC-32
SUFFIX = ".snapshot"
ROWS_PER_WRITE = 16_384  # full vectors a compressed type's snapshot reads from its store per write


class SnapshotError(Exception):
    """A snapshot file that cannot be trusted; the message completes "the snapshot was ..."."""


class _Writer:
    """A binary file that counts what it writes and keeps the running CRC-32 of the current blob."""

    def __init__(self, f):
        self.f, self.offset, self.crc = f, 0, 0

    def write(self, data) -> int:
        self.f.write(data)
        self.crc = zlib.crc32(data, self.crc)
        self.offset += len(data)
        return len(data)

    def blob(self, write_contents) -> list[int]:
        """[offset, length, crc32] of what write_contents(self) writes."""
        start, self.crc = self.offset, 0
        write_contents(self)
        return [start, self.offset - start, self.crc]


def write(f, index: CategoryIndex, meta: dict) -> None:
    """Write the index and `meta` (the footer's other fields) to the open binary file f."""
    out = _Writer(f)
    out.write(MAGIC)
    partitions = []
    for c, stored in index.stored_partitions():
        if isinstance(stored, np.ndarray):  # loaded from a snapshot and unchanged since: its bytes as they are
            partitions.append([c, *out.blob(lambda w: w.write(memoryview(stored)))])
        else:
            partitions.append([c, *out.blob(lambda w: faiss.write_index(stored, faiss.PyCallbackIOWriter(w.write)))])
    categories, vectors = index.prototypes()
    prototypes = out.blob(lambda w: w.write(np.ascontiguousarray(vectors, dtype="<f4").tobytes()))
    full = []
    if index.kind.rerank:
        for c, ids in index.members():  # the categories of `partitions`, in their order
            entry = [c]
            out.write(b"\0" * (-out.offset % 64))  # aligned, so that numpy reads the rows in place at full speed
            entry += out.blob(lambda w, ids=ids: w.write(ids.astype("<i8").tobytes()))
            out.write(b"\0" * (-out.offset % 64))
            entry += out.blob(lambda w, ids=ids: _write_rows(w, index, ids))
            full.append(entry)
    footer = json.dumps({**meta, "format": FORMAT, "index_type": index.index_type, "dim": index.dim,
                         "partitions": partitions, "prototypes": [categories.tolist(), *prototypes],
                         "full_vectors": full}).encode()
    out.write(footer)
    out.write(TAIL.pack(len(footer), zlib.crc32(footer)) + END)


def _write_rows(out: _Writer, index: CategoryIndex, ids: np.ndarray) -> None:
    """The full float16 vectors of ids, a chunk at a time: a category's rows are never all in memory at once."""
    for start in range(0, len(ids), ROWS_PER_WRITE):
        out.write(index.store.get(ids[start:start + ROWS_PER_WRITE], np.float16).astype("<f2", copy=False).tobytes())


def read_footer(data: np.ndarray) -> dict:
    """The footer of a snapshot's bytes, checked against its CRC; raises ValueError saying what is wrong."""
    if data.size < len(MAGIC) + TAIL.size + len(END) or bytes(data[:len(MAGIC)]) != MAGIC:
        raise ValueError("not an imsrc snapshot (no header)")
    if bytes(data[-len(END):]) != END:
        raise ValueError("cut short (no end marker)")
    tail_at = data.size - len(END) - TAIL.size
    length, crc = TAIL.unpack(bytes(data[tail_at:tail_at + TAIL.size]))
    if length > tail_at - len(MAGIC):
        raise ValueError(f"a footer of {length} bytes in a file of {data.size}")
    footer = bytes(data[tail_at - length:tail_at])
    if zlib.crc32(footer) != crc:
        raise ValueError("footer checksum mismatch")
    meta = json.loads(footer)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"metadata of an unknown format: {str(meta)[:80]}")
    return meta


def read_meta(path: Path) -> dict | None:
    """The footer of a snapshot file, or None if there is none or it cannot be read."""
    try:
        return read_footer(np.memmap(path, dtype=np.uint8, mode="r"))
    except (OSError, ValueError):  # missing, empty (mmap refuses those), damaged
        return None


def read(path: Path) -> tuple[CategoryIndex, dict]:
    """The index in a snapshot file and its footer, every blob's CRC checked; the index reads the file in place.
    Raises SnapshotError saying what is wrong."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
        meta = read_footer(data)
        blobs = {int(c): _blob(data, meta, offset, length) for c, offset, length, _ in meta["partitions"]}
        proto_categories, *where = meta["prototypes"]
        prototypes = _blob(data, meta, *where[:2]).view("<f4").reshape(len(proto_categories), int(meta["dim"]))
        parts = [blobs[int(c)] for c, *_ in meta["partitions"]] + [prototypes]
        expected = [crc for *_, crc in meta["partitions"]] + [where[2]]
        vectors = {}
        for c, ids_at, ids_length, ids_crc, rows_at, rows_length, rows_crc in meta.get("full_vectors", []):
            ids, rows = _blob(data, meta, ids_at, ids_length), _blob(data, meta, rows_at, rows_length)
            parts += [ids, rows]
            expected += [ids_crc, rows_crc]
            vectors[int(c)] = (ids.view("<i8"), rows.view("<f2"))
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # damage fails in mmap, json or layout
        raise SnapshotError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    with ThreadPoolExecutor(2) as pool:
        if list(pool.map(zlib.crc32, parts)) != expected:
            raise SnapshotError("corrupt (checksum mismatch)")
    for _, rows in vectors.values():  # the checksums read every full vector; a search re-ranks a few hundred
        release_pages(rows)
    try:
        index = CategoryIndex.from_stored(int(meta["dim"]), str(meta["index_type"]), blobs, proto_categories,
                                          prototypes, vectors, folder=Path(path).parent)
    except (ValueError, TypeError) as exc:  # the checksums held, so the writer saved a broken state
        raise SnapshotError(f"corrupt ({type(exc).__name__}: {exc})") from exc
    return index, meta


def _blob(data: np.ndarray, meta: dict, offset: int, length: int) -> np.ndarray:
    end = data.size - len(END) - TAIL.size
    if not (isinstance(offset, int) and isinstance(length, int) and len(MAGIC) <= offset <= offset + length <= end):
        raise ValueError(f"a part at bytes {offset}..{offset}+{length} of a {data.size}-byte file")
    return data[offset:offset + length]


def snapshot_path(snapshot_dir: Path, model_name: str, index_type: str) -> Path:
    """Where the index snapshot of a model and index type lives."""
    return Path(snapshot_dir) / f"{model_name}-{index_type}{SUFFIX}"


def read_snapshot(path: Path, model_name: str, index_type: str, dim: int) -> tuple[CategoryIndex, dict]:
    """The index in a snapshot file and its metadata, checked on their own (the database is not asked): the file
    reads back, its checksums match, its contents agree with its metadata, and it is the model's, index type's
    and dim's asked for. Raises SnapshotError saying what is wrong."""
    meta = read_meta(path)
    expected = {"model": model_name, "index_type": index_type, "dim": dim}
    if meta is not None and (found := {key: meta.get(key) for key in expected}) != expected:
        raise SnapshotError(f"for another index ({found}; expected {expected})")
    index, meta = read(path)
    counts = {str(c): n for c, n in index.category_sizes().items()}
    if (len(index), counts) != (meta.get("vectors"), meta.get("counts")):
        raise SnapshotError(
            f"inconsistent with its metadata (it holds {len(index)} vectors in {len(counts)} categories; its "
            f"metadata says {meta.get('vectors')} vectors in {len(meta.get('counts') or {})})")
    return index, meta
