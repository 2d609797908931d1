"""`evaluate --report DIR`: the evaluation as a page people can look at, one self-contained HTML file and its plots.

The page shows sample queries with their top-k results (a green border for a result of the query's category, red
for another, the score under each), then three plots (matplotlib): precision@k and recall against exhaustive
versus P, stage latency versus P, and each category's precision. Images are inlined as data URIs, so the file can
be mailed or opened anywhere; the plots are also written beside it as PNG files.
"""
import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path

import sqlalchemy as sa

from backend.storage.tables import Image

THUMBNAIL = 96  # px, the longer side of every picture on the page
PLOTS = {"quality": "precision and recall against exhaustive, by P",
         "latency": "stage latency, by P", "categories": "precision of each category"}


def write_report(report: dict, query_bytes: Mapping[int, bytes], sessions, directory: Path) -> Path:
    """Write DIR/index.html (and DIR/<plot>.png) for an evaluate() report; query_bytes maps each sample's "query"
    position to its image, and the results' images are read from the database. Returns the page's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = {name: _plot(name, report) for name in PLOTS}
    for name, png in plots.items():
        (directory / f"{name}.png").write_bytes(png)
    ids = sorted({hit["image_id"] for sample in report["samples"] for hit in sample["hits"]})
    with sessions() as s:
        stored = dict(s.execute(sa.select(Image.id, Image.data).where(Image.id.in_(ids))).all()) if ids else {}
    page = directory / "index.html"
    page.write_text(_page(report, query_bytes, stored, plots), encoding="utf-8")
    return page


def _thumbnail(data: bytes | None) -> str:
    """A data URI of a small PNG of the image, or of nothing when it is gone."""
    from PIL import Image as PILImage

    from backend.embedding.decode import decode

    buffer = io.BytesIO()
    if data is None:
        PILImage.new("RGB", (THUMBNAIL, THUMBNAIL), (230, 230, 230)).save(buffer, "PNG")
    else:
        picture = decode(data).image.convert("RGB")
        picture.thumbnail((THUMBNAIL, THUMBNAIL))
        picture.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _page(report: dict, query_bytes: Mapping[int, bytes], stored: dict, plots: dict) -> str:
    k, esc = report["k"], html.escape
    configs = report["configurations"]
    judged = "the dataset's labels (the categories are clusters)" if report.get("relevance", "").startswith("label") \
        else "the query's category"
    rows = "".join(
        f"<tr><td>{esc(name)}</td><td>{r[f'precision@{k}']:.4f}</td><td>{r[f'map@{k}']:.4f}</td>"
        f"<td>{r[f'recall_vs_exhaustive@{k}']:.4f}</td><td>{r['prototype_ms']['p50']:.3f}</td>"
        f"<td>{r['faiss_ms']['p50']:.3f}</td></tr>" for name, r in configs.items())
    samples = []
    for sample in report["samples"]:
        hits = "".join(
            f'<figure class="{"hit" if hit["relevant"] else "miss"}"><img alt="{esc(str(hit["category"]))}" '
            f'src="{_thumbnail(stored.get(hit["image_id"]))}"><figcaption>{hit["score"]:.3f}<br>'
            f'{esc(str(hit["category"]))}</figcaption></figure>' for hit in sample["hits"])
        samples.append(f'<div class="row"><figure class="query"><img alt="query" '
                       f'src="{_thumbnail(query_bytes[sample["query"]])}"><figcaption>query<br>'
                       f'{esc(sample["category"])}</figcaption></figure>{hits}</div>')
    confidence = report.get("confidence") or {}
    flagged = (f"<p>\"No close match\" (best prototype similarity under {confidence['threshold']:.4f}) flags "
               f"{confidence['false_alarm_rate']:.1%} of these held-out queries.</p>"
               if confidence.get("false_alarm_rate") is not None else "")
    figures = "".join(f'<figure class="plot"><img alt="{esc(title)}" src="data:image/png;base64,'
                      f'{base64.b64encode(png).decode()}"><figcaption>{esc(title)}</figcaption></figure>'
                      for (name, png), title in zip(plots.items(), PLOTS.values()))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>imsrc evaluation: {esc(report['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; }}
.row {{ display: flex; gap: .4rem; margin: .6rem 0; align-items: flex-start; }}
figure {{ margin: 0; text-align: center; font-size: .75rem; }}
figure img {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; object-fit: contain; border: 4px solid transparent; }}
.query img {{ border-color: #333; }} .hit img {{ border-color: #1f9d3a; }} .miss img {{ border-color: #d3302f; }}
.plot img {{ width: auto; height: auto; max-width: 100%; border: 0; }}
</style></head><body>
<h1>imsrc evaluation</h1>
<p>{esc(report['model'])}, {esc(report['index_type'])} index, {report['indexed_images']:,} images in
{report['categories']} categories; {report['queries']:,} held-out queries (none of them in the index); relevance by
{esc(judged)}; k = {k}.</p>
<table><tr><th>search</th><th>precision@{k}</th><th>mAP@{k}</th><th>recall vs exhaustive</th>
<th>stage 1 p50 ms</th><th>FAISS p50 ms</th></tr>{rows}</table>
{flagged}
<h2>Sample queries ({esc(report['sample_config'])}): green, relevant ({esc(judged)}); red, not</h2>
{''.join(samples) or '<p>No samples were asked for.</p>'}
<h2>Plots</h2>
{figures}
</body></html>
"""


def _plot(name: str, report: dict) -> bytes:
    """One of PLOTS as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    from matplotlib import pyplot as plt

    k, configs = report["k"], report["configurations"]
    staged = [(n, r) for n, r in configs.items() if n != "exhaustive"]
    labels = [n.removeprefix("P=") for n, _ in staged]
    figure, axes = plt.subplots(figsize=(7, 3.6), dpi=100)
    if name == "quality":
        axes.plot(labels, [r[f"precision@{k}"] for _, r in staged], "o-", label=f"precision@{k}")
        axes.plot(labels, [r[f"recall_vs_exhaustive@{k}"] for _, r in staged], "s-",
                  label=f"recall@{k} against exhaustive")
        axes.axhline(configs["exhaustive"][f"precision@{k}"], color="grey", linestyle="--",
                     label=f"exhaustive precision@{k}")
        axes.set_xlabel("P: categories searched after the prototype stage")
        axes.set_ylim(0, 1.02)
    elif name == "latency":
        stage1 = [r["prototype_ms"]["p50"] for _, r in staged]
        axes.bar(labels, stage1, label="stage 1 (prototypes), p50")
        axes.bar(labels, [r["faiss_ms"]["p50"] for _, r in staged], bottom=stage1, label="stage 2 (FAISS), p50")
        axes.axhline(configs["exhaustive"]["faiss_ms"]["p50"], color="grey", linestyle="--",
                     label="exhaustive FAISS, p50")
        axes.set_xlabel("P: categories searched after the prototype stage")
        axes.set_ylabel("ms per query")
    else:
        chosen = report["sample_config"]
        names = list(configs["exhaustive"][f"precision@{k}_by_category"])
        positions = range(len(names))
        for offset, config in ((-0.2, "exhaustive"), (0.2, chosen)):
            values = configs[config][f"precision@{k}_by_category"]
            axes.bar([p + offset for p in positions], [values[n] for n in names], width=0.4, label=config)
        axes.set_xticks(list(positions), names, rotation=30, ha="right")
        axes.set_ylabel(f"precision@{k}")
        axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title(PLOTS[name])
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
