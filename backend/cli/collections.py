"""Commands on collections and their models: collections, switch-model, drop-model."""
from backend.cli.arguments import collection_name
from backend.cli.prompts import confirmed


def cmd_collections(args) -> int:
    """List, create, describe or delete collections (each with its own model, categories and index)."""
    import json

    from backend.config import settings
    from backend.storage import collections
    from backend.storage import images as image_store
    from backend.storage.sessions import collection_sessions

    registry = collection_sessions()
    if args.action == "create":
        info = collections.create_collection(registry.engine, args.name, args.model, args.description)
        print(f"created collection {info.name} (model: {info.model_name or 'chosen when first populated'}); fill it "
              f"with: python -m backend --collection {info.name} populate ...")
    elif args.action == "delete":
        collections.get_collection(registry.engine, args.name)  # 'not found' before asking
        if not args.yes and not confirmed(f"delete collection {args.name} and all its images? type its name to "
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
                counts = image_store.counts(s)
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


def cmd_switch_model(args) -> int:
    """Make another model the collection's: every serving process swaps to its vectors and index at once."""
    from backend.config import settings
    from backend.pipeline.reembed import switch_model
    from backend.service.model_choice import choose_model
    from backend.storage.sessions import session_factory

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
    from backend.pipeline.reembed import drop_model
    from backend.service.model_choice import choose_model
    from backend.storage.sessions import session_factory

    if not args.yes and not confirmed(f"delete the {args.model} vectors of collection {settings.collection}? "
                                       f"type the model's name to confirm: ", args.model):
        return 1
    factory = session_factory()
    serving = choose_model(factory, quiet=True)  # what every command and server started here uses
    with factory() as s, s.begin():
        dropped = drop_model(s, args.model, serving)
    print(f"dropped {dropped:,} {args.model} vectors from collection {settings.collection}")
    return 0


def register(sub) -> None:
    """Add this module's commands to the parser's subcommands."""
    p = sub.add_parser("collections", help=cmd_collections.__doc__)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="every collection, with its model and size").add_argument(
        "--json", action="store_true", help="as JSON")
    a = actions.add_parser("create", help="an empty collection")
    a.add_argument("name", type=collection_name)
    a.add_argument("--model", default=None, help="its embedding model (default: chosen when it is first populated)")
    a.add_argument("--description", default=None)
    a = actions.add_parser("describe", help="one collection")
    a.add_argument("name", type=collection_name)
    a.add_argument("--json", action="store_true", help="as JSON")
    a = actions.add_parser("delete", help="a collection, its images and vectors (asks to confirm)")
    a.add_argument("name", type=collection_name)
    a.add_argument("--yes", action="store_true", help="do not ask (needed where nobody can answer)")
    p.set_defaults(func=cmd_collections)
    p = sub.add_parser("switch-model", help=cmd_switch_model.__doc__)
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="even though some images lack the model's vectors")
    p.set_defaults(func=cmd_switch_model)
    p = sub.add_parser("drop-model", help=cmd_drop_model.__doc__)
    p.add_argument("model")
    p.add_argument("--yes", action="store_true", help="do not ask (needed where nobody can answer)")
    p.set_defaults(func=cmd_drop_model)
