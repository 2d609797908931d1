"""Request and response schemas of the REST API (they become the OpenAPI docs)."""
import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from backend.embedding.query_edits import QueryEdit
from backend.search.duplicates import DEFAULT_THRESHOLD as DUPLICATE_THRESHOLD
from backend.search.examples import DEFAULT_STRATEGY, MAX_EXAMPLES, NEGATIVE_WEIGHT
from backend.service.export import MAX_ROWS
from backend.service.requests import SearchRequest, default_limit, default_top_categories, default_use_prototypes
from backend.service.results import MAX_DEPTH
from backend.storage import filters
from backend.storage.filters import Condition

_CONTROL = r"\x00-\x1f\x7f"  # NUL and the other control characters: never part of a name imsrc stores
CONTROL_CHARACTERS = re.compile(f"[{_CONTROL}]")
MAX_INTEGER, MAX_BIGINT = 2**31 - 1, 2**63 - 1  # PostgreSQL's integer and bigint
# A category name as stored: printable text (no NUL or other control characters).
CATEGORY_PATTERN = f"^[^{_CONTROL}]*$"


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
    metadata: dict = Field(default_factory=dict, description="what is stored about the image (filterable)")


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


StoredId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class SearchOptions(BaseModel):
    """What shapes a search besides its examples, its filter and its page: one declaration for the query string
    (api.deps.query_model) and the JSON body, turned into the service's SearchRequest in one place."""

    use_prototypes: bool = Field(default_factory=default_use_prototypes,
                                 description="two-stage search; false searches every category (default "
                                 "USE_PROTOTYPE_FILTERING)")
    prototype_limit: int = Field(default_factory=default_top_categories, ge=1, le=10,
                                 description="categories searched after the prototype stage (default PROTOTYPE_LIMIT)")
    category: str | None = Field(None, max_length=200, pattern=CATEGORY_PATTERN, description="only this category "
                                 "(name)")
    min_score: float | None = Field(None, ge=-1, le=1, description="leave out results scoring less")
    strategy: Literal["mean", "max"] = Field(DEFAULT_STRATEGY, description="how several examples combine (see "
                                             "docs/searching.md): mean, or max")
    negative_weight: float = Field(NEGATIVE_WEIGHT, ge=0, le=2, description="how much the negative examples count "
                                   "against a result")
    collapse_duplicates: bool = Field(False, description="leave out results that are near-duplicates of a result "
                                      "ranked before them")

    def conditions(self) -> list[Condition]:
        """The metadata filter this form of the options carries (none here)."""
        return []

    def request(self, limit: int, offset: int = 0, where: list[Condition] = (), edit: QueryEdit | None = None
                ) -> SearchRequest:
        """The SearchRequest of these options for one page, with more conditions and a region edit if given."""
        return SearchRequest(k=limit, offset=offset, min_score=self.min_score, use_prototypes=self.use_prototypes,
                             top_categories=self.prototype_limit, category=self.category,
                             where=(*self.conditions(), *where), strategy=self.strategy,
                             negative_weight=self.negative_weight, edit=edit,
                             collapse=DUPLICATE_THRESHOLD if self.collapse_duplicates else None)


class QueryOptions(SearchOptions):
    """SearchOptions in a query string, with the filter as `filter` terms."""

    terms: list[Annotated[str, Field(max_length=700)]] | None = Field(
        None, alias="filter", max_length=filters.MAX_CONDITIONS, description=filters.QUERY_SYNTAX)

    def conditions(self) -> list[Condition]:
        return filters.from_query(self.terms)


class ExamplesIn(SearchOptions):
    """A search by stored images: more like the positives, less like the negatives."""

    positive_ids: list[StoredId] = Field(min_length=1, max_length=MAX_EXAMPLES,
                                         description="stored images to look like")
    negative_ids: list[StoredId] = Field([], max_length=MAX_EXAMPLES, description="stored images not to look like")
    filter: dict | None = Field(None, description='metadata conditions, all of which must hold: {"colour": "red", '
                                '"year": {"gte": 2000, "lt": 2010}, "tags": {"in": ["a", "b"]}, "signed": '
                                '{"exists": true}}')
    limit: int = Field(default_factory=default_limit, ge=1, le=50,
                       description="number of results (one page; default DEFAULT_SEARCH_LIMIT)")
    offset: int = Field(0, ge=0, le=MAX_DEPTH - 50, description="results to skip")

    def conditions(self) -> list[Condition]:
        return filters.from_json(self.filter) if self.filter is not None else []


class ExportExamplesIn(ExamplesIn):
    """ExamplesIn as a file: more results, from the first."""

    limit: int = Field(100, ge=1, le=MAX_ROWS, description="number of results in the file")
    offset: Literal[0] = 0


class MetadataValue(BaseModel):
    value: str
    images: int


class MetadataKey(BaseModel):
    key: str
    images: int = Field(description="images that have this key")
    types: list[str] = Field(description="JSON types of its values: string, number, boolean, null, object, array")
    values: list[MetadataValue] = Field(description="its most common text and true/false values, most common first")
    more_values: bool = Field(description="whether it has more distinct values than listed")
    min: float | None = Field(description="its smallest number, if it has numbers")
    max: float | None


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


class ServedCollection(BaseModel):
    name: str
    model: str
    index_vectors: int
    memory_bytes: int


class EngineOut(BaseModel):
    runtime: str = Field(description="'openvino' or 'torch': what runs the model's network")
    precision: str = Field(description="'fp32' or 'bf16'")
    why: str = Field(description="what was measured on this machine (and when, if it was stored), or the setting")


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
    history: bool = Field(False, description="whether this process records searches (HISTORY_ENABLED)")
    history_note: str | None = Field(None, description="why the caller of this request cannot read the search "
                                     "history (recording is off, or reading it needs write access), or null when "
                                     "it can; analytics are open to everyone either way")
    collection: str = Field("default", description="the collection these counts and this index are of")
    engine: EngineOut | None = Field(None, description="the engine the model runs on in this process")
    served_collections: list[ServedCollection] = Field(
        default_factory=list, description="the collections this process has loaded, with their indexes' memory")


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
