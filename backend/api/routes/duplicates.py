"""Near-duplicates: the groups the index finds, and what a person decides about them."""
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend.api.deps import SearchDep, image_urls, require_write_access
from backend.api.routes.images import WRITE_ERRORS
from backend.api.schemas import SearchHit
from backend.search.duplicates import DEFAULT_THRESHOLD
from backend.storage.decisions import MAX_GROUP

router = APIRouter(tags=["duplicates"])


class DuplicateGroup(BaseModel):
    images: list[SearchHit] = Field(description="the group's images by id; `score` is each one's highest "
                                    "similarity to another of the group")


class DecisionIn(BaseModel):
    image_ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(min_length=2, max_length=MAX_GROUP)
    decision: Literal["keep_one", "keep_all", "not_duplicates"] = Field(
        description="keep_one: delete the others; keep_all: they are duplicates, keep them; not_duplicates: they are "
                    "not. Either of the last two keeps the pairs from being offered again")
    keep: int | None = Field(None, ge=1, le=2**63 - 1, description="with keep_one: the image to keep")


class DecisionOut(BaseModel):
    decision: str
    changed: int = Field(description="images deleted (keep_one) or pairs recorded")


@router.get("/duplicates", response_model=list[DuplicateGroup])
async def duplicate_groups(request: Request, search: SearchDep,
                           threshold: Annotated[float, Query(ge=0.5, le=1.0, description="how alike two images must "
                                                             "be (cosine similarity)")] = DEFAULT_THRESHOLD,
                           limit: Annotated[int, Query(ge=1, le=500, description="groups, largest first")] = 100):
    """Groups of near-duplicate images (the same picture re-encoded, resized, lightly cropped or colour-shifted),
    found with the index, leaving out pairs a person already decided about."""
    found, url = await run_in_threadpool(search.duplicate_groups, threshold), image_urls(request)
    return [DuplicateGroup(images=[SearchHit(**vars(hit), image_url=url(hit.image_id))
                                   for hit in group]) for group in found[:limit]]


@router.post("/duplicates/decisions", response_model=DecisionOut, responses=WRITE_ERRORS,
             dependencies=[Depends(require_write_access)])
async def decide(search: SearchDep, body: DecisionIn):
    """Keep one image of a group (the others are deleted), keep all, or say they are not duplicates; the decision
    is stored in PostgreSQL and the group's pairs are not offered again."""
    changed = await run_in_threadpool(search.decide_duplicates, body.image_ids, body.decision, body.keep)
    return DecisionOut(decision=body.decision, changed=changed)
