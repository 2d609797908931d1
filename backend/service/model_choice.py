"""Which embedding model a command uses: the collection's own when one was recorded for it (created with a model,
or switched after a re-embed); else MODEL_NAME when it is set; else the model the database's vectors
were made with (the one a populate chose last); else the default, resnet50, when its weights can be had
here, and an offline model when they cannot. What a demo or a populate chose therefore stays chosen."""
import logging
from dataclasses import dataclass

from sqlalchemy.orm import sessionmaker

from backend.errors import ModelUnavailable
from backend.storage import images as image_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """A model name and, for a person, why it was chosen."""

    name: str
    source: str  # "collection", "MODEL_NAME", "database", "default" or "offline fallback"
    reason: str

    def describe(self) -> str:
        """One line: the model and why."""
        return f"model {self.name}: {self.reason}"


def choose_model(sessions: sessionmaker, quiet: bool = False) -> ModelChoice:
    """The model to use (see the module docstring); unless quiet, says which and why in the log."""
    from backend.config import settings
    from backend.storage.collections import recorded_model

    with sessions() as s:
        recorded = recorded_model(s)
    if recorded:  # created with a model, or switched to one (backend.pipeline.reembed): the collection's own choice
        choice = ModelChoice(recorded, "collection", "the collection's model")
        if not quiet:
            log.info("%s", choice.describe())
        return choice
    if settings.model_name:
        return ModelChoice(settings.model_name, "MODEL_NAME", "set by MODEL_NAME")  # chosen by the user: no news
    with sessions() as s:
        stored = image_store.models_with_vectors(s)
    if stored:
        name, count = stored[0]
        choice = ModelChoice(name, "database", f"the model of the {count:,} {name} vectors in the database "
                                               "(MODEL_NAME is unset; set it to use another)")
    else:
        from backend.embedding.models import DEFAULT_MODEL, OFFLINE_MODELS, get_embedder

        problem = get_embedder(DEFAULT_MODEL).weights_problem()
        choice = ModelChoice(DEFAULT_MODEL, "default", "the default (MODEL_NAME is unset)") if problem is None else \
            ModelChoice(OFFLINE_MODELS[0], "offline fallback",
                        f"the default {DEFAULT_MODEL} cannot be used here ({problem}), and {OFFLINE_MODELS[0]}'s "
                        "weights ship with imsrc (MODEL_NAME is unset; set it to use another)")
    if not quiet:
        log.info("%s", choice.describe())
    return choice


def load_embedder(choice: ModelChoice, sessions: sessionmaker, load: bool = True):
    """The chosen model's embedder, loaded unless `load` is False; a derived model's (backend.embedding.projection) is its
    base's with the head in use. If it cannot be had, the error also names the models the database has vectors of,
    and how to switch to them."""
    from backend.embedding.models import get_embedder
    from backend.embedding.projection import ProjectedEmbedder, base_of, is_derived
    from backend.storage.heads import require_head

    try:
        if is_derived(choice.name):
            with sessions() as s:
                head = require_head(s, choice.name)
            embedder = ProjectedEmbedder(get_embedder(base_of(choice.name)), head)
        else:
            embedder = get_embedder(choice.name)
        return embedder.load() if load else embedder
    except ModelUnavailable as exc:
        with sessions() as s:
            others = [(m, n) for m, n in image_store.models_with_vectors(s) if m != choice.name]
        if not others:
            raise
        raise ModelUnavailable(f"{exc}\n{_how_to_switch(others)}") from None


def unserved_notice(vectors: dict[str, int], model: str) -> str | None:
    """When `model` has no vectors but other models do, a message saying so and how to switch; else None."""
    others = sorted(((m, n) for m, n in vectors.items() if m != model and n), key=lambda mn: -mn[1])
    if vectors.get(model) or not others:
        return None
    return (f"the database holds no {model} vectors, so searches with {model} find nothing. "
            + _how_to_switch(others))


def _how_to_switch(others: list[tuple[str, int]]) -> str:
    from backend.embedding.models import OFFLINE_MODELS

    held = ", ".join(f"{m} ({n:,} vectors{'; works offline' if m in OFFLINE_MODELS else ''})" for m, n in others)
    return (f"The database holds vectors of {held}. To use them, unset MODEL_NAME (in .env or the environment: "
            f"imsrc then uses the database's model) or set MODEL_NAME={others[0][0]}.")
