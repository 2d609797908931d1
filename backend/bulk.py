"""A model's vectors out of PostgreSQL in bulk: one binary COPY, parsed by numpy in batches, no row objects.

Every row of the COPY has the same layout (image id, category id, a pgvector of the model's dimension), so a batch
of rows is one numpy structured array over the bytes PostgreSQL sent: a million 2048-d vectors stream through in
about a minute, where an ORM object per row took nine.
"""
from collections.abc import Callable

import numpy as np
from sqlalchemy.orm import Session

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
HEADER = len(SIGNATURE) + 8  # signature, flags (int32), header extension length (int32; 0 from PostgreSQL)
TRAILER = b"\xff\xff"  # a field count of -1
BATCH_ROWS = 4096

Consumer = Callable[[np.ndarray, np.ndarray, np.ndarray], None]  # (ids (n,), category ids (n,), vectors (n, dim))


def _row_layout(dim: int) -> np.dtype:
    """One COPY row: field count, then each field's length and value, big-endian (pgvector sends its dimension,
    an unused int16 and the floats)."""
    return np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("cat_len", ">i4"), ("cat", ">i4"),
                     ("vec_len", ">i4"), ("vec_dim", ">i2"), ("vec_unused", ">i2"), ("vec", ">f4", (dim,))])


class _RowParser:
    """The file object psycopg2's copy_expert writes to: cuts the stream into whole rows and hands them on in
    batches of BATCH_ROWS."""

    def __init__(self, dim: int, consume: Consumer):
        self.dim, self.consume, self.layout = dim, consume, _row_layout(dim)
        self.pending = bytearray()
        self.header_seen = False
        self.rows = 0

    def write(self, data) -> int:
        self.pending += data
        if not self.header_seen and len(self.pending) >= HEADER:
            if bytes(self.pending[:len(SIGNATURE)]) != SIGNATURE:
                raise ValueError("PostgreSQL did not send binary COPY data")
            del self.pending[:HEADER]
            self.header_seen = True
        if self.header_seen and len(self.pending) >= BATCH_ROWS * self.layout.itemsize:
            self._flush()
        return len(data)

    def _flush(self) -> None:
        whole = len(self.pending) // self.layout.itemsize
        if not whole:
            return
        rows = np.frombuffer(self.pending[:whole * self.layout.itemsize], dtype=self.layout)  # a copy: pending moves on
        del self.pending[:whole * self.layout.itemsize]
        expected = (3, 8, 4, 4 + 4 * self.dim, self.dim)
        found = [rows[key] for key in ("fields", "id_len", "cat_len", "vec_len", "vec_dim")]
        if not all((column == value).all() for column, value in zip(found, expected)):
            raise ValueError(f"a row that is not (bigint, integer, {self.dim}-d vector)")
        self.rows += len(rows)
        self.consume(rows["id"].astype(np.int64), rows["cat"].astype(np.int64), rows["vec"].astype(np.float32))

    def finish(self) -> int:
        if self.pending.endswith(TRAILER):
            del self.pending[-len(TRAILER):]
        self._flush()
        if self.pending or not self.header_seen:
            raise ValueError(f"the COPY stream ended inside a row ({len(self.pending)} bytes left over)")
        return self.rows


def copy_members(session: Session, model_name: str, dim: int, consume: Consumer, image_ids=None,
                 ordered: bool = False) -> int:
    """Hand the (image id, category id, vector) of every image in a category with a vector of the model (or of those
    among `image_ids`) to consume(), in batches; by image id if `ordered`. Runs in the session's transaction, so it
    sees what the session's other reads see. Returns the rows read."""
    cursor = session.connection().connection.driver_connection.cursor()
    where = "e.model_name = %(model)s AND i.category_id IS NOT NULL"
    if image_ids is not None:
        where += " AND e.image_id = ANY(%(ids)s)"
    query = cursor.mogrify(
        f"COPY (SELECT e.image_id, i.category_id, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id "
        f"WHERE {where}{' ORDER BY e.image_id' if ordered else ''}) TO STDOUT (FORMAT binary)",
        {"model": model_name, "ids": [int(i) for i in image_ids] if image_ids is not None else None}).decode()
    parser = _RowParser(dim, consume)
    try:
        cursor.copy_expert(query, parser)
    finally:
        cursor.close()
    return parser.finish()


def fetch_members(session: Session, model_name: str, dim: int, image_ids=None):
    """(ids, category ids, vectors (n, dim) float32) of the images in a category with a vector of the model, by id;
    all of them, or those among `image_ids`."""
    batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    copy_members(session, model_name, dim, lambda *batch: batches.append(batch), image_ids, ordered=True)
    if not batches:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32)
    ids, cats, vectors = (np.concatenate(column) for column in zip(*batches))
    return ids, cats, vectors
