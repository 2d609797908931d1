"""Populate: the one way images of a dataset get into a collection, behind `python -m backend populate` and
ImageSearch.build_database. It records the model as the collection's choice, ingests (here or through a function
handed in, such as Ray's), and groups images without a category into automatic ones."""
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sqlalchemy.orm import sessionmaker

from backend.pipeline.datasets import Item, load_dataset, select_balanced
from backend.pipeline.ingest import IngestReport, ingest
from backend.pipeline.recluster import recluster
from backend.storage import images as image_store


@dataclass(frozen=True)
class Selection:
    """The images to populate, and whether they get automatic categories (stored without one, then clustered)."""

    items: list[Item]
    automatic: bool
    clusters: int | None = None  # K of auto:K (None: from the collection's size)
    because_unlabelled: bool = False  # automatic only because the images have no categories


@dataclass
class PopulateReport:
    """What a populate did: the ingestion's report, and the automatic categories made (None: none were)."""

    ingest: IngestReport
    clusters_made: int | None = None
    cluster_seconds: float = 0.0


def parse_categories(setting: str) -> tuple[bool, int | None]:
    """(automatic, K) of a --categories setting: labels, auto or auto:K."""
    if setting == "labels":
        return False, None
    return True, int(setting.split(":", 1)[1]) if ":" in setting else None


def select(dataset: str, split: str = "train", data_dir: Path | None = None, image_dir: Path | None = None,
           num_images: int | None = None, categories: str = "labels") -> Selection:
    """The dataset's images to populate, balanced across classes (num_images: all when None)."""
    items = select_balanced(load_dataset(dataset, split, data_dir, image_dir), num_images)
    asked, k = parse_categories(categories)
    unlabelled = any(item.category is None for item in items)
    if not (asked or unlabelled):
        return Selection(items, False)
    return Selection([replace(item, category=None) for item in items], True, k, because_unlabelled=not asked)


def populate(sessions: sessionmaker, embedder, selection: Selection, batch_size: int, progress: bool = True,
             run_ingest: Callable[..., IngestReport] | None = None) -> PopulateReport:
    """Store, embed and index the selection with `embedder`, recording its model as the collection's choice (later
    commands with MODEL_NAME unset use it); `run_ingest(sessions, items, embedder, batch_size)` replaces this
    process's ingestion (Ray's)."""
    with sessions() as s, s.begin():
        image_store.ensure_model(s, embedder.name, embedder.dim, chosen=True)
    if run_ingest is None:
        report = ingest(sessions, selection.items, embedder, batch_size=batch_size, progress=progress)
    else:
        report = run_ingest(sessions, selection.items, embedder, batch_size)
    if not selection.automatic:
        return PopulateReport(report)
    started = time.perf_counter()
    with sessions() as s, s.begin():
        made = recluster(s, embedder.name, selection.clusters)
    return PopulateReport(report, made, time.perf_counter() - started)
