"""Settings for imsrc, read once from the environment and `.env` (or the file IMSRC_ENV_FILE names)."""
import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every field here is documented in `.env.example`."""

    model_config = SettingsConfigDict(env_file=os.environ.get("IMSRC_ENV_FILE", PROJECT_ROOT / ".env"), extra="ignore")

    # Database: DATABASE_URL wins; else DB_HOST selects an external server; else the embedded one.
    database_url: str | None = None
    db_host: str | None = None
    db_port: int = 5432
    db_name: str = "imsrc"
    db_user: str = "postgres"
    db_password: str = ""
    db_timeout: float = Field(2.0, gt=0)
    db_pool_size: int = Field(5, ge=1, le=100)  # connections a process keeps open (one pool for all collections)
    db_pool_overflow: int = Field(10, ge=0, le=100)  # more it may open under load, closed when returned
    data_dir: Path = PROJECT_ROOT / "data"
    embedded_pg_dir: Path | None = None
    embedded_pg_port: int | None = Field(None, ge=1, le=65535)
    # The collection commands and the Python API use when none is named (backend.storage.collections)
    collection: str = Field("default", pattern=r"^[a-z][a-z0-9_]{0,39}$")

    # Embedding model: None lets backend.service.model_choice pick (the database's model, else a default that works here)
    model_name: str | None = None
    model_weights_path: Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(16, ge=1, le=1024)
    embed_precision: Literal["auto", "fp32", "bf16"] = "auto"
    embed_runtime: Literal["auto", "torch", "openvino"] = "auto"

    # Search
    faiss_index_type: Literal["flatip", "flatl2", "fp16", "hnsw", "ivfflat", "ivffp16", "rabitq"] = "flatip"
    index_dir: Path | None = None
    use_prototype_filtering: bool = True
    prototype_limit: int = Field(3, ge=1, le=10)
    prototypes_per_category: int = Field(8, ge=1, le=16)  # at most; fewer in small categories (store.slots_for)
    default_search_limit: int = Field(10, ge=1, le=50)
    compressed_rerank: int = Field(8, ge=1, le=64)  # candidates a result a compressed index re-scores exactly
    served_collections_max: int = Field(16, ge=1, le=1000)  # collections a server keeps open besides its own
    served_idle_seconds: float = Field(900.0, gt=0)  # one nobody asked for in this long is closed
    history_enabled: bool = True  # record every search the API answers (backend.storage.history)
    history_retention_days: int = Field(30, ge=1, le=3650)

    # API
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=1, le=65535)
    api_key: str | None = None
    open_writes: bool = False
    allowed_origins: str = ""
    max_upload_size: int = Field(10 * 1024 * 1024, ge=1)
    body_timeout: float = Field(30.0, gt=0)  # seconds a request's whole body may take to arrive (then 408)
    bodies_in_flight: int = Field(64, ge=1, le=10_000)  # request bodies arriving at once (more: 503)
    embed_workers: int = Field(1, ge=1, le=64)
    queue_size: int = Field(32, ge=0, le=1024)
    query_batch: int = Field(16, ge=1, le=256)

    # Datasets
    cifar10_dir: Path | None = None
    fashion_mnist_dir: Path = Path("/usr/share/datasets/fashion-mnist")
    hub_timeout: float = Field(5.0, gt=0)

    @property
    def origins(self) -> list[str]:
        """ALLOWED_ORIGINS as a list (comma-separated in the setting)."""
        return [o.strip().rstrip("/") for o in self.allowed_origins.split(",") if o.strip()]

    @property
    def pg_data_dir(self) -> Path:
        """Data directory of the embedded PostgreSQL server."""
        return self.embedded_pg_dir or self.data_dir / "postgres"

    @property
    def snapshot_dir(self) -> Path:
        """Where index snapshots are written."""
        return self.index_dir or self.data_dir / "index"

    @property
    def external_database_url(self) -> str | None:
        """The configured server's SQLAlchemy URL, or None when the embedded server is used."""
        if self.database_url:
            return self.database_url
        if self.db_host:
            from sqlalchemy.engine import URL

            return URL.create(
                "postgresql+psycopg2", username=self.db_user, password=self.db_password or None,
                host=self.db_host, port=self.db_port, database=self.db_name,
            ).render_as_string(hide_password=False)
        return None


settings = Settings()


def writes_mode(short: bool = False) -> str:
    """How writes are guarded, in words: for the start-up log, or short for the set-up menu's state line."""
    if settings.api_key:
        return "writes need X-API-Key (API_KEY is set)" if short else \
            "writes need the X-API-Key header (API_KEY is set)"
    if settings.open_writes:
        return "writes open on localhost (OPEN_WRITES, no API_KEY)" if short else \
            "writes are OPEN without a key to requests addressed to localhost (OPEN_WRITES=true, no API_KEY)"
    return "writes closed (no API_KEY)" if short else \
        "writes are closed (no API_KEY; set API_KEY, or OPEN_WRITES=true for a local demo)"
