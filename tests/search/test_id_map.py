"""The id -> value map behind the index's look-ups, against a dict doing the same changes."""
import numpy as np
import pytest

from backend.search import id_map
from backend.search.id_map import ABSENT, IdMap


@pytest.mark.parametrize("seal_changes", [4, 4096])
def test_id_map_agrees_with_a_dict_through_random_sets_removes_and_lookups(monkeypatch, seal_changes):
    monkeypatch.setattr(id_map, "SEAL_CHANGES", seal_changes)  # changes both gathered in the dict and merged
    rng = np.random.default_rng(0)
    ids_map, reference = IdMap(), {}
    for step in range(1000):
        n = int(rng.choice([1, 3, 100, 5000]))  # single changes, small batches, and bulk ones past SEAL_CHANGES
        ids = rng.integers(0, 20_000, n)
        action = rng.integers(4)
        if action < 2:
            values = rng.integers(0, 100, n)
            ids_map.set(ids, values)
            reference.update(zip(ids.tolist(), values.tolist()))  # an id given twice keeps its last value
        elif action == 2:
            removed, had = ids_map.remove(ids)
            expected = sorted(set(ids.tolist()) & set(reference))
            assert removed.tolist() == expected and had.tolist() == [reference.pop(i) for i in expected]
        else:
            assert ids_map.get(ids).tolist() == [reference.get(i, ABSENT) for i in ids.tolist()]
        assert len(ids_map) == len(reference)
        if step % 300 == 0:
            ids_map.seal()
    keys, values = ids_map.items()
    assert keys.tolist() == sorted(reference) and values.tolist() == [reference[i] for i in sorted(reference)]
    assert (5 in ids_map) == (5 in reference) and ids_map.keys().tolist() == sorted(reference)


def test_reading_every_item_leaves_the_map_as_it_was():
    # A sync reads items() without the index's lock while searches call get(): it must not seal on the way.
    ids_map = IdMap()
    ids_map.set(np.arange(10), np.arange(10))
    ids_map.set([20], [5])
    pending = dict(ids_map._changes)
    assert ids_map.items()[0].tolist() == list(range(10)) + [20] and ids_map._changes == pending


def test_negative_values_and_mismatched_lengths_are_refused():
    with pytest.raises(ValueError):
        IdMap().set([1, 2], [-1, 5])
    with pytest.raises(ValueError):
        IdMap().set([1, 2], [7])


def test_an_empty_map_answers_absent():
    assert IdMap().get(np.array([1, 2])).tolist() == [ABSENT, ABSENT] and len(IdMap()) == 0 and 3 not in IdMap()
