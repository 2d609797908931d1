"""Search at scale: exhaustive FAISS, imsrc's two-stage search per index type, and pgvector, on one PostgreSQL.

Usage: python bench/search.py [--size 1000000] [--dim 2048] [--categories 100] [--overlap 0.1] [--queries 200]
       [--types flatip fp16 ivfflat ivffp16] [--hnsw-size 100000] [--hnsw-minutes 20] [--exact-queries 10]
       [--real] [--fashion COPIES] [--no-baselines] [--fresh] [--json FILE] [--plot FILE]

Datasets, each written through imsrc's schema into a throw-away database of its own on the configured PostgreSQL
(the embedded one, or DATABASE_URL's server), named after its parameters and kept between runs (--fresh drops it):
- synthetic: --size vectors of --dim in --categories categories. A category is a mixture of sub-clusters (styles)
  around its centre, as a real collection's are, so approximate indexes meet neighbourhoods of a realistic kind;
  --overlap is the share of a category's styles that lean from its centre past halfway towards a neighbouring
  category's (images that look like two categories at once, as shirts and T-shirts do: where stage 1 can rank
  the wrong category first). The default, 0.45, is meant to give about the two-stage recall at P=1 that the real
  Fashion-MNIST collection shows. Queries are new draws from the same mixture.
- real (--real): the vectors of the configured database's model (e.g. the demo's Fashion-MNIST), --queries of
  them held out as queries.
- fashion (--fashion COPIES): realistic vectors at scale, made offline: Fashion-MNIST's 60,000 training images in
  COPIES seeded versions each (crops, mirrors, rotations, zoom, colour), embedded by efficientnet_lite0 and cached
  on disk (bench/fashion_vectors.py), categories from the labels; the test images, never in the collection, as
  queries.

Per dataset: the rebuild from PostgreSQL (bulk read) per index type, with its time and memory; the snapshot's
write and load; then per method p50/p95 latency of single queries (as a server makes them) and recall@10 against
exact search: exhaustive FAISS flat, imsrc two-stage at P = 1, 3, 5, 10 per index type (rabitq also over
the lists it probes and its re-rank), the strongest FAISS indexes (bench/ann.py: HNSW32 over efSearch, a global
IVF over nprobe, RaBitQ codes with an exact re-rank), pgvector exact (`<=>`, a few queries: each reads every
vector), and pgvector HNSW on a halfvec expression, built on the first --hnsw-size
vectors within --hnsw-minutes and compared with imsrc at that same size; and adding and deleting one image at a
time in the full index; and what PostgreSQL stores per vector, as vector and (on a sample) as halfvec, with the
recall@10 that halfvec's rounding keeps. Prints a table per dataset and the p50 each method family needs for
recall@10 0.95 and 0.99; --json writes every row, and the curves go to a PNG beside it (matplotlib).
"""
import argparse
import ctypes
import gc
import hashlib
import io
import itertools
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.embedding.models import model_dim  # noqa: E402
from backend.embedding.vectors import l2_normalize
from backend.search.category_index import CategoryIndex  # noqa: E402
from backend.service.index_manager import IndexManager  # noqa: E402
from backend.service.model_choice import choose_model  # noqa: E402
from backend.storage import images as image_store  # noqa: E402
from backend.storage.engine import database_url
from backend.storage.members import copy_members, fetch_members  # noqa: E402
from backend.storage.migrations import migrated_engine
from backend.storage.sessions import session_factory  # noqa: E402
from bench import fashion_vectors  # noqa: E402
from bench.ann import (K, at_recall, faiss_baselines, plot, print_at_recall, recall, row,  # noqa: E402
                       timed_searches)
from bench.common import drop_database, machine, percentile, rss_mib, write_json  # noqa: E402

MODEL = "bench"
CHUNK = 8192
SUBCLUSTERS = 50  # styles per category
# Norms of the parts of a synthetic vector: what all share, its category's centre, its style's offset, its own noise.
SHARED, CENTRE, STYLE, NOISE = 1.0, 1.0, 0.8, 0.6
NEIGHBOURS = 3  # an overlapping style leans towards one of the next 3 categories: confusions cluster, as in real data
LEAN = (0.5, 0.8)  # ... this far of the way (uniform): its images look more like the neighbour than like their own
PROBES = (1, 3, 5, 10)
PROBE_LISTS, RERANKS = (16, 32, 64, 128), (4, 8, 16, 32)  # the compressed type's search settings swept
FILTER_EVERY = 100  # the filtered searches keep images whose id is a multiple of this: 1%, in every category
EF_SEARCH = (40, 100, 200, 400, 800)
WARM_UP = 50  # untimed queries before each pgvector setting: its index pages come into memory
EXACT_TYPE = "flatip"  # measured first, its exhaustive search is the ground truth (else: brute force)
HALFVEC_SAMPLE = 100_000  # vectors copied to measure what PostgreSQL stores per vector as vector and as halfvec


class Synthetic:
    """The synthetic collection: deterministic per chunk, so any prefix can be regenerated."""

    def __init__(self, size: int, dim: int, categories: int, overlap: float, seed: int = 0):
        self.size, self.dim, self.categories, self.seed = size, dim, categories, seed
        rng = np.random.default_rng(seed)
        scale = 1 / math.sqrt(dim)
        shared = rng.standard_normal(dim) * scale * SHARED
        centres = rng.standard_normal((categories, dim)) * scale * CENTRE
        # A style that overlaps leans from its category's centre towards a neighbouring category's, past halfway.
        neighbour = (np.arange(categories)[:, None] + rng.integers(1, NEIGHBOURS + 1, (categories, SUBCLUSTERS))) \
            % categories
        lean = rng.uniform(*LEAN, (categories, SUBCLUSTERS))
        halfway = np.where(rng.random((categories, SUBCLUSTERS)) < overlap, lean, 0.0)[..., None]
        self.styles = (shared + (1 - halfway) * centres[:, None, :] + halfway * centres[neighbour]
                       + rng.standard_normal((categories, SUBCLUSTERS, dim)) * scale * STYLE).astype(np.float32)

    def draw(self, stream: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(categories (n,), unit vectors (n, dim)) of draw stream `stream`."""
        rng = np.random.default_rng([self.seed, stream])
        cats, styles = rng.integers(0, self.categories, n), rng.integers(0, SUBCLUSTERS, n)
        noise = rng.standard_normal((n, self.dim), dtype=np.float32) * np.float32(NOISE / math.sqrt(self.dim))
        return cats, l2_normalize(self.styles[cats, styles] + noise)

    def chunks(self):
        """(ids, categories, vectors) of the collection, CHUNK at a time; ids from 1."""
        for i, start in enumerate(range(0, self.size, CHUNK)):
            n = min(CHUNK, self.size - start)
            cats, vectors = self.draw(i, n)
            yield np.arange(start + 1, start + n + 1, dtype=np.int64), cats, vectors

    def queries(self, n: int) -> np.ndarray:
        return self.draw(-1 % 2**32, n)[1]


# -- loading a dataset into PostgreSQL -------------------------------------------------------------------
def _vector_rows(ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Binary COPY rows (image_id, model_name, dim, vector) for the embeddings table."""
    n, dim = vectors.shape
    name = MODEL.encode()
    layout = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i8"), ("name_len", ">i4"),
                       ("name", f"S{len(name)}"), ("dim_len", ">i4"), ("dim", ">i4"), ("vec_len", ">i4"),
                       ("vec_dim", ">i2"), ("vec_unused", ">i2"), ("vec", ">f4", (dim,))])
    rows = np.zeros(n, layout)
    rows["fields"], rows["id_len"], rows["id"], rows["name_len"], rows["name"] = 4, 8, ids, len(name), name
    rows["dim_len"], rows["dim"], rows["vec_len"], rows["vec_dim"], rows["vec"] = 4, dim, 4 + 4 * dim, dim, vectors
    return rows.tobytes()


def load_dataset(engine: sa.Engine, chunks, dim: int, categories: int, total: int) -> None:
    """Write categories, images (one byte each) and vectors through COPY, then mark the database complete."""
    sessions = sessionmaker(engine)
    with sessions() as s, s.begin():
        image_store.ensure_model(s, MODEL, dim)
        image_store.category_ids(s, {f"c{c:03d}" for c in range(categories)})
        category_id = dict(s.execute(sa.text("SELECT name, id FROM categories")).all())
    raw = engine.raw_connection()
    started, done = time.perf_counter(), 0
    try:
        cursor = raw.cursor()
        for ids, cats, vectors in chunks:
            # The bytes live in the shared public.image_blobs (migration 0009), the rows in images.
            blobs = "".join(f"{i:064x}\t\\\\x00\n" for i in ids.tolist())
            cursor.copy_expert("COPY public.image_blobs (sha256, data) FROM STDIN", io.StringIO(blobs))
            text = "".join(f"{i}\t{i:064x}\t1\t1\tSYN\t{category_id[f'c{c:03d}']}\n"
                           for i, c in zip(ids.tolist(), cats.tolist()))
            cursor.copy_expert("COPY images (id, sha256, width, height, format, category_id) FROM STDIN",
                               io.StringIO(text))
            header = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
            cursor.copy_expert("COPY embeddings (image_id, model_name, dim, vector) FROM STDIN (FORMAT binary)",
                               io.BytesIO(header + _vector_rows(ids, vectors) + b"\xff\xff"))
            raw.commit()
            done += len(ids)
            print(f"\r  loading: {done:,}/{total:,} vectors ({done / (time.perf_counter() - started):,.0f}/s)",
                  end="", flush=True)
        cursor.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), (SELECT max(id) FROM images))")
        cursor.execute("CREATE TABLE bench_done (finished timestamptz DEFAULT now())")
        cursor.execute("INSERT INTO bench_done DEFAULT VALUES")
        raw.commit()
    finally:
        raw.close()
    print(f"\r  loaded {done:,} vectors in {time.perf_counter() - started:.0f} s" + " " * 20)


def bench_engine(name: str, fresh: bool) -> tuple[sa.Engine, bool]:
    """(engine on the bench database `name` beside imsrc's own, whether it already holds its complete dataset);
    a half-loaded one, left by an interrupted run, is dropped and made again."""
    if fresh:
        drop_database(name)
    engine = migrated_engine(database_url(), name)
    with engine.connect() as conn:
        complete = conn.execute(sa.text("SELECT to_regclass('bench_done') IS NOT NULL")).scalar()
        started = conn.execute(sa.text("SELECT EXISTS (SELECT 1 FROM images)")).scalar()
    if started and not complete:
        engine.dispose()
        drop_database(name)
        engine = migrated_engine(database_url(), name)
    return engine, complete


# -- measuring -------------------------------------------------------------------------------------------
def two_stage_rows(dataset: str, index: CategoryIndex, queries, truth, label: str, probes=PROBES, where: str = ""):
    """imsrc's two-stage search at each P; a compressed type also over its lists probed and its re-rank."""
    rows, defaults = [], (index.probe_lists, index.rerank)
    for lists, rerank in itertools.product(PROBE_LISTS, RERANKS) if index.kind.rerank else [defaults]:
        index.probe_lists, index.rerank = lists, rerank
        setting = f" lists={lists} x{rerank}" if index.kind.rerank else ""
        for p in probes:
            found, ms = timed_searches(lambda q: index.search(q[None], K, top_categories=p)[0].ids, queries)
            rows.append(row(dataset, f"imsrc {label} P={p}{setting}{where}", len(index), ms, found, truth,
                            family=f"imsrc {label}{where}"))
    index.probe_lists, index.rerank = defaults
    return rows


def brute_force(sessions, dim: int, queries: np.ndarray, among: np.ndarray | None = None) -> list[np.ndarray]:
    """Each query's exact top K ids (of `among`, if given) over the float32 vectors in PostgreSQL, read in batches
    and merged into a running top K, so that no copy of the collection is held; ties by the lower id."""
    best_ids = np.zeros((len(queries), 0), np.int64)
    best_scores = np.zeros((len(queries), 0), np.float32)

    def merge(ids, _categories, vectors):
        nonlocal best_ids, best_scores
        scores = np.concatenate([best_scores, queries @ vectors.T], axis=1)
        ids = np.concatenate([best_ids, np.broadcast_to(ids, (len(queries), len(ids)))], axis=1)
        top = np.lexsort((ids, -scores), axis=1)[:, :K]
        best_ids, best_scores = np.take_along_axis(ids, top, axis=1), np.take_along_axis(scores, top, axis=1)

    with sessions() as s:
        copy_members(s, MODEL, dim, merge, among)
    return list(best_ids)


def filtered_ids(ids: np.ndarray) -> np.ndarray:
    """The images a filtered search keeps (as a metadata filter matching 1% of the collection would)."""
    return np.sort(ids[ids % FILTER_EVERY == 0])


def filtered_row(dataset: str, index: CategoryIndex, queries, truth, label: str, where: str = "") -> dict:
    """Exact top-k among filtered_ids, as imsrc's pre-filter searches them (every category holding a match)."""
    among = filtered_ids(index.ids())
    found, ms = timed_searches(lambda q: index.search(q[None], K, use_prototypes=False, among=among)[0].ids, queries)
    return row(dataset, f"imsrc {label} filtered 1%{where}", len(index), ms, found, truth,
               family=f"filtered 1%: imsrc {label}{where}")


def single_changes(index: CategoryIndex, vectors: np.ndarray, first_id: int) -> dict:
    """Adding then deleting images one at a time: p50/p95 ms of each."""
    rng = np.random.default_rng(7)
    cats = rng.choice(sorted(index.category_sizes()), len(vectors))
    add_ms, delete_ms = [], []
    for i, (vector, cat) in enumerate(zip(vectors, cats)):
        started = time.perf_counter()
        index.add([first_id + i], vector[None], [cat])
        add_ms.append((time.perf_counter() - started) * 1000)
    for i in range(len(vectors)):
        started = time.perf_counter()
        index.remove([first_id + i])
        delete_ms.append((time.perf_counter() - started) * 1000)
    return {"add_p50_ms": round(percentile(add_ms, 0.5), 3), "add_p95_ms": round(percentile(add_ms, 0.95), 3),
            "delete_p50_ms": round(percentile(delete_ms, 0.5), 3),
            "delete_p95_ms": round(percentile(delete_ms, 0.95), 3)}


def stored_bytes(index: CategoryIndex) -> int:
    """Bytes of the representation itself: one code per vector, at the index type's bytes per dimension (a bit for
    RaBitQ)."""
    per_dim = 1 / 8 if index.kind.rerank else 2 if "fp16" in index.index_type else 4
    return int(len(index) * index.dim * per_dim)


def run_dataset(dataset: str, engine: sa.Engine, dim: int, queries: np.ndarray, args) -> dict:
    sessions = sessionmaker(engine, expire_on_commit=False)
    with sessions() as s:
        size = s.scalar(sa.text("SELECT count(*) FROM embeddings"))
    snapshots = Path(tempfile.mkdtemp(prefix="imsrc-bench-"))
    report = {"dataset": dataset, "vectors": size, "dim": dim, "builds": [], "rows": []}
    print(f"\n{dataset}: {size:,} {dim}-d vectors, {len(queries)} queries")
    print(f"  {'method':<40}{'p50 ms':>10}{'p95 ms':>10}{'recall':>9}")
    truth = None
    try:
        for index_type in args.types:
            gc.collect()
            before, anon_before = rss_mib(), rss_mib(part="RssAnon")
            manager = IndexManager(sessions, MODEL, dim, index_type, snapshots)
            started = time.perf_counter()
            # The prototypes come out the same for every index type: recomputed in PostgreSQL for the first only.
            manager.rebuild(save=False, prototypes=index_type == args.types[0])
            build = {"index_type": index_type, "rebuild_s": round(time.perf_counter() - started, 1),
                     "prototypes_recomputed": index_type == args.types[0],
                     "index_mib": round(manager.index.nbytes() / 2**20, 1),
                     "stored_mib": round(stored_bytes(manager.index) / 2**20, 1),
                     "rss_growth_mib": round(rss_mib() - before, 1),
                     "anon_growth_mib": round(rss_mib(part="RssAnon") - anon_before, 1)}
            if manager.index.store is not None:  # the full vectors a compressed type re-ranks from, on disk
                build["disk_mib"] = round(manager.index.store.disk_bytes() / 2**20, 1)
                build["ram_bytes_per_vector"] = round(manager.index.nbytes() / len(manager.index), 1)
            build["rss_growth_per_index_byte"] = round(build["rss_growth_mib"] / build["index_mib"], 3)
            index = manager.index
            if truth is None and index_type == EXACT_TYPE:  # the ground truth, and the exhaustive baseline
                truth, ms = timed_searches(
                    lambda q, index=index: index.search(q[None], K, use_prototypes=False)[0].ids, queries)
                report["rows"].append(row(dataset, "FAISS flat, exhaustive", size, ms, truth, truth))
                among = filtered_ids(index.ids())
                filter_truth = [index.search(q[None], K, use_prototypes=False, among=among)[0].ids for q in queries]
            elif truth is None:  # an approximate type's "every category" is no ground truth: brute force is
                truth = brute_force(sessions, dim, queries)
                filter_truth = brute_force(sessions, dim, queries, filtered_ids(index.ids()))
            report["rows"] += two_stage_rows(dataset, index, queries, truth, index_type)
            report["rows"].append(filtered_row(dataset, index, queries, filter_truth, index_type))
            build.update(single_changes(index, queries[:100], first_id=10**12))
            compressed = index.kind.rerank
            del index  # so that only one copy of the vectors is in memory at a time
            if index_type == args.types[0] or compressed:  # a compressed type's snapshot also holds its full vectors
                build.update(snapshot_times(manager, sessions, dim, index_type, snapshots))
            report["builds"].append(build)
            print("  build " + json.dumps(build))
            del manager
        if args.baselines:
            gc.collect()
            with sessions() as s:
                ids, _, vectors = fetch_members(s, MODEL, dim)
            rows, builds = faiss_baselines(dataset, vectors, ids, queries, truth, rss_mib)
            report["rows"] += rows
            report["builds"] += builds
            del vectors
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # the memory our indexes held goes to PostgreSQL's page cache
        report["rows"] += pgvector_exact(dataset, engine, queries[:args.exact_queries], truth, size)
        report["rows"] += pgvector_exact(dataset, engine, queries[:args.exact_queries], filter_truth, size,
                                         filtered=True)
        report["rows"] += pgvector_hnsw(dataset, engine, sessions, dim, queries, truth, filter_truth, size, args)
        report["storage"] = postgres_storage(engine, sessions, dim, queries, size)
    finally:
        shutil.rmtree(snapshots, ignore_errors=True)
    return report


def snapshot_times(manager: IndexManager, sessions, dim: int, index_type: str, folder: Path) -> dict:
    """Write the snapshot, then load it in a fresh manager (the rebuilt index let go first)."""
    started = time.perf_counter()
    manager.save_snapshot()
    written = time.perf_counter() - started
    size = manager.snapshot_path.stat().st_size
    manager.index = None
    gc.collect()
    before, anon_before = rss_mib(), rss_mib(part="RssAnon")
    loaded = IndexManager(sessions, MODEL, dim, index_type, folder)
    started = time.perf_counter()
    source = loaded.load_or_build()
    seconds = time.perf_counter() - started
    growth, anon_growth = rss_mib() - before, rss_mib(part="RssAnon") - anon_before
    assert source == "snapshot", source
    loaded.snapshot_path.unlink()  # disk: the next index type's tables and pgvector's index need the room
    return {"snapshot_write_s": round(written, 1), "snapshot_mib": round(size / 2**20, 1),
            "snapshot_load_s": round(seconds, 2), "snapshot_load_rss_growth_mib": round(growth, 1),
            "snapshot_load_anon_growth_mib": round(anon_growth, 1)}  # the rest: the file's pages, checksummed


def _vector_text(v: np.ndarray) -> str:
    return "[" + ",".join(f"{x:.7g}" for x in v.tolist()) + "]"


def pgvector_exact(dataset: str, engine: sa.Engine, queries: np.ndarray, truth, size: int,
                   filtered: bool = False) -> list[dict]:
    where = f"WHERE image_id % {FILTER_EVERY} = 0 " if filtered else ""
    with engine.connect() as conn:
        found, ms = timed_searches(lambda q: conn.execute(sa.text(
            f"SELECT image_id FROM embeddings {where}ORDER BY vector <=> CAST(:q AS vector) LIMIT :k"),
            {"q": _vector_text(q), "k": K}).scalars().all(), queries)
    method = "pgvector exact <=>" + (" filtered 1%" if filtered else "")
    return [row(dataset, method, size, ms, found, truth[:len(queries)],
                family=f"filtered 1%: {method}" if filtered else method)]


def pgvector_hnsw(dataset: str, engine: sa.Engine, sessions, dim: int, queries: np.ndarray, truth, filter_truth,
                  size: int, args) -> list[dict]:
    """HNSW on a halfvec expression over the first --hnsw-size vectors (all of them: the embeddings table itself),
    unfiltered and filtered (pgvector's iterative scan), and, on a part, imsrc on those same vectors."""
    rows = []
    if args.hnsw_size >= size:
        n, table = size, "embeddings"
    else:
        with sessions() as s:
            ids, cats, vectors = fetch_members(s, MODEL, dim, range(1, args.hnsw_size + 1))
        n, table = len(ids), f"hnsw_{len(ids)}"
        truth = [ids[np.argsort(-(vectors @ q), kind="stable")[:K]] for q in queries]
        kept = np.isin(ids, filtered_ids(ids))
        filter_truth = [ids[kept][np.argsort(-(vectors[kept] @ q), kind="stable")[:K]] for q in queries]
        for index_type in args.types:
            index = CategoryIndex(dim, index_type)
            index.add(ids, vectors, cats, optimise=False)
            index.optimise()
            uniq = np.unique(cats)
            index.set_prototypes(uniq, l2_normalize(np.stack([vectors[cats == c].mean(0) for c in uniq])))
            rows += two_stage_rows(dataset, index, queries, truth, index_type, probes=(3,), where=f" @{n:,}")
            rows.append(filtered_row(dataset, index, queries, filter_truth, index_type, where=f" @{n:,}"))
        del index, vectors
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        build_s = None
        if conn.execute(sa.text(f"SELECT to_regclass('{table}_hnsw')")).scalar() is None:
            if table != "embeddings":
                conn.execute(sa.text(f"DROP TABLE IF EXISTS {table}"))
                conn.execute(sa.text(f"CREATE TABLE {table} AS SELECT image_id, vector FROM embeddings "
                                     f"WHERE image_id <= {n}"))
            conn.execute(sa.text("SET maintenance_work_mem = '8GB'"))
            conn.execute(sa.text(f"SET statement_timeout = '{args.hnsw_minutes}min'"))
            started = time.perf_counter()
            try:
                conn.execute(sa.text(f"CREATE INDEX {table}_hnsw ON {table} USING hnsw "
                                     f"((vector::halfvec({dim})) halfvec_cosine_ops)"))
            except sa.exc.OperationalError:
                print(f"  pgvector HNSW: not built on {n:,} vectors within {args.hnsw_minutes} min")
                return rows + [{"dataset": dataset, "method": f"pgvector HNSW halfvec @{n:,}", "vectors": n,
                                "built": False, "build_limit_min": args.hnsw_minutes}]
            build_s = round(time.perf_counter() - started, 1)
            conn.execute(sa.text("SET statement_timeout = 0"))
        conn.execute(sa.text("SET enable_seqscan = off"))
        # Filtered: pgvector 0.8's iterative scan walks on until enough rows pass the filter (relaxed order: the
        # results re-sorted by the query, as FAISS's are).
        for where, expected, label in (("", truth, ""), (f"WHERE image_id % {FILTER_EVERY} = 0 ", filter_truth,
                                                         "filtered 1%: ")):
            conn.execute(sa.text(f"SET hnsw.iterative_scan = {'relaxed_order' if where else 'off'}"))
            for ef in EF_SEARCH:
                conn.execute(sa.text(f"SET hnsw.ef_search = {ef}"))

                def search_one(q, where=where):
                    return conn.execute(sa.text(
                        f"SELECT image_id FROM {table} {where}ORDER BY vector::halfvec({dim}) <=> "
                        f"CAST(:q AS halfvec({dim})) LIMIT :k"), {"q": _vector_text(q), "k": K}).scalars().all()

                timed_searches(search_one, queries[:WARM_UP])  # as imsrc's index, pgvector's starts warm
                found, ms = timed_searches(search_one, queries)
                method = f"pgvector HNSW halfvec{' iterative' if where else ''}"
                rows.append(row(dataset, f"{label}{method} ef={ef} @{n:,}", n, ms, found, expected,
                                family=f"{label}{method} @{n:,}", build_s=build_s))
    return rows



def postgres_storage(engine: sa.Engine, sessions, dim: int, queries: np.ndarray, size: int) -> dict:
    """What PostgreSQL holds for the vectors (the database, the embeddings table, bytes per vector), and whether
    halfvec would halve it at no loss: the same sample of vectors copied as vector and as halfvec, and recall@10 of
    exact search over that sample's float16-rounded vectors (what a halfvec column gives back) against float32."""
    n = min(size, HALFVEC_SAMPLE)
    with sessions() as s:
        ids, _, vectors = fetch_members(s, MODEL, dim, range(1, n + 1))
    truth = [ids[np.argsort(-(vectors @ q), kind="stable")[:K]] for q in queries]
    rounded = vectors.astype(np.float16).astype(np.float32)  # as pgvector rounds both, queries cast to halfvec too
    found = [ids[np.argsort(-(rounded @ q.astype(np.float16).astype(np.float32)), kind="stable")[:K]]
             for q in queries]
    report = {"sample": len(ids), "halfvec_recall_at_10": round(recall(found, truth), 4)}
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        report["database_mib"] = round(conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
                                       / 2**20, 1)
        table = conn.execute(sa.text("SELECT pg_table_size('embeddings')")).scalar()  # rows and TOAST, no indexes
        report["embeddings_table_bytes_per_vector"] = round(table / size, 1)
        for kind in ("vector", "halfvec"):
            conn.execute(sa.text(f"DROP TABLE IF EXISTS sample_{kind}"))
            conn.execute(sa.text(f"CREATE TABLE sample_{kind} AS SELECT image_id, vector::{kind}({dim}) AS vector "
                                 f"FROM embeddings WHERE image_id <= {n}"))
            conn.execute(sa.text(f"VACUUM sample_{kind}"))  # gives back the pages a bulk insert extends by ahead
            total, rows = conn.execute(sa.text(f"SELECT pg_total_relation_size('sample_{kind}'), count(*) "
                                               f"FROM sample_{kind}")).one()
            report[f"{kind}_bytes_per_vector"] = round(total / rows, 1)
            conn.execute(sa.text(f"DROP TABLE sample_{kind}"))
    report["halfvec_share"] = round(report["halfvec_bytes_per_vector"] / report["vector_bytes_per_vector"], 3)
    print("  postgresql " + json.dumps(report))
    return report

# -- datasets --------------------------------------------------------------------------------------------
def synthetic(args) -> dict:
    data = Synthetic(args.size, args.dim, args.categories, args.overlap, args.seed)
    name = f"imsrc_bench_{args.size}_{args.dim}_{args.categories}_{args.overlap}_{args.seed}".replace(".", "p")
    engine, complete = bench_engine(name, args.fresh)
    if not complete:
        load_dataset(engine, data.chunks(), args.dim, args.categories, args.size)
    try:
        return run_dataset("synthetic", engine, args.dim, data.queries(args.queries), args)
    finally:
        engine.dispose()


def real(args) -> dict:
    """The configured database's model's vectors, --queries held out."""
    choice = choose_model(session_factory(), quiet=True)
    dim = model_dim(choice.name)
    with session_factory()() as s:
        ids, cats, vectors = fetch_members(s, choice.name, dim)
    if len(ids) <= args.queries:
        raise SystemExit(f"--real: the database has {len(ids)} {choice.name} vectors; populate it first")
    held = np.zeros(len(ids), bool)
    held[np.random.default_rng(args.seed).choice(len(ids), args.queries, replace=False)] = True
    digest = hashlib.md5(ids[~held].tobytes()).hexdigest()[:8]
    name = f"imsrc_bench_real_{choice.name}_{digest}"
    engine, complete = bench_engine(name, args.fresh)
    keep = ~held
    if not complete:
        order = np.argsort(cats[keep], kind="stable")  # any order; ids from 1 as in the synthetic set
        kept_cats, kept = cats[keep][order], vectors[keep][order]
        new_ids = np.arange(1, len(kept) + 1, dtype=np.int64)
        rng = np.random.default_rng(args.seed)
        shuffle = rng.permutation(len(kept))  # so the first --hnsw-size ids are a sample of every category
        chunks = ((new_ids[i:i + CHUNK], kept_cats[shuffle][i:i + CHUNK], kept[shuffle][i:i + CHUNK])
                  for i in range(0, len(kept), CHUNK))
        load_dataset(engine, chunks, dim, int(cats.max()) + 1, len(kept))
    try:
        return run_dataset(f"real ({choice.name})", engine, dim, vectors[held], args)
    finally:
        engine.dispose()


def fashion(args) -> dict:
    """Fashion-MNIST's training images in --fashion versions each, embedded (bench/fashion_vectors.py, cached),
    categories from the labels; --queries of the test images (held out: never in the collection) as queries."""
    folder = fashion_vectors.build(args.fashion, args.fashion_model, args.seed, args.fashion_cache,
                                   args.fashion_limit)
    chunks, labels, queries, _ = fashion_vectors.load(folder)
    dim, total = chunks[0].shape[1], int(sum(len(c) for c in chunks))
    engine, complete = bench_engine(f"imsrc_bench_{folder.name}".replace("-", "_").lower(), args.fresh)
    if not complete:
        def rows():
            start = 0
            for vectors in chunks:
                n = len(vectors)
                yield (np.arange(start + 1, start + n + 1, dtype=np.int64), labels[start:start + n],
                       np.asarray(vectors, dtype=np.float32))
                start += n
        load_dataset(engine, rows(), dim, int(labels.max()) + 1, total)
    chosen = np.random.default_rng(args.seed).choice(len(queries), min(args.queries, len(queries)), replace=False)
    try:
        return run_dataset(f"fashion x{args.fashion}", engine, dim, queries[np.sort(chosen)], args)
    finally:
        engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--categories", type=int, default=100)
    parser.add_argument("--overlap", type=float, default=0.45,
                        help="share of a category's styles leaning towards a neighbouring category")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", nargs="+", default=["flatip", "fp16", "ivfflat", "ivffp16"])
    parser.add_argument("--hnsw-size", type=int, default=100_000, help="vectors pgvector's HNSW is built on")
    parser.add_argument("--hnsw-minutes", type=float, default=20)
    parser.add_argument("--exact-queries", type=int, default=10, help="pgvector exact queries (each reads all)")
    parser.add_argument("--real", action="store_true", help="also the configured database's collection")
    parser.add_argument("--fashion", type=int, default=0, metavar="COPIES",
                        help="also Fashion-MNIST's 60,000 training images in COPIES versions each (17: 1,020,000)")
    parser.add_argument("--fashion-model", default="efficientnet_lite0")
    parser.add_argument("--fashion-limit", type=int, default=None, help="only the first N training images")
    parser.add_argument("--fashion-cache", type=Path, default=fashion_vectors.DEFAULT_CACHE)
    parser.add_argument("--no-baselines", dest="baselines", action="store_false",
                        help="leave out the FAISS baselines (HNSW, global IVF, RaBitQ with re-rank)")
    parser.add_argument("--plot", type=Path, default=None, help="recall/latency curves (PNG); default: beside --json")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh", action="store_true", help="drop and reload the bench databases")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    report = {"machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "datasets": []}
    print(f"{report['machine']['cpu']} ({', '.join(report['machine']['flags'])}), {report['machine']['cores']} cores")
    if args.real:
        report["datasets"].append(real(args))
    if args.fashion:
        report["datasets"].append(fashion(args))
    if not args.no_synthetic:
        report["datasets"].append(synthetic(args))
    rows = [r for d in report["datasets"] for r in d["rows"]]
    report["at_recall"] = at_recall(rows)
    print_at_recall(report["at_recall"])
    if args.plot or args.json:
        plot(rows, args.plot or args.json.with_suffix(".png"))
    write_json(args.json, report)


if __name__ == "__main__":
    main()
