"""SearchRequest: what one search asks for, the same from every entry point (form, query string, JSON, Python API,
CLI, history's "run again"), with the server's search defaults in one place."""
from dataclasses import asdict, dataclass, field, fields

from backend.config import settings
from backend.embedding.query_edits import QueryEdit
from backend.search.examples import DEFAULT_STRATEGY, NEGATIVE_WEIGHT, STRATEGIES, InvalidExamples
from backend.service.results import MAX_DEPTH
from backend.storage.filters import Condition


def default_limit() -> int:
    """Results per page when a request names none (DEFAULT_SEARCH_LIMIT)."""
    return settings.default_search_limit


def default_top_categories() -> int:
    """Categories stage 1 keeps when a request names none (PROTOTYPE_LIMIT)."""
    return settings.prototype_limit


def default_use_prototypes() -> bool:
    """Whether stage 1 runs when a request does not say (USE_PROTOTYPE_FILTERING)."""
    return settings.use_prototype_filtering


def default_rerank() -> int:
    """Candidates per result a compressed index re-scores when a request names none (COMPRESSED_RERANK)."""
    return settings.compressed_rerank


@dataclass(frozen=True)
class SearchRequest:
    """A page of a ranking: ranks offset+1 .. offset+k of the images scoring min_score or more (in `category`, whose
    metadata match `where`), two-stage over the top_categories closest categories unless use_prototypes is off;
    several examples combine by `strategy` (negatives weighted by negative_weight); `edit` crops, rotates or flips
    each positive image first; `collapse`, a similarity, leaves out results that alike to one ranked before;
    `rerank`, a compressed index's candidates re-scored per result."""

    k: int = field(default_factory=default_limit)
    offset: int = 0
    min_score: float | None = None
    use_prototypes: bool = field(default_factory=default_use_prototypes)
    top_categories: int = field(default_factory=default_top_categories)
    category: str | int | None = None
    where: tuple[Condition, ...] = ()
    strategy: str = DEFAULT_STRATEGY
    negative_weight: float = NEGATIVE_WEIGHT
    edit: QueryEdit | None = None
    collapse: float | None = None
    rerank: int = field(default_factory=default_rerank)

    def __post_init__(self):
        if self.rerank < 1:
            raise ValueError(f"rerank must be at least 1, not {self.rerank}")
        if self.offset < 0 or self.k < 1 or self.offset + self.k > MAX_DEPTH:
            raise ValueError(f"offset + k must be at most {MAX_DEPTH} (offset {self.offset}, k {self.k})")
        if self.strategy not in STRATEGIES:
            raise InvalidExamples(f"strategy is one of {', '.join(STRATEGIES)}, not {self.strategy!r:.40}")
        object.__setattr__(self, "where", tuple(self.where or ()))

    def to_params(self) -> dict:
        """The request as JSON-able values, as the history keeps it."""
        params = {f.name: getattr(self, f.name) for f in fields(self)}
        params["where"] = [asdict(c) for c in self.where]
        params["edit"] = asdict(self.edit) if self.edit is not None else None
        return params

    @classmethod
    def from_params(cls, params: dict) -> "SearchRequest":
        """A request as to_params() wrote it (the edit is left out: a recorded query's vectors are edited already)."""
        where = tuple(Condition(c["key"], c["op"], tuple(c["value"]) if isinstance(c["value"], list) else c["value"])
                      for c in params.get("where") or [])
        known = {f.name for f in fields(cls)} - {"where", "edit"}
        return cls(**{k: v for k, v in params.items() if k in known}, where=where)
