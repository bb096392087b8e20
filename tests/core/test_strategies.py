"""The metadata update strategies of PROTOCOL.md section 7."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from mesh_core import STRATEGIES, ValidationError
from mesh_core.storage import apply_strategy, deep_merge, merge, replace
from mesh_core.storage._strategies import check_strategy, updater

NON_OBJECTS: list[Any] = [None, "s", "", 0, 3, 1.5, True, [], [1, 2], [{"a": 1}]]


def test_strategy_names() -> None:
    assert STRATEGIES == ("replace", "merge", "deepMerge")


# -- replace --------------------------------------------------------------------


@pytest.mark.parametrize("old", [None, {"a": 1}, [1], "x", 5])
@pytest.mark.parametrize("new", [None, {"b": 2}, [2], "y", 6])
def test_replace_always_stores_new(old: Any, new: Any) -> None:
    assert replace(old, new) == new
    assert apply_strategy("replace", old, new) == new


def test_replace_does_not_keep_old_keys() -> None:
    assert replace({"a": 1, "b": 2}, {"b": 3}) == {"b": 3}


# -- merge ----------------------------------------------------------------------


def test_merge_objects_top_level_new_wins() -> None:
    assert merge({"a": 1, "b": 2}, {"b": 3, "c": 4}) == {"a": 1, "b": 3, "c": 4}


def test_merge_does_not_merge_nested_objects() -> None:
    old = {"p": {"x": 1, "y": 2}, "keep": True}
    new = {"p": {"y": 3}}
    assert merge(old, new) == {"p": {"y": 3}, "keep": True}


def test_merge_empty_objects() -> None:
    assert merge({}, {"a": 1}) == {"a": 1}
    assert merge({"a": 1}, {}) == {"a": 1}


def test_merge_new_null_value_overrides_key() -> None:
    assert merge({"a": 1}, {"a": None}) == {"a": None}


@pytest.mark.parametrize("old", NON_OBJECTS)
def test_merge_old_not_object_gives_new(old: Any) -> None:
    assert merge(old, {"a": 1}) == {"a": 1}


@pytest.mark.parametrize("new", NON_OBJECTS)
def test_merge_new_not_object_gives_new(new: Any) -> None:
    result = merge({"a": 1}, new)
    assert result == new
    assert type(result) is type(new)


def test_merge_arrays_replaced_not_concatenated() -> None:
    assert merge([1, 2], [3]) == [3]
    assert merge({"l": [1, 2]}, {"l": [3]}) == {"l": [3]}


# -- deepMerge ------------------------------------------------------------------


def test_deep_merge_nested_objects() -> None:
    old = {"p": {"x": 1, "y": 2, "q": {"deep": 1, "keep": "k"}}, "top": 0}
    new = {"p": {"y": 3, "q": {"deep": 2, "added": [1]}}, "new": "n"}
    assert deep_merge(old, new) == {
        "p": {"x": 1, "y": 3, "q": {"deep": 2, "keep": "k", "added": [1]}},
        "top": 0,
        "new": "n",
    }


def test_deep_merge_keys_only_in_old_stay() -> None:
    assert deep_merge({"a": 1, "b": {"c": 2}}, {"z": 9}) == {"a": 1, "b": {"c": 2}, "z": 9}


def test_deep_merge_arrays_are_replaced_never_concatenated() -> None:
    assert deep_merge({"l": [1, 2], "n": {"l": [3]}}, {"l": [9], "n": {"l": []}}) == {
        "l": [9],
        "n": {"l": []},
    }


def test_deep_merge_top_level_arrays_replaced() -> None:
    assert deep_merge([1, 2], [3, 4]) == [3, 4]


@pytest.mark.parametrize(
    ("old_value", "new_value"),
    [
        ({"x": 1}, None),  # null on the new side replaces an object
        (None, {"x": 1}),  # null on the old side is replaced by an object
        ({"x": 1}, "s"),
        ("s", {"x": 1}),
        ({"x": 1}, [1]),
        ([1], {"x": 1}),
        ({"x": 1}, 5),
        (5, {"x": 1}),
    ],
)
def test_deep_merge_nested_non_object_on_either_side_takes_new(
    old_value: Any, new_value: Any
) -> None:
    assert deep_merge({"k": old_value, "o": 1}, {"k": new_value}) == {"k": new_value, "o": 1}


@pytest.mark.parametrize("old", NON_OBJECTS)
def test_deep_merge_old_not_object_gives_new(old: Any) -> None:
    assert deep_merge(old, {"a": {"b": 1}}) == {"a": {"b": 1}}


@pytest.mark.parametrize("new", NON_OBJECTS)
def test_deep_merge_new_not_object_gives_new(new: Any) -> None:
    result = deep_merge({"a": {"b": 1}}, new)
    assert result == new
    assert type(result) is type(new)


def test_deep_merge_via_name() -> None:
    assert apply_strategy("deepMerge", {"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_apply_strategy_dispatches_by_name() -> None:
    old = {"a": {"x": 1}, "b": 1}
    new = {"a": {"y": 2}}
    assert apply_strategy("replace", old, new) == {"a": {"y": 2}}
    assert apply_strategy("merge", old, new) == {"a": {"y": 2}, "b": 1}
    assert apply_strategy("deepMerge", old, new) == {"a": {"x": 1, "y": 2}, "b": 1}


# -- unknown strategies ---------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["", "Replace", "MERGE", "deepmerge", "concat", None, 1, ["merge"]]
)
def test_unknown_strategy_is_a_validation_error(name: Any) -> None:
    with pytest.raises(ValidationError) as info:
        apply_strategy(name, {"a": 1}, {"b": 2})
    assert info.value.code == "EINVAL"
    with pytest.raises(ValidationError):
        check_strategy(name)
    with pytest.raises(ValidationError):
        updater(name, {"b": 2})


# -- updater --------------------------------------------------------------------


def test_updater_replace_ignores_old() -> None:
    update = updater("replace", {"n": 1})
    assert update({"old": True}) == {"n": 1}
    assert update(None) == {"n": 1}


def test_updater_merge() -> None:
    update = updater("merge", {"b": {"y": 2}})
    assert update({"a": 1, "b": {"x": 1}}) == {"a": 1, "b": {"y": 2}}
    assert update(None) == {"b": {"y": 2}}


def test_updater_deep_merge() -> None:
    update = updater("deepMerge", {"b": {"y": 2}})
    assert update({"a": 1, "b": {"x": 1}}) == {"a": 1, "b": {"x": 1, "y": 2}}
    assert update("scalar") == {"b": {"y": 2}}


def test_updater_is_reusable() -> None:
    update = updater("merge", {"k": 1})
    assert update({"a": 1}) == {"a": 1, "k": 1}
    assert update({"b": 2}) == {"b": 2, "k": 1}


# -- inputs are never mutated ---------------------------------------------------


@pytest.mark.parametrize("strategy", ["replace", "merge", "deepMerge"])
def test_inputs_not_mutated(strategy: str) -> None:
    old = {"a": {"x": 1, "l": [1]}, "b": 2}
    new = {"a": {"y": 2, "l": [2]}, "c": 3}
    old_copy, new_copy = copy.deepcopy(old), copy.deepcopy(new)
    result = apply_strategy(strategy, old, new)
    assert old == old_copy
    assert new == new_copy
    result_via_updater = updater(strategy, new)(old)
    assert result_via_updater == result
    assert old == old_copy
    assert new == new_copy


def test_merge_result_is_a_new_object() -> None:
    old = {"a": 1}
    new = {"b": 2}
    result = merge(old, new)
    assert result is not old
    assert result is not new
    result["c"] = 3
    assert old == {"a": 1}
    assert new == {"b": 2}


def test_deep_merge_result_does_not_alias_old_nested() -> None:
    old = {"a": {"x": 1}}
    result = deep_merge(old, {"a": {"y": 2}})
    result["a"]["z"] = 3
    assert old == {"a": {"x": 1}}
