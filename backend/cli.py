"""The command line: `python -m backend COMMAND`, one command per pipeline stage."""
import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

from backend.duplicates import DEFAULT_THRESHOLD as DEFAULT_DUPLICATE_THRESHOLD
from backend.errors import ImsrcError

DEFAULT_POPULATE = 1000  # what the populate dialog offers for CIFAR-10 and Fashion-MNIST (the seed's default)



def cmd_init_db(args) -> int:
    """Create or upgrade the schema to the newest migration (safe to repeat)."""
    from backend.database import current_revision, get_engine, migrate

    engine = get_engine()
    migrate(engine)
    print(f"database schema at revision {current_revision(engine)}")
    return 0


def cmd_populate(args) -> int:
    """Load a dataset, embed its images and store them (model: MODEL_NAME, else the collection's own)."""
    from backend import store
    from backend.config import settings
    from backend.database import session_factory
    from backend.datasets import default_dataset, load_dataset, select_balanced
    from backend.ingest import ingest
    from backend.model_choice import choose_model, load_embedder

    if args.interactive and sys.stdin.isatty():
        ask_populate(args)
    if args.dataset is None:
        args.dataset, why = default_dataset()
        print(why)
    items = select_balanced(load_dataset(args.dataset, args.split, args.data_dir, args.image_dir), args.num_images)
    automatic = args.categories != "labels" or any(item.category is None for item in items)
    if automatic:  # the images are stored without categories, then clustered into automatic ones
        if args.categories == "labels":
            print("the images have no categories (no subfolders): grouping them into clusters (--categories auto)")
        items = [replace(item, category=None) for item in items]
    factory = session_factory()
    embedder = load_embedder(choose_model(factory), factory)
    with factory() as s, s.begin():  # later commands with MODEL_NAME unset use the model chosen here
        store.ensure_model(s, embedder.name, embedder.dim, chosen=True)
    batch_size = args.batch_size or settings.batch_size
    if args.engine == "ray":
        report = _populate_on_ray(args, factory, items, embedder, batch_size)
    else:
        print(f"populating {len(items)} images from {args.dataset} ({args.split}) with {embedder.name} on "
              f"{embedder.device}")
        report = ingest(factory, items, embedder, batch_size=batch_size)
    print(report.summary())
    if automatic:
        _recluster(factory, embedder.name, _cluster_count(args.categories))
    return 0


def _cluster_count(setting: str) -> int | None:
    """K from --categories auto:K (None: from the collection's size)."""
    return int(setting.split(":", 1)[1]) if ":" in setting else None


def _recluster(factory, model_name: str, k: int | None) -> None:
    from backend.clusters import recluster

    started = time.perf_counter()
    with factory() as s, s.begin():
        made = recluster(s, model_name, k)
    print(f"grouped the images without a category into {made} automatic categories (\"cluster 1\".."
          f"\"cluster {made}\") in {time.perf_counter() - started:.1f} s")


def cmd_recluster(args) -> int:
    """Group the images no person categorised into K automatic categories again, as the collection has grown."""
    from backend.database import session_factory
    from backend.model_choice import choose_model

    factory = session_factory()
    _recluster(factory, choose_model(factory).name, args.k)
    return 0


def cmd_train_projection(args) -> int:
    """Learn a projection of the model's vectors from the collection's categories, as the derived model
    <model>+proj (its own vectors, prototypes and index; select it with MODEL_NAME)."""
    from backend.database import session_factory
    from backend.model_choice import choose_model
    from backend.projection import base_of
    from backend.train_projection import train_projection

    factory = session_factory()
    base = base_of(choose_model(factory).name)
    head = train_projection(factory, base, dim=args.dim, kind=args.kind, epochs=args.epochs,
                            max_vectors=args.max_vectors)
    report = head.report
    precision = next(v for k, v in report.items() if k.startswith("held_out_precision@"))
    print(f"{head.model_name}: head version {head.version} ({report['kind']}, {report['dim']}-d), trained on "
          f"{report['train_vectors']:,} vectors in {report['seconds']} s ({report['epochs_run']} epochs, best "
          f"{report['best_epoch']}); held-out precision@10 {precision['raw']} raw -> {precision['projected']} "
          f"projected.\nSearch with it: MODEL_NAME={head.model_name} (servers already using it switch on their own)")
    return 0


def _populate_on_ray(args, factory, items, embedder, batch_size):
    from backend.database import database_url, is_embedded
    from backend.ray_ingest import connect, ingest_on_ray

    if args.ray_address and is_embedded():
        print("note: the embedded PostgreSQL listens on this machine only; Ray workers elsewhere need DATABASE_URL "
              "set to a server they can reach", file=sys.stderr)
    connect(args.ray_address)
    print(f"populating {len(items)} images from {args.dataset} ({args.split}) with {embedder.name} on Ray "
          f"({args.ray_address or 'a local cluster'})")
    return ingest_on_ray(factory, items, embedder, database_url(), batch_size=batch_size, actors=args.ray_actors)


def ask_populate(args) -> None:
    """Ask for what `populate` was not told: the dataset (saying which can be had here), a path, how many."""
    from backend.datasets import DATASET_TITLES, DATASETS, availability, default_dataset

    if args.dataset is None:
        found = {name: availability(name) for name in ("cifar10", "fashion-mnist")}
        default, why = default_dataset(found["cifar10"])
        print("Datasets:")
        for number, name in enumerate(DATASETS, 1):
            ok, where = found.get(name, (True, ""))
            note = f" ({where})" if ok and where else f" (not available here: {where})" if not ok else ""
            print(f"  {number}) {DATASET_TITLES[name]}{note}")
        print(why)
        args.dataset = DATASETS[_ask_number("Dataset", DATASETS.index(default) + 1, maximum=len(DATASETS)) - 1]
    if args.dataset in ("folder", "csv") and args.data_dir is None:
        question = "Folder (one subfolder per category)" if args.dataset == "folder" else "CSV file"
        while not (answer := _ask(f"{question}: ").strip()):
            pass
        args.data_dir = Path(answer).expanduser()
    if args.num_images is None:
        everything = args.dataset in ("folder", "csv")
        args.num_images = _ask_number("How many images", None if everything else DEFAULT_POPULATE)


def _ask(prompt: str) -> str:
    try:
        return input(prompt)
    except EOFError:
        raise ImsrcError("no answer (end of input): nothing was populated") from None


def _ask_number(question: str, default: int | None, maximum: int | None = None) -> int | None:
    """A whole number from 1 to maximum, asked until one is given; Enter takes the default (None: all)."""
    while True:
        answer = _ask(f"{question}? [{default if default is not None else 'all'}] ").strip()
        if not answer:
            return default
        if answer.isdigit() and 1 <= int(answer) <= (maximum or int(answer)):
            return int(answer)
        print(f"  please type a whole number from 1 to {maximum}" if maximum else "  please type a whole number, at least 1")


def cmd_status(args) -> int:
    """Print what the database holds and which database and model are in use."""
    if args.line:
        print(status_line())
        return 0
    from backend import store
    from backend.database import session_factory
    from backend.model_choice import choose_model, unserved_notice
    from backend.projection import model_dim

    factory = session_factory()
    with factory() as session:
        c = store.counts(session)
        choice = choose_model(factory, quiet=True)
        dim = model_dim(session, choice.name)
    print(f"database:   {_database_description()}")
    print(f"model:      {choice.name} ({dim}-d): {choice.reason}")
    print(f"images:     {c['images']}")
    print(f"categories: {c['categories']}")
    for model in sorted(set(c["embeddings"]) | set(c["prototypes"])):
        print(f"  {model} ({c['dims'].get(model, '?')}-d): {c['embeddings'].get(model, 0)} embeddings, "
              f"{c['prototypes'].get(model, 0)} prototypes")
    if not c["embeddings"]:
        print("no embeddings yet: run `python -m backend populate`")
    elif notice := unserved_notice(c["embeddings"], choice.name):
        print(f"note: {notice}")
    return 0


def status_line() -> str:
    """One line for the set-up menu: database, images, model, index and writes, each with what to do next."""
    from backend import store
    from backend.config import settings
    from backend.database import session_factory
    from backend.guard import writes_mode
    from backend.collections import snapshot_dir_of
    from backend.index_manager import fingerprint, snapshot_meta, snapshot_path
    from backend.model_choice import choose_model

    writes = writes_mode(short=True)
    try:
        where = _database_description(short=True)
        factory = session_factory()
        with factory() as s:
            images = store.counts(s)["images"]
        choice = choose_model(factory, quiet=True)
        with factory() as s:
            current = fingerprint(s, choice.name)
    except ImsrcError as exc:
        return (f"database: not reachable ({str(exc).splitlines()[0]}): check DATABASE_URL, or unset it for the "
                f"embedded server | {writes}")
    meta = snapshot_meta(snapshot_path(snapshot_dir_of(settings.snapshot_dir, settings.collection), choice.name,
                                       settings.faiss_index_type))
    if current.startswith("0:"):
        index = "no vectors yet: populate (3)"
    elif meta and meta.get("fingerprint") == current and meta.get("model") == choice.name:
        index = "index ready"
    else:
        index = "index not built: 4 builds it (or the server at start)"
    return (f"database: {where}, reachable | {images:,} images | model: {choice.name} ({choice.source}) | "
            f"{index} | {writes}")


def _database_description(short: bool = False) -> str:
    from sqlalchemy.engine import make_url

    from backend.config import settings
    from backend.database import database_url, is_embedded

    if is_embedded():
        return "embedded" if short else f"embedded PostgreSQL in {settings.pg_data_dir}"
    url = make_url(database_url())
    return f"external {url.host or 'socket'}:{url.port or 5432}/{url.database}" if short else \
        url.render_as_string(hide_password=True)


def cmd_rebuild(args) -> int:
    """Recompute the prototypes of MODEL_NAME from PostgreSQL, rebuild its index and snapshot it."""
    from backend.service import ImageSearch

    started = time.perf_counter()
    search = ImageSearch.open(load_model=False)  # vectors come from PostgreSQL: no model needed
    if search.index_source == "snapshot":  # open() trusted the snapshot; a rebuild is what was asked for
        search.rebuild()
    index, manager = search.index, search.manager
    saved = (f"snapshot {manager.snapshot_path}" if manager.snapshot_is_current() else
             f"the snapshot is written by the running process {manager.writer.holder()}")
    print(f"rebuilt {len(index.prototypes()[0])} prototypes of {len(index.categories)} categories and the "
          f"{index.index_type} index of {len(index)} "
          f"{search.embedder.name} vectors in {time.perf_counter() - started:.1f} s; {saved}")
    return 0


def cmd_duplicates(args) -> int:
    """List groups of near-duplicate images (the same picture re-encoded, resized, cropped), found with the index."""
    import json

    from backend.service import ImageSearch

    search = ImageSearch.open(load_model=False)  # the stored vectors are compared: no model needed
    found = search.duplicate_groups(args.threshold)
    if args.json:
        print(json.dumps([[{"image_id": h.image_id, "similarity": round(h.score, 4), "category": h.category,
                            "file_name": h.file_name} for h in group] for group in found], indent=1))
    else:
        for n, group in enumerate(found, 1):
            print(f"group {n}: " + ", ".join(f"#{h.image_id} {h.file_name or ''} ({h.score:.3f})" for h in group))
        print(f"{len(found)} groups of near-duplicates (similarity {args.threshold} or more) among {len(search.index)} "
              f"images; decide about them on the page or with POST /duplicates/decisions")
    search.close()
    return 0


def cmd_check(args) -> int:
    """Compare PostgreSQL's images, vectors and prototypes with each other and with the index snapshot."""
    from backend.config import settings
    from backend.consistency import check_snapshot
    from backend.database import session_factory
    from backend.model_choice import choose_model
    from backend.projection import model_dim

    factory = session_factory()
    model = choose_model(factory).name
    with factory() as s:
        dim = model_dim(s, model)
    report = check_snapshot(factory, model, dim, settings.faiss_index_type, settings.snapshot_dir)
    for line in report.findings + [f"note: {note}" for note in report.notes]:
        print(line)
    print(report.summary())
    if not report.ok:
        print("to repair: `python -m backend rebuild` (prototypes, index and snapshot, from PostgreSQL); "
              "images without vectors get them when their populate runs again")
    return 0 if report.ok else 1


def cmd_evaluate(args) -> int:
    """Measure precision, mAP and recall of two-stage against exhaustive search, with latencies."""
    from backend import store
    from backend.datasets import load_dataset, select_balanced
    from backend.config import settings
    from backend.evaluate import evaluate, format_table, write_json
    from backend.service import ImageSearch

    if args.report:  # found out now, not after the whole evaluation
        try:
            args.report.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImsrcError(f"cannot write the report to {args.report}: {exc.strerror or exc}") from None
    search = ImageSearch.open()
    if args.dataset is None:
        with search.sessions() as s:
            args.dataset = store.main_source_dataset(s)
        if args.dataset not in ("cifar10", "fashion-mnist"):
            raise ImsrcError("cannot tell which dataset the collection came from: pass --dataset (and --data-dir)")
    queries = select_balanced(load_dataset(args.dataset, args.split, args.data_dir, args.image_dir), args.queries)
    report = evaluate(search, queries, k=args.k, samples=args.samples if args.report else 0,
                      sample_config=f"P={settings.prototype_limit}")
    print(format_table(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.report:
        from backend.report import write_report

        shown = {sample["query"]: queries[sample["query"]].read() for sample in report["samples"]}
        print(f"wrote {write_report(report, shown, search.sessions, args.report)} (and its plots beside it)")
    return 0


def cmd_collections(args) -> int:
    """List, create, describe or delete collections (each with its own model, categories and index)."""
    import json

    from backend import collections, store
    from backend.config import settings
    from backend.database import collection_sessions

    registry = collection_sessions()
    if args.action == "create":
        info = collections.create_collection(registry.engine, args.name, args.model, args.description)
        print(f"created collection {info.name} (model: {info.model_name or 'chosen when first populated'}); fill it "
              f"with: python -m backend --collection {info.name} populate ...")
    elif args.action == "delete":
        collections.get_collection(registry.engine, args.name)  # 'not found' before asking
        if not args.yes and not _confirmed(f"delete collection {args.name} and all its images? type its name to "
                                           f"confirm: ", args.name):
            return 1
        collections.delete_collection(registry.engine, args.name, settings.snapshot_dir)
        print(f"deleted collection {args.name}")
    else:
        found = collections.list_collections(registry.engine) if args.action == "list" else \
            [collections.get_collection(registry.engine, args.name)]
        described = []
        for info in found:
            with registry.sessions(info.name)() as s:
                counts = store.counts(s)
            described.append({"name": info.name, "model": info.model_name, "description": info.description,
                              "created_at": info.created_at.isoformat(), "images": counts["images"],
                              "categories": counts["categories"], "embeddings": counts["embeddings"]})
        if args.json:
            print(json.dumps(described if args.action == "list" else described[0], indent=1))
        for c in described if not args.json else []:
            vectors = ", ".join(f"{n:,} {m}" for m, n in c["embeddings"].items()) or "none"
            print(f"{c['name']}: {c['images']:,} images, {c['categories']} categories, model "
                  f"{c['model'] or '(not fixed)'}, vectors: {vectors}" + (f" - {c['description']}"
                                                                           if c["description"] else ""))
    return 0


def cmd_reembed(args) -> int:
    """Compute another model's vectors for the collection in the background of serving (resumable), to switch to."""
    from backend.config import settings
    from backend.database import session_factory
    from backend.model_choice import ModelChoice, choose_model, load_embedder
    from backend.reembed import coverage, reembed

    factory = session_factory()
    serving = choose_model(factory, quiet=True).name
    embedder = load_embedder(ModelChoice(args.model, "caller", "asked for"), factory)
    with factory() as s:
        before = coverage(s, embedder.name)
    print(f"re-embedding collection {settings.collection} with {embedder.name} on {embedder.device} "
          f"({before.describe()} so far); searches go on with {serving} meanwhile")
    started = time.perf_counter()
    report = reembed(factory, embedder, batch_size=args.batch_size or settings.batch_size)
    with factory() as s:
        after = coverage(s, embedder.name)
    print(f"{after.describe()} after {time.perf_counter() - started:.1f} s ({report.embedded_existing} embedded now, "
          f"{len(report.failed)} failed)")
    if not after.complete:
        print("not complete: run the same command again to resume")
        return 1
    where = f"--collection {settings.collection} " if settings.collection != "default" else ""
    print(f"switch with: python -m backend {where}switch-model {embedder.name}")
    return 0


def cmd_switch_model(args) -> int:
    """Make another model the collection's: every serving process swaps to its vectors and index at once."""
    from backend.config import settings
    from backend.database import session_factory
    from backend.model_choice import choose_model
    from backend.reembed import switch_model

    factory = session_factory()
    serving = choose_model(factory, quiet=True).name
    with factory() as s, s.begin():
        switch_model(s, args.model, args.force)
    print(f"collection {settings.collection} switched from {serving} to {args.model}; the {serving} vectors stay "
          f"(switch back the same way, or drop them with drop-model {serving})")
    return 0


def cmd_drop_model(args) -> int:
    """Delete a model's vectors and prototypes from the collection (not those of its current model)."""
    from backend.config import settings
    from backend.database import session_factory
    from backend.reembed import drop_model

    if not args.yes and not _confirmed(f"delete the {args.model} vectors of collection {settings.collection}? "
                                       f"type the model's name to confirm: ", args.model):
        return 1
    with session_factory()() as s, s.begin():
        dropped = drop_model(s, args.model)
    print(f"dropped {dropped:,} {args.model} vectors from collection {settings.collection}")
    return 0


def _confirmed(question: str, answer: str) -> bool:
    """Whether a person typed `answer` to `question`; where nobody can answer, an error saying to add --yes."""
    if not sys.stdin.isatty():
        raise ImsrcError("this cannot be undone: add --yes to confirm")
    if input(question) != answer:
        print("not done")
        return False
    return True


def cmd_serve(args) -> int:
    """Serve the REST API and the web page (model and index load once at start-up, in each worker)."""
    import copy
    import tempfile

    import uvicorn

    from backend.config import settings

    host, port = args.host or settings.api_host, args.port or settings.api_port
    # Start-up says how the index was loaded, and how fast; in a logging config, so that every worker says it too.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["backend"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    # Every line says which request it belongs to (backend.telemetry), "-" outside one.
    log_config["filters"] = {"request_id": {"()": "backend.telemetry.RequestIdFilter"}}
    for handler in log_config["handlers"].values():
        handler["filters"] = ["request_id"]
    log_config["formatters"]["default"]["fmt"] = "%(levelprefix)s [%(request_id)s] %(message)s"
    log_config["formatters"]["access"]["fmt"] = \
        '%(levelprefix)s [%(request_id)s] %(client_addr)s - "%(request_line)s" %(status_code)s'
    if args.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # The workers write their metrics here, and /metrics sums them, whichever worker answers.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="imsrc-metrics-")
    print(f"imsrc: open http://{'localhost' if host in ('0.0.0.0', '127.0.0.1') else host}:{port}/app/ "
          f"(API docs at /docs)", flush=True)
    if args.workers > 1:
        print(f"imsrc: {args.workers} worker processes, each with its own model and index, kept in step through "
              f"PostgreSQL", flush=True)
    # Workers answer the supervisor's health pings from a thread; loading a model on a busy CPU can starve it for
    # more than uvicorn's 5 s, which would have the worker killed while it starts.
    uvicorn.run("backend.main:app", host=host, port=port, log_level="info", log_config=log_config,
                workers=args.workers, timeout_worker_healthcheck=60)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every command."""
    from backend.datasets import DATASETS

    parser = argparse.ArgumentParser(prog="python -m backend", description="imsrc: image similarity search")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("-c", "--collection", type=_collection_name, default=None,
                        help="the collection a command works on (default: COLLECTION, else `default`)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init-db", help=cmd_init_db.__doc__).set_defaults(func=cmd_init_db)

    p = sub.add_parser("populate", help=cmd_populate.__doc__)
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: cifar10 when it can be had here, else fashion-mnist")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="in a terminal, ask for the dataset, path and number of images not given here")
    p.add_argument("--num-images", type=_positive_int, default=None,
                   help="take N images balanced across classes (default: all; asked with --interactive)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local copy of the dataset (a folder; for --dataset csv, the CSV file)")
    p.add_argument("--image-dir", type=Path, default=None, help="for --dataset csv: where relative file paths point")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default BATCH_SIZE)")
    p.add_argument("--categories", type=_categories, default="labels", metavar="labels|auto[:K]",
                   help="labels: the dataset's own (default); auto: ignore them and group the images into K "
                        "clusters that act as categories (K from the collection's size unless given)")
    p.add_argument("--engine", choices=("single", "ray"), default="single",
                   help="single: this process (default); ray: read, decode and embed on a Ray cluster")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: the cluster to join (e.g. 10.0.0.1:6379); default: start one here")
    p.add_argument("--ray-actors", type=_positive_int, default=None,
                   help="with --engine ray: embedding actors (default: one per GPU, else one per node)")
    p.set_defaults(func=cmd_populate)

    p = sub.add_parser("status", help=cmd_status.__doc__)
    p.add_argument("--line", action="store_true", help="one line, as the set-up menu shows it")
    p.set_defaults(func=cmd_status)
    sub.add_parser("rebuild", help=cmd_rebuild.__doc__).set_defaults(func=cmd_rebuild)
    sub.add_parser("check", help=cmd_check.__doc__).set_defaults(func=cmd_check)
    p = sub.add_parser("duplicates", help=cmd_duplicates.__doc__)
    p.add_argument("--threshold", type=_similarity, default=DEFAULT_DUPLICATE_THRESHOLD,
                   help=f"how alike two images must be (cosine similarity; default {DEFAULT_DUPLICATE_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the groups as JSON")
    p.set_defaults(func=cmd_duplicates)
    p = sub.add_parser("recluster", help=cmd_recluster.__doc__)
    p.add_argument("--k", type=_at_least_two, default=None, help="clusters (default: from the collection's size)")
    p.set_defaults(func=cmd_recluster)

    p = sub.add_parser("train-projection", help=cmd_train_projection.__doc__)
    p.add_argument("--dim", type=_positive_int, default=256, help="dimension of the projected vectors (256)")
    p.add_argument("--epochs", type=_positive_int, default=30, help="at most (training stops early; 30)")
    p.add_argument("--kind", choices=("mlp", "linear"), default="mlp",
                   help="mlp: two layers (default, the better measured); linear: one matrix")
    p.add_argument("--max-vectors", type=_positive_int, default=100_000,
                   help="stored vectors trained on, drawn at random when there are more (100,000)")
    p.set_defaults(func=cmd_train_projection)

    p = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    p.add_argument("--queries", type=_positive_int, default=1000, help="held-out query images, balanced by class")
    p.add_argument("--k", type=_positive_int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="also write a page to look at: DIR/index.html (sample queries and results, plots)")
    p.add_argument("--samples", type=_positive_int, default=12, help="sample queries shown by --report")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="where queries come from (default: the collection's own dataset)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--image-dir", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("collections", help=cmd_collections.__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every collection, with its model and size").add_argument(
        "--json", action="store_true", help="as JSON")
    a = actions.add_parser("create", help="an empty collection")
    a.add_argument("name", type=_collection_name)
    a.add_argument("--model", default=None, help="its embedding model (default: chosen when it is first populated)")
    a.add_argument("--description", default=None)
    a = actions.add_parser("describe", help="one collection")
    a.add_argument("name", type=_collection_name)
    a.add_argument("--json", action="store_true", help="as JSON")
    a = actions.add_parser("delete", help="a collection, its images and vectors (asks to confirm)")
    a.add_argument("name", type=_collection_name)
    a.add_argument("--yes", action="store_true", help="do not ask (needed where nobody can answer)")
    p.set_defaults(func=cmd_collections)

    p = sub.add_parser("reembed", help=cmd_reembed.__doc__)
    p.add_argument("--model", required=True, help="the model to compute vectors of (resnet50, resnet18, "
                   "efficientnet_lite0, efficientnet_lite2)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images per batch (default BATCH_SIZE)")
    p.set_defaults(func=cmd_reembed)
    p = sub.add_parser("switch-model", help=cmd_switch_model.__doc__)
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="even though some images lack the model's vectors")
    p.set_defaults(func=cmd_switch_model)
    p = sub.add_parser("drop-model", help=cmd_drop_model.__doc__)
    p.add_argument("model")
    p.add_argument("--yes", action="store_true", help="do not ask (needed where nobody can answer)")
    p.set_defaults(func=cmd_drop_model)

    p = sub.add_parser("serve", help=cmd_serve.__doc__)
    p.add_argument("--host", default=None, help="default API_HOST")
    p.add_argument("--port", type=_positive_int, default=None, help="default API_PORT")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes sharing the port (each holds the model and the index: see README)")
    p.set_defaults(func=cmd_serve)
    return parser


def _collection_name(text: str) -> str:
    from backend.collections import check_name
    from backend.errors import InvalidQuery

    try:
        return check_name(text)
    except InvalidQuery as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _categories(text: str) -> str:
    if text == "labels" or text == "auto" or (text.startswith("auto:") and text[5:].isdigit() and int(text[5:]) >= 2):
        return text
    raise argparse.ArgumentTypeError(f"expected labels, auto or auto:K with K at least 2, got {text!r}")


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2, got {value}")
    return value


def _similarity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.5 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0.5 and 1, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Run a command; errors a person can fix print one message and exit 2."""
    args = build_parser().parse_args(argv)
    if args.collection:  # for this command, and for a server's workers (they read the environment)
        from backend.config import settings

        settings.collection = os.environ["COLLECTION"] = args.collection
    # A plain SIGTERM would end the process without cleanup; as SystemExit, atexit stops the embedded server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Which model a command picked, and why, is said plainly.
    note = logging.StreamHandler(sys.stderr)
    note.setFormatter(logging.Formatter("%(message)s"))
    chooser = logging.getLogger("backend.model_choice")
    chooser.addHandler(note)
    chooser.setLevel(logging.INFO)
    chooser.propagate = False
    try:
        return args.func(args)
    except ImsrcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: batches already stored are kept; run the same command again to resume", file=sys.stderr)
        return 130
