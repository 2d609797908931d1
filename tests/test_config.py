"""Configuration: every setting is documented, and the database fields combine as the seed's did."""
from pathlib import Path

from backend.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def _is_field(line: str) -> bool:
    word = line.lstrip("# ").split("=", 1)[0]
    return "=" in line and word.isupper() and " " not in word


def test_every_setting_is_in_env_example_with_a_comment():
    lines = (ROOT / ".env.example").read_text().splitlines()
    for field in Settings.model_fields:
        name = field.upper()
        at = next((i for i, line in enumerate(lines) if line.lstrip("# ").startswith(name + "=")), None)
        assert at is not None, f"{name} is not in .env.example"
        above = next(line for line in reversed(lines[:at]) if not _is_field(line))  # a group shares one comment
        assert above.startswith("# ") and not above.startswith("# ---"), f"{name} has no comment of its own"


def test_database_url_from_fields_and_precedence(monkeypatch):
    s = Settings(_env_file=None, db_host="db.example", db_port=6543, db_name="pics", db_user="me", db_password="p@ss")
    assert s.external_database_url == "postgresql+psycopg2://me:p%40ss@db.example:6543/pics"
    s = Settings(_env_file=None, database_url="postgresql+psycopg2://x@y/z", db_host="ignored")
    assert s.external_database_url == "postgresql+psycopg2://x@y/z"
    assert Settings(_env_file=None).external_database_url is None  # the embedded server
    monkeypatch.setenv("MODEL_NAME", "efficientnet_lite2")
    assert Settings(_env_file=None).model_name == "efficientnet_lite2"
