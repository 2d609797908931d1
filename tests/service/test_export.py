"""CSV exports a spreadsheet opens safely: every field quoted, no cell read as a formula."""
import csv
import io

import pytest

from backend.service.export import to_csv


def _result(file_name: str, metadata: dict | None = None) -> dict:
    return {"rank": 1, "image_id": 7, "score": -0.25, "category": "cats", "category_id": 2, "file_name": file_name,
            "image_url": "/images/7", "metadata": metadata}


@pytest.mark.parametrize("name", ["=1+1", "+1", "-1", "@SUM(A1)", "\t=1", "\r=1", "  =1", "\u200b=1+1",
                                  "\u2060\u00a0=1", "\x01=1", "\ufeff@x"])
def test_a_cell_a_spreadsheet_would_run_gets_an_apostrophe(name):
    row = next(csv.DictReader(io.StringIO(to_csv([_result(name)]).decode())))
    assert row["file_name"] == "'" + name


@pytest.mark.parametrize("name", ["cat.png", "a=1", "x;=1+1", "", "1-2"])
def test_other_cells_are_kept_as_they_are(name):
    row = next(csv.DictReader(io.StringIO(to_csv([_result(name)]).decode())))
    assert row["file_name"] == name


def test_every_field_is_quoted_so_a_semicolon_splits_no_cell():
    text = to_csv([_result("x;=1+1", {"k": "v"})]).decode()
    header, line = text.splitlines()
    assert header.startswith('"rank","image_id"')
    assert line.split('","')[5] == "x;=1+1"  # quoted: where ; is the separator, =1+1 is no cell of its own
    assert line.startswith('"1","7","-0.25"')
