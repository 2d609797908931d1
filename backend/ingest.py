"""Ingestion: read, hash, de-duplicate, decode, embed in batches and store each batch in one transaction."""
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from sqlalchemy.orm import Session
from tqdm import tqdm

from backend import store
from backend.datasets import Item
from backend.embedders import Embedder
from backend.errors import InvalidImage
from backend.images import decode, sha256



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
    def images_per_second(self) -> float:
        done = self.added + self.embedded_existing
        return done / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [f"added {self.added}, embedded {self.embedded_existing} already stored, "
                 f"skipped {self.duplicates} duplicates, failed {len(self.failed)} "
                 f"in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)"]
        lines += [f"  failed: {name}: {reason}" for name, reason in self.failed[:20]]
        if len(self.failed) > 20:
            lines.append(f"  ... and {len(self.failed) - 20} more failures")
        return "\n".join(lines)


def ingest(session_factory: Callable[[], Session], items: Iterable[Item], embedder: Embedder,
           batch_size: int = 64, progress: bool = True, total: int | None = None) -> IngestReport:
    """Store and embed items batch by batch; re-running adds nothing twice, and a stopped run resumes cleanly."""
    report = IngestReport()
    started = time.perf_counter()
    items = list(items)
    seen: set[str] = set()
    with tqdm(total=total or len(items), unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            _ingest_batch(session_factory, batch, embedder, report, seen)
            report.seconds = time.perf_counter() - started
            bar.set_postfix(added=report.added, dup=report.duplicates, failed=len(report.failed), refresh=False)
            bar.update(len(batch))
    report.seconds = time.perf_counter() - started
    return report


def _ingest_batch(session_factory, batch: list[Item], embedder: Embedder, report: IngestReport, seen: set[str]) -> None:
    read: list[tuple[Item, bytes, str]] = []
    for item in batch:
        try:
            data = item.read()
        except OSError as exc:
            report.failed.append((item.original_name, f"cannot read: {exc.strerror or exc}"))
            continue
        digest = sha256(data)
        if digest in seen:
            report.duplicates += 1
            continue
        seen.add(digest)
        read.append((item, data, digest))

    with session_factory() as session:
        existing = store.existing_images(session, [d for _, _, d in read], embedder.name)
    to_embed, new_images, existing_ids = [], [], {}
    for item, data, digest in read:
        if digest in existing and existing[digest][1]:
            report.duplicates += 1
            continue
        try:
            decoded = decode(data)
        except InvalidImage as exc:
            report.failed.append((item.original_name, str(exc)))
            continue
        to_embed.append((digest, decoded.image))
        if digest in existing:
            existing_ids[digest] = existing[digest][0]
        else:
            new_images.append(store.NewImage(
                sha256=digest, data=data, width=decoded.width, height=decoded.height, format=decoded.format,
                category=item.category, label=item.label, original_name=item.original_name,
                source_dataset=item.source, source_split=item.split, metadata=item.metadata))
    if not to_embed:
        return
    # Embed outside the transaction so that it stays short; conflicts are settled by ON CONFLICT below.
    vectors = embedder.embed([img for _, img in to_embed])
    with session_factory() as session, session.begin():
        inserted = store.insert_images(session, new_images)
        ids = {**existing_ids, **inserted}
        # An image another process inserted meanwhile is not in `ids`: it is that process's to embed.
        keep = [k for k, (digest, _) in enumerate(to_embed) if digest in ids]
        stored = store.insert_embeddings(session, embedder.name, [ids[to_embed[k][0]] for k in keep], vectors[keep])
    report.added += len(set(inserted.values()) & set(stored))
    report.embedded_existing += len(set(existing_ids.values()) & set(stored))
    report.duplicates += len(to_embed) - len(stored)
    report.image_ids.extend(stored)
