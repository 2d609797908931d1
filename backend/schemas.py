"""Request and response schemas of the REST API (they become the OpenAPI docs)."""
from datetime import datetime

from pydantic import BaseModel, Field


class Problem(BaseModel):
    """Every error response: what went wrong, in words."""

    detail: str


class SearchHit(BaseModel):
    image_id: int
    score: float = Field(description="higher is more similar: cosine similarity, or 1/(1+L2 distance) for flatl2")
    rank: int
    category: str | None
    category_id: int | None
    file_name: str | None
    image_url: str


class PrototypeMatch(BaseModel):
    category_id: int
    category: str | None
    similarity: float = Field(description="cosine similarity of the query to the category prototype")


class Confidence(BaseModel):
    best_similarity: float = Field(description="the query's cosine similarity to the closest category prototype")
    margin: float = Field(description="best minus second-best prototype similarity: how clearly stage 1 chose")
    threshold: float = Field(description="best similarities below this are unlike the collection: 99% of its own "
                             "images reach it")
    close_match: bool = Field(description="false when the query is unlike every category (the results are then "
                              "only the least unlike images)")


class SearchOut(BaseModel):
    results: list[SearchHit]
    prototypes: list[PrototypeMatch] = Field(description="the categories stage 1 chose, best first")
    timings_ms: dict[str, float]
    use_prototypes: bool
    confidence: Confidence | None = Field(None, description="how sure stage 1 is (none until there are prototypes)")
    offset: int = Field(0, description="results ranked before this page (ranks start at offset + 1)")
    next_offset: int | None = Field(None, description="the offset of the next page; null when no result (scoring "
                                    "min_score or more, within the 1,000 a search can page through) follows")


class UploadOut(BaseModel):
    image_id: int
    duplicate: bool = Field(description="true when these exact bytes were already stored; nothing was added")
    category: str
    image_url: str


class ImageInfo(BaseModel):
    image_id: int
    sha256: str
    width: int
    height: int
    format: str
    category: str | None
    category_id: int | None
    label: int | None
    original_name: str | None
    source_dataset: str | None
    source_split: str | None
    metadata: dict
    created_at: datetime
    image_url: str


class CategoryOut(BaseModel):
    category_id: int
    name: str
    image_count: int
    automatic: bool = Field(False, description="a cluster imsrc made (`--categories auto`), not a label a person gave")


class ImagePage(BaseModel):
    category_id: int
    total: int
    offset: int
    limit: int
    images: list[ImageInfo]


class SyncOut(BaseModel):
    listening: bool = Field(description="whether this process is connected and listening for changes")
    changes_applied: int = Field(description="changes announced by writers (this process or others) applied here")
    resyncs: int = Field(description="full resynchronisations with the database: one per (re)connection")
    last_change_at: str | None = Field(None, description="when the last change applied was committed (database "
                                       "clock, ISO 8601)")
    last_applied_at: str | None = Field(None, description="when it became searchable here (ISO 8601)")
    lag_ms: float | None = Field(None, description="from that commit to its being searchable here")
    error: str | None = Field(None, description="why this process is not listening, while it is not")


class StatusOut(BaseModel):
    images: int
    categories: int
    embeddings: dict[str, int]
    prototypes: dict[str, int]
    model: str
    dim: int
    index_type: str
    index_size: int
    index_source: str = Field(description="how the index came to be: 'snapshot' (loaded from its snapshot at "
                              "start-up), 'rebuilt' (built from PostgreSQL: at start-up with no current snapshot, or "
                              "by a rebuild since), or 'rebuilt: snapshot was <what was wrong>, moved to <file>' "
                              "(start-up found a snapshot it could not trust, set it aside and rebuilt)")
    database: str = Field(description="'embedded' or 'external'")
    notice: str | None = Field(None, description="set when the stored images have no vectors of this model")
    worker: int = Field(description="the id (pid) of the process that answered: with several workers or "
                        "servers, each has its own index")
    sync: SyncOut | None = Field(None, description="live sync with other processes writing to the database")


class HealthOut(BaseModel):
    status: str
    database: bool
    index: bool


class RebuildOut(BaseModel):
    prototypes: int
    indexed_images: int
    seconds: float


class CheckOut(BaseModel):
    ok: bool
    summary: str
    findings: list[str] = Field(description="one line per difference found; none when consistent")
    worker: int = Field(description="the process whose index was checked")


class RefreshOut(BaseModel):
    added: int
    removed: int
    indexed_images: int
