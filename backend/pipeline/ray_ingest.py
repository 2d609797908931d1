"""Ingestion on Ray Data (`populate --engine ray`): reading, decoding and embedding spread over a Ray cluster.

The same work as backend.pipeline.ingest, split into Ray Data stages: items are handed out in batches to tasks that read,
hash, look up and decode them (ingest.prepare_batch, the single-process engine's own code, on whichever node runs
the task), then to a pool of embedding actors (one model each: a GPU per actor where the cluster has GPUs, else
CPU). This process writes every batch, in input order, through the single-process engine's transactional,
idempotent store path (ingest.store_batch), so a re-run or a resumed run adds nothing twice, and of identical files
the first in the input wins. The model's precision and engine are chosen once, here, and every actor uses the same.
"""
import functools
import logging
import os
import re
import time
from typing import Callable

import numpy as np
import sqlalchemy as sa
import torch
from PIL import Image as PILImage
from sqlalchemy.orm import Session
from tqdm import tqdm

from backend.config import PROJECT_ROOT
from backend.embedding.models import Embedder, create_embedder
from backend.embedding.pixels import stack_inputs
from backend.errors import ImsrcError
from backend.network import unreachable
from backend.pipeline.datasets import Item
from backend.pipeline.ingest import IngestReport, Prepared, prepare_batch, store_batch

os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # our progress bar says how it goes; set it to see Ray's
try:
    import ray
    from ray import cloudpickle
except ImportError:  # an optional dependency: connect() says how to install it
    ray = None

log = logging.getLogger(__name__)

# Preparing is a fraction of the model's work: two tasks per CPU keep ahead of it. Its CPU share also differs from
# the actors', which keeps Ray from fusing the stages into one (the model would then wait while each batch decodes).
PREPARE_CPUS = 0.5
EMBEDDED, FAILED, SKIPPED = "embed", "failed", "skipped"  # what became of a row; see _rows


class RayUnavailable(ImsrcError):
    """Ray is not installed, the cluster cannot be reached, or a job on it failed."""


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address`, or start one on this machine; imsrc's code travels with the job."""
    if ray is None:
        raise RayUnavailable("--engine ray needs Ray: pip install 'ray[data]' (see README, Running more than one "
                             "process)")
    if ray.is_initialized():
        return
    host, _, port = (address or "").removeprefix("ray://").rpartition(":")
    if host and port.isdigit() and (why := unreachable(host, int(port))):  # Ray itself would retry for minutes
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {why}")
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"py_modules": [str(PROJECT_ROOT / "backend")]})  # nodes need imsrc's requirements, not its checkout
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise RayUnavailable(f"cannot reach the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None


class _Preprocessor:
    """What prepare_batch needs of an embedder, without the network: its name and its preprocessing."""

    def __init__(self, name: str, preprocess: Callable):
        self.name, self.preprocess = name, preprocess

    def prepare(self, images) -> torch.Tensor:
        return stack_inputs(self.preprocess, images)


@functools.cache
def _sessions(database_url: str, schema: str):
    """One small engine per Ray worker process and collection schema, kept across the tasks it runs."""
    from backend.storage.collections import sessions_in
    from backend.storage.engine import create_engine_checked

    return sessions_in(create_engine_checked(database_url), schema)


def _prepare_rows(batch: dict, database_url: str, schema: str, model_name: str, preprocess: Callable,
                  blank: np.ndarray) -> dict:
    """Ray stage 1: prepare_batch on a batch of pickled items (against the collection of `schema`: what it holds
    already is skipped); one row per image to embed, failure or skip."""
    items = [cloudpickle.loads(blob) for blob in batch["item"]]
    ready = prepare_batch(_sessions(database_url, schema), items, _Preprocessor(model_name, preprocess))
    return _rows(ready, blank)


def _rows(ready: Prepared, blank: np.ndarray) -> dict:
    """A Prepared batch as Ray Data columns: images to embed carry their pixels (the model's input) and what is
    stored with them; failures carry their reason; one 'skipped' row carries the batch's duplicates. `blank`: one
    image's input of zeros, for the rows with nothing to embed (a column has one shape and type)."""
    new = {image.sha256: image for image in ready.new_images}
    rows = []
    for k, digest in enumerate(ready.to_embed):
        image = new.get(digest)
        rows.append({"status": EMBEDDED, "sha256": digest, "existing_id": ready.existing_ids.get(digest, -1),
                     "pixels": ready.tensors[k].numpy(),
                     "image": cloudpickle.dumps(image) if image is not None else b""})
    rows += [{"status": FAILED, "sha256": name, "existing_id": -1, "pixels": None, "image": reason.encode()}
             for name, reason in ready.failed]
    if ready.duplicates:
        rows.append({"status": SKIPPED, "sha256": "", "existing_id": ready.duplicates, "pixels": None, "image": b""})
    return {"status": np.array([r["status"] for r in rows], dtype=object),
            "sha256": np.array([r["sha256"] for r in rows], dtype=object),
            "existing_id": np.array([r["existing_id"] for r in rows], dtype=np.int64),
            "pixels": np.stack([r["pixels"] if r["pixels"] is not None else blank for r in rows]) if rows
            else np.zeros((0, *blank.shape), blank.dtype),
            "image": np.array([r["image"] for r in rows], dtype=object)}


class _Embed:
    """Ray stage 2, an actor: one model, loaded once, embedding the rows that need it."""

    def __init__(self, model_name: str, settings: dict):
        if settings["device"] == "cpu":  # Ray caps a worker's threads at its CPU share: the model is the work here
            torch.set_num_threads(os.cpu_count() or 1)
        self.embedder = create_embedder(model_name, **settings).load()

    def __call__(self, batch: dict) -> dict:
        todo = np.flatnonzero(batch["status"] == EMBEDDED)
        vectors = np.zeros((len(batch["status"]), self.embedder.dim), np.float32)
        if len(todo):
            vectors[todo] = self.embedder.embed_prepared(torch.from_numpy(np.ascontiguousarray(batch["pixels"][todo])))
        return {key: batch[key] for key in ("status", "sha256", "existing_id", "image")} | {"vector": vectors}


def ingest_on_ray(session_factory: Callable[[], Session], items: list[Item], embedder: Embedder, database_url: str,
                  batch_size: int = 16, actors: int | None = None, progress: bool = True) -> IngestReport:
    """Store and embed items on the Ray cluster joined with connect(); the same result as backend.pipeline.ingest.ingest."""
    report = IngestReport()
    started = time.perf_counter()
    if not items:
        return report
    embedder = embedder.source.load()  # a derived model's base; precision and engine chosen here, for every actor
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = actors or gpus or max(1, sum(1 for node in ray.nodes() if node["Alive"]))
    # On CPUs the actors use what was measured here; on GPUs they measure their own (this CPU says nothing of them).
    settings = {"device": "cuda" if gpus else "cpu", "batch_size": batch_size, "weights_path": embedder.weights_path,
                "precision": "auto" if gpus else embedder.precision, "runtime": "auto" if gpus else embedder.runtime_in_use}
    preprocess = embedder.preprocessor()
    with session_factory() as s:  # the collection stored into: the workers look up what it holds, not another's
        schema = s.scalar(sa.text("SELECT current_schema()"))
    blank = np.zeros_like(embedder.prepare([PILImage.new("RGB", (8, 8))])[0].numpy())  # the model's input, per image
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the first of identical files wins, as in a single process
    context.enable_progress_bars = False  # ours counts what was stored
    records = [{"item": cloudpickle.dumps(item)} for item in items]
    dataset = (ray.data.from_items(records, override_num_blocks=max(1, min(len(items) // (batch_size * 4), 1000)))
               .map_batches(_prepare_rows, batch_size=batch_size, batch_format="numpy", num_cpus=PREPARE_CPUS,
                            fn_kwargs={"database_url": database_url, "schema": schema, "model_name": embedder.name,
                                       "preprocess": preprocess, "blank": blank})
               .map_batches(_Embed, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            fn_constructor_kwargs={"model_name": embedder.name, "settings": settings},
                            num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                            scheduling_strategy="SPREAD"))  # actors on different nodes, as far as they go
    log.info("Ray: %d embedding actor(s) on %s", actors, settings["device"])
    seen: set[str] = set()
    with tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
        try:
            for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
                done = _store_rows(session_factory, batch, embedder.name, report, seen)
                bar.set_postfix(added=report.added, dup=report.duplicates, failed=len(report.failed), refresh=False)
                bar.update(done)
                report.seconds = time.perf_counter() - started
        except ray.exceptions.RayError as exc:  # a task or actor failed on some node: say what, not Ray's traceback
            raise RayUnavailable(f"the Ray job failed after {report.added} images were stored (they are kept; run "
                                 f"the same command again to resume): {_first_cause(exc)}") from None
    return report


def _first_cause(exc: BaseException) -> str:
    """The error a Ray failure started from, in one line: Ray passes it back as text, the remote traceback inside
    its own exception's message, so the first 'Type: message' line that is not Ray's is it."""
    for line in str(exc).splitlines():
        if (found := re.match(r"([A-Za-z_][\w.]*): (.+)", line.strip())) and not found[1].startswith("ray."):
            return f"{found[1].rsplit('.', 1)[-1]}: {found[2]}"
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def _store_rows(session_factory, batch: dict, model_name: str, report: IngestReport, seen: set[str]) -> int:
    """Write one batch of embedded rows through the single-process store path; returns how many items it stood for."""
    ready, keep = Prepared(), []
    for k, status in enumerate(batch["status"]):
        if status == FAILED:
            ready.failed.append((batch["sha256"][k], bytes(batch["image"][k]).decode()))
        elif status == SKIPPED:
            ready.duplicates += int(batch["existing_id"][k])
        elif (digest := batch["sha256"][k]) in seen:  # an earlier batch took an identical file
            ready.duplicates += 1
        else:
            seen.add(digest)
            keep.append(k)
            ready.to_embed.append(digest)
            if batch["existing_id"][k] >= 0:
                ready.existing_ids[digest] = int(batch["existing_id"][k])
            else:
                ready.new_images.append(cloudpickle.loads(batch["image"][k]))
    store_batch(session_factory, ready, batch["vector"][keep], model_name, report)
    return len(ready.to_embed) + len(ready.failed) + ready.duplicates
