"""Commands on the search index: rebuild, check, duplicates."""
import time

from backend.cli.arguments import similarity_threshold
from backend.search.duplicates import DEFAULT_THRESHOLD as DEFAULT_DUPLICATE_THRESHOLD


def cmd_rebuild(args) -> int:
    """Recompute the prototypes of MODEL_NAME from PostgreSQL, rebuild its index and snapshot it."""
    from backend.service.image_search import ImageSearch

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

    from backend.service.image_search import ImageSearch

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
    from backend.pipeline.consistency import check_snapshot
    from backend.service.model_choice import choose_model
    from backend.storage.collections import snapshot_dir_of
    from backend.storage.heads import model_dim
    from backend.storage.sessions import session_factory

    factory = session_factory()
    model = choose_model(factory).name
    with factory() as s:
        dim = model_dim(s, model)
    folder = snapshot_dir_of(settings.snapshot_dir, settings.collection)  # the collection's own snapshots
    report = check_snapshot(factory, model, dim, settings.faiss_index_type, folder)
    for line in report.findings + [f"note: {note}" for note in report.notes]:
        print(line)
    print(report.summary())
    if not report.ok:
        print("to repair: `python -m backend rebuild` (prototypes, index and snapshot, from PostgreSQL); "
              "images without vectors get them when their populate runs again")
    return 0 if report.ok else 1


def register(sub) -> None:
    """Add this module's commands to the parser's subcommands."""
    sub.add_parser("rebuild", help=cmd_rebuild.__doc__).set_defaults(func=cmd_rebuild)
    sub.add_parser("check", help=cmd_check.__doc__).set_defaults(func=cmd_check)
    p = sub.add_parser("duplicates", help=cmd_duplicates.__doc__)
    p.add_argument("--threshold", type=similarity_threshold, default=DEFAULT_DUPLICATE_THRESHOLD,
                   help=f"how alike two images must be (cosine similarity; default {DEFAULT_DUPLICATE_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the groups as JSON")
    p.set_defaults(func=cmd_duplicates)
