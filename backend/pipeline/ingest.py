"""Ingestion: read, hash, de-duplicate, decode, embed in batches and store each batch in one transaction."""
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from sqlalchemy.orm import Session
from tqdm import tqdm

from backend.embedding.decode import decode, sha256
from backend.embedding.models import Embedder
from backend.errors import InvalidImage
from backend.pipeline.datasets import Item
from backend.storage import images as image_store
from backend.storage.retry import run_transaction

PREPARE_THREADS = 2  # reading and decoding are a fraction of the model's time: two keep ahead of it
LOOKAHEAD = 2  # batches prepared ahead of the model: bounds the memory held by decoded images


@dataclass
class IngestReport:
    """What an ingestion run did."""

    added: int = 0  # new images stored with their vectors
    embedded_existing: int = 0  # images already stored that got a vector for this model
    duplicates: int = 0  # already stored with a vector for this model (or repeated within the run)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    seconds: float = 0.0
    image_ids: list[int] = field(default_factory=list)  # ids of images added or embedded

    @property
    def done(self) -> int:
        """Images this run embedded: added, or already stored without this model's vector."""
        return self.added + self.embedded_existing

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """A few lines for a person: what was added, what was already there, what failed; a rate only for work done."""
        parts = [f"added {self.added}"]
        if self.embedded_existing:
            parts.append(f"embedded {self.embedded_existing} stored without a vector for this model")
        parts += [f"{self.duplicates} already stored", f"failed {len(self.failed)}"]
        rate = f" ({self.images_per_second:.1f} images/s)" if self.done else ""
        lines = [", ".join(parts) + f" in {self.seconds:.1f} s{rate}"]
        if not self.done and self.duplicates and not self.failed:
            lines.append(f"  nothing new: all {self.duplicates} were already stored with their vectors")
        lines += [f"  failed: {name}: {reason}" for name, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failures")
        return "\n".join(lines)


def ingest(session_factory: Callable[[], Session], items: Iterable[Item], embedder: Embedder,
           batch_size: int = 64, progress: bool = True, total: int | None = None,
           strict: bool = False) -> IngestReport:
    """Store and embed items batch by batch; re-running adds nothing twice, and a stopped run resumes cleanly.
    An item that cannot be read or decoded is reported and skipped, or with `strict` raises its InvalidImage.

    A pipeline, so that the model never waits: PREPARE_THREADS threads read, hash, look up and decode the next
    LOOKAHEAD batches while this thread runs the model on the current one, and one writer thread stores the
    embedded ones, _GroupWriter.GROUP_IMAGES or more to a transaction. A derived model's images are stored with its
    base model's vectors, from which the store derives its own (backend.embedding.projection)."""
    embedder = embedder.source
    report = IngestReport()
    started = time.perf_counter()
    items = list(items)
    seen: set[str] = set()  # digests taken by earlier batches
    batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    with tqdm(total=total or len(items), unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar, \
            ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="ingest-prepare") as preparing, \
            ThreadPoolExecutor(1, thread_name_prefix="ingest-write") as writing:
        prepared = deque(preparing.submit(prepare_batch, session_factory, b, embedder, strict) for b in batches[:LOOKAHEAD])
        writer = _GroupWriter(writing, session_factory, embedder.name, report)
        try:
            for n, batch in enumerate(batches):
                ready = _claim(prepared.popleft().result(), seen)
                if n + LOOKAHEAD < len(batches):
                    prepared.append(preparing.submit(prepare_batch, session_factory, batches[n + LOOKAHEAD], embedder,
                                                     strict))
                writer.add(ready, embedder.embed_prepared(ready.tensors) if ready.to_embed else None)
                report.seconds = time.perf_counter() - started
                bar.set_postfix(added=report.added, dup=report.duplicates, failed=len(report.failed), refresh=False)
                bar.update(len(batch))
        except BaseException as failure:  # what was embedded is stored, also when a later batch fails or the run stops
            try:
                writer.flush()
            except BaseException as also:  # the run's own error stays the one raised
                failure.add_note(f"and storing an earlier batch failed: {also!r}")
            raise
        writer.flush()
    report.seconds = time.perf_counter() - started
    return report


class _GroupWriter:
    """Stores embedded batches on the writer thread in order, GROUP_IMAGES or more in one transaction (group commit:
    a transaction's dozen statements and its commit cost as much for 16 images as for 256, and at 600 images/s they
    cost more CPU than the model's own work), the last ones when flushed."""

    GROUP_IMAGES = 256  # embedded images stored together at least
    MAX_WAITING = 2 * GROUP_IMAGES  # bounds what a stopped run has embedded but not stored

    def __init__(self, pool: ThreadPoolExecutor, session_factory, model_name: str, report: IngestReport):
        self.pool, self.session_factory, self.model_name, self.report = pool, session_factory, model_name, report
        self.waiting: list[tuple[Prepared, object]] = []
        self.waiting_images, self.flushing = 0, False
        self.running, self.error = False, None
        self.changed = threading.Condition()

    def add(self, ready: "Prepared", vectors) -> None:
        """Queue a batch to store; waits while MAX_WAITING images wait, raises what an earlier write raised."""
        with self.changed:
            self.changed.wait_for(lambda: self.error or self.waiting_images < self.MAX_WAITING)
            self._raise()
            self.waiting.append((ready, vectors))
            self.waiting_images += len(ready.to_embed)
            self._start()

    def flush(self) -> None:
        """Store everything queued and wait until it is stored; raises what a write raised."""
        with self.changed:
            self.flushing = True
            self._start()
            self.changed.wait_for(lambda: not self.running)
            self._raise()

    def _start(self) -> None:
        if not self.running and self.error is None and self._due():
            self.running = True
            self.pool.submit(self._drain)

    def _due(self) -> bool:
        return bool(self.waiting) and (self.flushing or self.waiting_images >= self.GROUP_IMAGES)

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _drain(self) -> None:
        while True:
            with self.changed:
                if self.error is not None or not self._due():
                    self.running = False
                    self.changed.notify_all()
                    return
                group, self.waiting, self.waiting_images = self.waiting, [], 0
                self.changed.notify_all()
            try:
                store_batch(self.session_factory, *_joined(group), self.model_name, self.report)
            except BaseException as error:  # handed to the caller's next add() or flush()
                with self.changed:
                    self.error, self.running = error, False
                    self.changed.notify_all()
                return


@dataclass
class Prepared:
    """One batch, read, de-duplicated and decoded: what is left to embed and store."""

    to_embed: list[str] = field(default_factory=list)  # sha256 of each image to embed, in tensor order
    tensors: object = None  # the model's input for them
    new_images: list[image_store.NewImage] = field(default_factory=list)
    existing_ids: dict[str, int] = field(default_factory=dict)  # stored images that lack this model's vector
    duplicates: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def prepare_batch(session_factory, batch: list[Item], embedder: Embedder, strict: bool = False) -> Prepared:
    """Read, hash and decode a batch, leaving out what it repeats and what is already stored with a vector of the
    embedder's model; the images left become the model's input (embedder.prepare). What cannot be read or
    decoded is listed in `failed` (with `strict`, its InvalidImage is raised). Thread- and process-safe."""
    out = Prepared()
    seen: set[str] = set()  # within this batch; across batches, _claim decides in batch order
    read: list[tuple[Item, bytes, str]] = []
    for item in batch:
        try:
            data = item.read()
        except OSError as exc:
            if strict:
                raise InvalidImage(f"cannot read: {exc.strerror or exc}") from None
            out.failed.append((item.original_name, f"cannot read: {exc.strerror or exc}"))
            continue
        digest = sha256(data)
        if digest in seen:
            out.duplicates += 1
            continue
        seen.add(digest)
        read.append((item, data, digest))

    with session_factory() as session:
        existing = image_store.existing_images(session, [d for _, _, d in read], embedder.name)
    pictures = []
    for item, data, digest in read:
        if digest in existing and existing[digest][1]:
            out.duplicates += 1
            continue
        try:
            decoded = decode(data)
        except InvalidImage as exc:
            if strict:  # one upload: its error, by class (an unsupported format is a 415)
                raise
            out.failed.append((item.original_name, str(exc)))
            continue
        out.to_embed.append(digest)
        pictures.append(decoded.image)
        if digest in existing:
            out.existing_ids[digest] = existing[digest][0]
        else:
            out.new_images.append(image_store.NewImage(
                sha256=digest, data=data, width=decoded.width, height=decoded.height, format=decoded.format,
                category=item.category, label=item.label, original_name=item.original_name,
                source_dataset=item.source, source_split=item.split, metadata=item.metadata))
    if pictures:
        out.tensors = embedder.prepare(pictures)
    return out


def _claim(ready: Prepared, seen: set[str]) -> Prepared:
    """Leave out what an earlier batch already took, deciding in batch order (batches are prepared side by side):
    of identical files, the first in the input wins, as in a one-batch-at-a-time run."""
    keep = [k for k, digest in enumerate(ready.to_embed) if digest not in seen]
    if len(keep) < len(ready.to_embed):
        ready.duplicates += len(ready.to_embed) - len(keep)
        ready.to_embed = [ready.to_embed[k] for k in keep]
        ready.tensors = ready.tensors[keep] if keep else None
        kept = set(ready.to_embed)
        ready.new_images = [image for image in ready.new_images if image.sha256 in kept]
        ready.existing_ids = {d: i for d, i in ready.existing_ids.items() if d in kept}
    seen.update(ready.to_embed)
    return ready


def _joined(group: list[tuple[Prepared, object]]) -> tuple[Prepared, object]:
    """Batches, in order, as one Prepared and its vectors (None when none has anything to embed)."""
    if len(group) == 1:
        return group[0]
    joined = Prepared(duplicates=sum(r.duplicates for r, _ in group))
    for ready, _ in group:
        joined.to_embed += ready.to_embed
        joined.new_images += ready.new_images
        joined.existing_ids.update(ready.existing_ids)
        joined.failed += ready.failed
    vectors = [v for r, v in group if r.to_embed]
    return joined, np.concatenate(vectors) if vectors else None


def store_batch(session_factory, ready: Prepared, vectors, model_name: str, report: IngestReport) -> None:
    """Store a prepared batch's new images and its vectors (n, d) in one transaction, counting in `report`."""
    report.duplicates += ready.duplicates
    report.failed += ready.failed
    if not ready.to_embed:
        return
    # Embedded outside the transaction so that it stays short; conflicts are settled by ON CONFLICT below.
    def store(session) -> tuple[dict, list[int]]:
        inserted = image_store.insert_images(session, ready.new_images)
        ids = {**ready.existing_ids, **inserted}
        # An image another process inserted meanwhile is not in `ids`: it is that process's to embed.
        keep = [k for k, digest in enumerate(ready.to_embed) if digest in ids]
        return inserted, image_store.insert_embeddings(session, model_name, [ids[ready.to_embed[k]] for k in keep],
                                                       vectors[keep])

    inserted, stored = run_transaction(session_factory, store)
    report.added += len(set(inserted.values()) & set(stored))
    report.embedded_existing += len(set(ready.existing_ids.values()) & set(stored))
    report.duplicates += len(ready.to_embed) - len(stored)
    report.image_ids.extend(stored)
