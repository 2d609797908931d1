"""Several examples at once: which strategy retrieves better, measured on a labelled collection (Fashion-MNIST).

Each trial picks a class and some of its stored images as positive examples, and measures precision@10 (the share of
the 10 results, examples left out, of that class). With negatives, the trial first searches with the positives,
takes the first result of another class as the negative ("not like this", as a person would mark it), and measures
precision@10 again (beside the same trials' precision without it) and how the share of the negative's class
among the results changed. The baseline, in the same run: searching
with the first positive alone.

    DATA_DIR=/tmp/p1 MODEL_NAME=efficientnet_lite0 python bench/examples.py --json bench/results/examples.json
"""
import argparse
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa
from common import machine, write_json

from backend.search.examples import NEGATIVE_WEIGHT  # noqa: E402 - bench/common.py puts the project on the path
from backend.service.image_search import ImageSearch  # noqa: E402
from backend.storage.tables import Embedding, Image  # noqa: E402


def labelled(search: ImageSearch) -> dict[int, int]:
    """image id -> category id of every image with a vector of the model."""
    with search.sessions() as s:
        return dict(s.execute(sa.select(Image.id, Image.category_id).join(Embedding, Embedding.image_id == Image.id)
                              .where(Embedding.model_name == search.embedder.name,
                                     Image.category_id.is_not(None))).all())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--positives", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--weights", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    parser.add_argument("--exhaustive", action="store_true", help="search every category (default: two-stage)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    search = ImageSearch.open(load_model=False)
    category_of = labelled(search)
    members: dict[int, list[int]] = {}
    for image_id, cat in sorted(category_of.items()):  # in id order: the same trials on every run
        members.setdefault(cat, []).append(image_id)
    rng = np.random.default_rng(0)
    use_prototypes = not args.exhaustive

    def run(positives, negatives=(), **kwargs):
        started = time.perf_counter()
        hits = search.search_examples(positives, list(negatives), 10, use_prototypes=use_prototypes, **kwargs).results
        return [category_of.get(h.image_id) for h in hits], (time.perf_counter() - started) * 1000

    rows = []
    for p in args.positives:
        scores: dict[tuple, list] = {}
        for _ in range(args.trials):
            target = int(rng.choice(sorted(members)))
            positives = [int(i) for i in rng.choice(members[target], p, replace=False)]
            first, ms = run(positives[:1])
            scores.setdefault(("single (baseline)", 0, "-"), []).append((np.mean(np.equal(first, target)), None, ms))
            plain = {}
            for strategy in ("mean", "max"):
                cats, ms = run(positives, strategy=strategy)
                plain[strategy] = cats
                scores.setdefault((strategy, 0, "-"), []).append((np.mean(np.equal(cats, target)), None, ms))
            # "Not like this": the first result of another class in the mean search.
            hits = search.search_examples(positives, [], 10, use_prototypes=use_prototypes).results
            wrong = next((h.image_id for h in hits if category_of.get(h.image_id) != target), None)
            if wrong is None:
                continue
            unwanted = category_of[wrong]
            for strategy in ("mean", "max"):
                before = (np.mean(np.equal(plain[strategy], target)), np.mean(np.equal(plain[strategy], unwanted)))
                for weight in args.weights:
                    cats, ms = run(positives, [wrong], strategy=strategy, negative_weight=weight)
                    after = (np.mean(np.equal(cats, target)), np.mean(np.equal(cats, unwanted)))
                    scores.setdefault((strategy, 1, weight), []).append((after[0], before[0], after[1] - before[1], ms))
        for (strategy, negatives, weight), values in scores.items():
            with_negative = negatives > 0
            rows.append({"positives": p if strategy != "single (baseline)" else 1, "strategy": strategy,
                         "negatives": negatives, "weight": weight, "trials": len(values),
                         "precision_at_10": round(float(np.mean([v[0] for v in values])), 4),
                         # With a negative: the same trials searched with the positives alone, and the change.
                         "precision_without_negative": round(float(np.mean([v[1] for v in values])), 4)
                         if with_negative else None,
                         "negative_class_change": round(float(np.mean([v[2] for v in values])), 4)
                         if with_negative else None,
                         "ms_per_search": round(float(np.median([v[-1] for v in values])), 2)})
    print(f"{'pos':>3} {'strategy':<18} {'neg':>3} {'weight':>6} {'trials':>6} {'P@10':>7} {'before':>7} "
          f"{'neg class':>9} {'ms':>6}")
    for r in rows:
        before = f"{r['precision_without_negative']:.4f}" if r["negatives"] else "-"
        change = f"{r['negative_class_change']:+.3f}" if r["negatives"] else "-"
        print(f"{r['positives']:>3} {r['strategy']:<18} {r['negatives']:>3} {str(r['weight']):>6} {r['trials']:>6} "
              f"{r['precision_at_10']:>7.4f} {before:>7} {change:>9} {r['ms_per_search']:>6.2f}")
    result = {"machine": machine(), "model": search.embedder.name, "images": len(category_of),
              "two_stage": use_prototypes, "default_weight": NEGATIVE_WEIGHT, "rows": rows}
    if args.json:
        write_json(args.json, result)
    search.close()


if __name__ == "__main__":
    main()
