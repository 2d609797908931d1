"""Commands that load, embed, cluster, train and evaluate: populate, recluster, train-projection, evaluate, reembed."""
import sys
import time
from pathlib import Path

from backend.cli.arguments import at_least_two, category_mode, positive_int
from backend.cli.prompts import ask_populate
from backend.errors import ImsrcError


def cmd_populate(args) -> int:
    """Load a dataset, embed its images and store them (model: the collection's current one, backend.service.model_choice)."""
    from backend.config import settings
    from backend.pipeline.datasets import default_dataset
    from backend.pipeline.populate import populate, select
    from backend.service.model_choice import choose_model, load_embedder
    from backend.storage.sessions import session_factory

    if args.interactive and sys.stdin.isatty():
        ask_populate(args)
    if args.dataset is None:
        args.dataset, why = default_dataset()
        print(why)
    selection = select(args.dataset, args.split, args.data_dir, args.image_dir, args.num_images, args.categories)
    if selection.because_unlabelled:
        print("the images have no categories (no subfolders): grouping them into clusters (--categories auto)")
    factory = session_factory()
    embedder = load_embedder(choose_model(factory), factory)
    run_ingest = None
    if args.engine == "ray":
        run_ingest = _ray_ingest(args)
        print(f"populating {len(selection.items)} images from {args.dataset} ({args.split}) with {embedder.name} on "
              f"Ray ({args.ray_address or 'a local cluster'})")
    else:
        print(f"populating {len(selection.items)} images from {args.dataset} ({args.split}) with {embedder.name} on "
              f"{embedder.device}")
    report = populate(factory, embedder, selection, args.batch_size or settings.batch_size, run_ingest=run_ingest)
    print(report.ingest.summary())
    if report.clusters_made is not None:
        _say_clustered(report.clusters_made, report.cluster_seconds)
    return 0


def _say_clustered(made: int, seconds: float) -> None:
    print(f"grouped the images without a category into {made} automatic categories (\"cluster 1\".."
          f"\"cluster {made}\") in {seconds:.1f} s")


def cmd_recluster(args) -> int:
    """Group the images no person categorised into K automatic categories again, as the collection has grown."""
    from backend.service.model_choice import choose_model
    from backend.storage.sessions import session_factory

    from backend.pipeline.recluster import recluster

    factory = session_factory()
    model_name = choose_model(factory).name
    started = time.perf_counter()
    with factory() as s, s.begin():
        made = recluster(s, model_name, args.k)
    _say_clustered(made, time.perf_counter() - started)
    return 0


def cmd_train_projection(args) -> int:
    """Learn a projection of the model's vectors from the collection's categories, as the derived model
    <model>+proj (its own vectors, prototypes and index; select it with MODEL_NAME)."""
    from backend.embedding.projection import base_of
    from backend.pipeline.train_projection import train_projection
    from backend.service.model_choice import choose_model
    from backend.storage.sessions import session_factory

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


def _ray_ingest(args):
    """An ingestion on the Ray cluster --ray-address names (or one started here), for populate."""
    from backend.pipeline.ray_ingest import connect, ingest_on_ray
    from backend.storage.engine import database_url, is_embedded

    if args.ray_address and is_embedded():
        print("note: the embedded PostgreSQL listens on this machine only; Ray workers elsewhere need DATABASE_URL "
              "set to a server they can reach", file=sys.stderr)
    connect(args.ray_address)
    return lambda sessions, items, embedder, batch_size: ingest_on_ray(
        sessions, items, embedder, database_url(), batch_size=batch_size, actors=args.ray_actors)


def cmd_evaluate(args) -> int:
    """Measure precision, mAP and recall of two-stage against exhaustive search, with latencies."""
    from backend.config import settings
    from backend.pipeline.datasets import load_dataset, select_balanced
    from backend.pipeline.evaluate import evaluate, format_table, write_json
    from backend.service.image_search import ImageSearch
    from backend.storage import images as image_store

    if args.report:  # found out now, not after the whole evaluation
        try:
            args.report.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImsrcError(f"cannot write the report to {args.report}: {exc.strerror or exc}") from None
    search = ImageSearch.open()
    if args.dataset is None:
        with search.sessions() as s:
            args.dataset = image_store.main_source_dataset(s)
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
        from backend.pipeline.report import write_report

        shown = {sample["query"]: queries[sample["query"]].read() for sample in report["samples"]}
        print(f"wrote {write_report(report, shown, search.sessions, args.report)} (and its plots beside it)")
    return 0


def cmd_reembed(args) -> int:
    """Compute another model's vectors for the collection in the background of serving (resumable), to switch to."""
    from backend.config import settings
    from backend.pipeline.reembed import coverage, reembed
    from backend.service.model_choice import ModelChoice, choose_model, load_embedder
    from backend.storage.sessions import session_factory

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


def register(sub) -> None:
    """Add this module's commands to the parser's subcommands."""
    from backend.pipeline.datasets import DATASETS

    p = sub.add_parser("populate", help=cmd_populate.__doc__)
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="default: cifar10 when it can be had here, else fashion-mnist")
    p.add_argument("-i", "--interactive", action="store_true",
                   help="in a terminal, ask for the dataset, path and number of images not given here")
    p.add_argument("--num-images", type=positive_int, default=None,
                   help="take N images balanced across classes (default: all; asked with --interactive)")
    p.add_argument("--split", choices=("train", "test"), default="train")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="local copy of the dataset (a folder; for --dataset csv, the CSV file)")
    p.add_argument("--image-dir", type=Path, default=None, help="for --dataset csv: where relative file paths point")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default BATCH_SIZE)")
    p.add_argument("--categories", type=category_mode, default="labels", metavar="labels|auto[:K]",
                   help="labels: the dataset's own (default); auto: ignore them and group the images into K "
                        "clusters that act as categories (K from the collection's size unless given)")
    p.add_argument("--engine", choices=("single", "ray"), default="single",
                   help="single: this process (default); ray: read, decode and embed on a Ray cluster")
    p.add_argument("--ray-address", default=None,
                   help="with --engine ray: the cluster to join (e.g. 10.0.0.1:6379); default: start one here")
    p.add_argument("--ray-actors", type=positive_int, default=None,
                   help="with --engine ray: embedding actors (default: one per GPU, else one per node)")
    p.set_defaults(func=cmd_populate)
    p = sub.add_parser("recluster", help=cmd_recluster.__doc__)
    p.add_argument("--k", type=at_least_two, default=None, help="clusters (default: from the collection's size)")
    p.set_defaults(func=cmd_recluster)
    p = sub.add_parser("train-projection", help=cmd_train_projection.__doc__)
    p.add_argument("--dim", type=positive_int, default=256, help="dimension of the projected vectors (256)")
    p.add_argument("--epochs", type=positive_int, default=30, help="at most (training stops early; 30)")
    p.add_argument("--kind", choices=("mlp", "linear"), default="mlp",
                   help="mlp: two layers (default, the better measured); linear: one matrix")
    p.add_argument("--max-vectors", type=positive_int, default=100_000,
                   help="stored vectors trained on, drawn at random when there are more (100,000)")
    p.set_defaults(func=cmd_train_projection)
    p = sub.add_parser("evaluate", help=cmd_evaluate.__doc__)
    p.add_argument("--queries", type=positive_int, default=1000, help="held-out query images, balanced by class")
    p.add_argument("--k", type=positive_int, default=10)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="also write a page to look at: DIR/index.html (sample queries and results, plots)")
    p.add_argument("--samples", type=positive_int, default=12, help="sample queries shown by --report")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="where queries come from (default: the collection's own dataset)")
    p.add_argument("--split", choices=("train", "test"), default="test")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--image-dir", type=Path, default=None)
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("reembed", help=cmd_reembed.__doc__)
    p.add_argument("--model", required=True, help="the model to compute vectors of (resnet50, resnet18, "
                   "efficientnet_lite0, efficientnet_lite2)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default BATCH_SIZE)")
    p.set_defaults(func=cmd_reembed)
