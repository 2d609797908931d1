"""Collections: list, create, describe and delete (backend.storage.collections); switch one's model (backend.pipeline.reembed)."""
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from backend.api.deps import COLLECTION_PATTERN, ServedDep, require_write_access
from backend.api.routes.images import WRITE_ERRORS
from backend.api.schemas import CATEGORY_PATTERN, Problem
from backend.errors import InvalidQuery
from backend.pipeline import reembed
from backend.service.catalog import Catalog
from backend.storage import collections

router = APIRouter(tags=["collections"])
Name = Annotated[str, Path(pattern=COLLECTION_PATTERN, max_length=40, description="the collection's name")]
NOT_FOUND = {404: {"model": Problem, "description": "no such collection"}}


class CollectionIn(BaseModel):
    name: str = Field(pattern=COLLECTION_PATTERN, max_length=40,
                      description="1 to 40 lowercase letters, digits and underscores, starting with a letter")
    model: str | None = Field(None, max_length=64, pattern=CATEGORY_PATTERN, description="its embedding model (resnet50, resnet18, "
                              "efficientnet_lite0, efficientnet_lite2); unset: chosen when it is first populated")
    description: str | None = Field(None, max_length=500, pattern=CATEGORY_PATTERN)


class CollectionOut(BaseModel):
    name: str
    model: str | None = Field(description="the model its searches use: the one served, else the one recorded")
    description: str | None
    created_at: datetime
    served: bool = Field(description="whether the process that answered has its index loaded (it loads on the "
                         "collection's first request)")
    index_vectors: int | None = Field(None, description="vectors in the loaded index")
    memory_bytes: int | None = Field(None, description="memory the loaded index holds")


class CollectionDetail(CollectionOut):
    images: int
    categories: int
    embeddings: dict[str, int] = Field(description="vectors per model (a re-embed's new model shows here too)")
    prototypes: dict[str, int]


def _out(info: collections.CollectionInfo, served: ServedDep) -> dict:
    loaded = {search.collection: search for search in served.served()}.get(info.name)
    return dict(name=info.name, description=info.description, created_at=info.created_at,
                model=loaded.embedder.name if loaded is not None else info.model_name, served=loaded is not None,
                index_vectors=len(loaded.index) if loaded is not None else None,
                memory_bytes=loaded.memory_bytes() if loaded is not None else None)


@router.get("/collections", response_model=list[CollectionOut])
def list_collections(served: ServedDep):
    """Every collection, the default first; searches and every other route take `?collection=` to use one."""
    return [CollectionOut(**_out(info, served)) for info in collections.list_collections(served.sessions.engine)]


@router.post("/collections", response_model=CollectionOut, status_code=201,
             responses={**WRITE_ERRORS, 409: {"model": Problem, "description": "the name is taken"}},
             dependencies=[Depends(require_write_access)])
async def create_collection(body: CollectionIn, served: ServedDep):
    """Create an empty collection (populate it with `python -m backend --collection NAME populate`, or upload to it
    with `POST /upload?collection=NAME`)."""
    info = await run_in_threadpool(collections.create_collection, served.sessions.engine, body.name, body.model,
                                   body.description)
    return CollectionOut(**_out(info, served))


@router.get("/collections/{name}", response_model=CollectionDetail, responses=NOT_FOUND)
def describe_collection(name: Name, served: ServedDep):
    """A collection: its model, what it holds, and its index if this process serves it."""
    info = collections.get_collection(served.sessions.engine, name)
    counts = Catalog(served.sessions.sessions(name)).counts()
    return CollectionDetail(**_out(info, served), images=counts["images"], categories=counts["categories"],
                            embeddings=counts["embeddings"], prototypes=counts["prototypes"])


@router.delete("/collections/{name}", status_code=204, response_class=Response, responses={**WRITE_ERRORS, **NOT_FOUND},
               dependencies=[Depends(require_write_access)])
async def delete_collection(name: Name, served: ServedDep, confirm: Annotated[str, Query(
        max_length=40, description="the collection's name again: deleting cannot be undone")]):
    """Delete a collection with its images, vectors, categories, history and decisions (image bytes another
    collection holds stay); every serving process stops serving it. The default collection cannot be deleted."""
    if confirm != name:
        raise InvalidQuery(f"to delete collection {name}, confirm with ?confirm={name}")
    await run_in_threadpool(collections.delete_collection, served.sessions.engine, name, served.snapshot_base)
    await run_in_threadpool(served.forget, name)
    return Response(status_code=204)


class SwitchIn(BaseModel):
    model: str = Field(max_length=64, pattern=CATEGORY_PATTERN, description="a model whose vectors cover the collection (python -m backend "
                       "reembed --model NAME computes them while searches go on)")
    force: bool = Field(False, description="switch even though some images have no vector of the model yet (they "
                        "are not found until they do)")


class SwitchOut(BaseModel):
    collection: str
    model: str
    previous: str = Field(description="the model searches used until now: switching back to it is as quick as "
                          "loading its index, its vectors are kept until dropped")


@router.post("/collections/{name}/model", response_model=SwitchOut,
             responses={**WRITE_ERRORS, **NOT_FOUND, 409: {"model": Problem, "description": "re-embedding with the "
                                                           "model is not finished"}},
             dependencies=[Depends(require_write_access)])
async def switch_model(name: Name, body: SwitchIn, served: ServedDep):
    """Switch a collection to another model in one step: every serving process opens the collection with the new
    model's vectors and index and swaps it in whole (searches under way finish on the old one)."""
    previous = (await run_in_threadpool(served.get, name)).embedder.name

    def switch():
        with served.sessions.sessions(name)() as s, s.begin():
            reembed.switch_model(s, body.model, body.force)

    await run_in_threadpool(switch)
    return SwitchOut(collection=name, model=body.model, previous=previous)
