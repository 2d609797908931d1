"""Search results as files to download: CSV, JSON, or a ZIP of the result images with a manifest; bounded in size."""
import csv
import io
import json
import tempfile
import unicodedata
import zipfile
from typing import BinaryIO

import sqlalchemy as sa

from backend.storage.tables import Image

FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json", "zip": "application/zip"}
MAX_ROWS = 1000  # results one export holds: as deep as a search can page
ZIP_MAX_IMAGES = 200
ZIP_MAX_BYTES = 64 * 1024 * 1024  # image bytes one ZIP holds; results past it are listed in the manifest only
SPOOL_BYTES = 8 * 1024 * 1024  # a ZIP this large moves from memory to a temporary file
FORMULA_STARTS = ("=", "+", "-", "@")
_SKIPPED = {"Zs", "Cc", "Cf", "Zl", "Zp"}  # spaces, control and format (zero-width) characters
COLUMNS = ("rank", "image_id", "score", "category", "category_id", "file_name", "image_url", "metadata")
_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}


def rows(results: list[dict]) -> list[dict]:
    """The exported fields of each result (a search response's results, with image URLs)."""
    return [{c: hit.get(c) for c in COLUMNS} for hit in results]


def to_csv(results: list[dict]) -> bytes:
    """One row per result, every field quoted (a `;` in a value splits no cell where `;` is the separator);
    metadata as a JSON object in its column; a cell a spreadsheet would run as a formula gets a leading apostrophe."""
    out = io.StringIO()
    writer = csv.DictWriter(out, COLUMNS, quoting=csv.QUOTE_ALL)
    writer.writeheader()
    for row in rows(results):
        row["metadata"] = json.dumps(row["metadata"] or {}, ensure_ascii=False)
        writer.writerow({k: "'" + v if isinstance(v, str) and runs_as_formula(v) else v for k, v in row.items()})
    return out.getvalue().encode()


def runs_as_formula(text: str) -> bool:
    """Whether a spreadsheet could read text as a formula: it starts with a tab or CR, or its first visible
    character (past spaces, zero-width and control characters, which spreadsheets skip) is =, +, - or @."""
    if text.startswith(("\t", "\r")):
        return True
    visible = next((c for c in text if unicodedata.category(c) not in _SKIPPED), "")
    return visible in FORMULA_STARTS


def to_json(results: list[dict], query: dict) -> bytes:
    """{"query": what was asked, "results": [...]}."""
    return json.dumps({"query": query, "results": rows(results)}, ensure_ascii=False, indent=1).encode()


def to_zip(results: list[dict], query: dict, sessions) -> BinaryIO:
    """A file (rewound) holding the result images (images/<rank>-<id>.<ext>) and manifest.json: the JSON export,
    each result with the file it is in, or "file": null past ZIP_MAX_IMAGES images or ZIP_MAX_BYTES bytes of them.
    Sizes are read first and images one at a time, and the ZIP spills to disk past SPOOL_BYTES: a request holds one
    image in memory at most."""
    listed = rows(results)
    with sessions() as s:
        sizes = dict(s.execute(sa.select(Image.id, sa.func.octet_length(Image.data))
                               .where(Image.id.in_([row["image_id"] for row in listed]))).all())
    total, chosen = 0, []
    for row in listed:
        size = sizes.get(row["image_id"])
        row["file"] = None
        if size is not None and len(chosen) < ZIP_MAX_IMAGES and total + size <= ZIP_MAX_BYTES:
            chosen.append(row)
            total += size
    spool = tempfile.SpooledTemporaryFile(SPOOL_BYTES)
    with zipfile.ZipFile(spool, "w", zipfile.ZIP_STORED) as archive:  # images are compressed already
        for row in chosen:
            with sessions() as s:
                image = s.execute(sa.select(Image.format, Image.data).where(Image.id == row["image_id"])).first()
            if image is None:  # deleted meanwhile
                continue
            row["file"] = f"images/{row['rank']:04d}-{row['image_id']}.{_EXTENSIONS.get(image.format, 'bin')}"
            archive.writestr(row["file"], image.data)
        left_out = sum(row["file"] is None for row in listed)
        manifest = {"query": query, "results": listed, "images_left_out": left_out,
                    "limits": {"images": ZIP_MAX_IMAGES, "bytes": ZIP_MAX_BYTES}}
        archive.writestr("manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1))
    spool.seek(0)
    return spool
