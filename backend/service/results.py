"""What a search returns: hits, the categories stage 1 chose, timings; and how deep it may page."""
from dataclasses import dataclass, field, fields

MAX_DEPTH = 1000  # how far down the ranking a search can page: offset + k at most


@dataclass
class SearchResult:
    """One hit."""

    image_id: int
    score: float
    rank: int
    category: str | None
    category_id: int | None
    file_name: str | None
    label: int | None
    metadata: dict = field(default_factory=dict)


@dataclass
class SearchResponse:
    """Hits, the categories stage 1 chose with their similarities, and per-stage timings in ms."""

    results: list[SearchResult]
    prototypes: list[dict] = field(default_factory=list)  # {category_id, category, similarity}, best first
    timings_ms: dict[str, float] = field(default_factory=dict)
    use_prototypes: bool = True
    confidence: dict | None = None  # backend.search.confidence.Confidence: is the query like anything stored at all?
    offset: int = 0  # the rank before this page's first result
    next_offset: int | None = None  # the next page's offset; None when nothing (above min_score) follows

    def to_dict(self) -> dict:
        """As plain dicts, for the API's JSON: each hit a new dict (the API adds its URL), the values shared
        (dataclasses.asdict's deep copy of every hit took a tenth of a search's time on the event loop)."""
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["results"] = [dict(vars(hit)) for hit in self.results]
        return body


@dataclass
class AddResult:
    """What add_image did: the image's id, and whether it was already stored."""

    image_id: int
    duplicate: bool
