import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze._filters import path_str, to_predicate


def test_path_str_joins_keys():
    assert path_str(("blocks", 3, "kernel")) == "blocks/3/kernel"
    assert path_str(()) == ""


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        pytest.param("blocks/[3-5]/.*", ("blocks", 4, "lin", "kernel"), True, id="range-in"),
        pytest.param("blocks/[3-5]/.*", ("blocks", 6, "lin", "kernel"), False, id="range-out"),
        pytest.param("head", ("head", "kernel"), False, id="fullmatch-not-prefix"),
        pytest.param(".*kernel", ("a", "b", "kernel"), True, id="suffix"),
        pytest.param("kernel", ("a", "kernel"), False, id="no-search"),
    ],
)
def test_path_regex_fullmatches_the_joined_path(pattern, path, expected):
    assert ff.PathRegex(pattern)(path, None) is expected


def test_path_regex_equality_hash_repr():
    assert ff.PathRegex("a/.*") == ff.PathRegex("a/.*")
    assert ff.PathRegex("a/.*") != ff.PathRegex("b/.*")
    assert hash(ff.PathRegex("a/.*")) == hash(ff.PathRegex("a/.*"))
    assert repr(ff.PathRegex("a/.*")) == "PathRegex('a/.*')"


def test_path_regex_works_with_nnx_state():
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(1)))
    state = nnx.state(model, ff.PathRegex("layers/1/.*"))
    assert {p for p, _ in nnx.to_flat_state(state)} == {
        ("layers", 1, "kernel"),
        ("layers", 1, "bias"),
    }


def test_path_regex_rejects_non_string():
    with pytest.raises(TypeError, match=r"`pattern` must be a regular expression string, got 3"):
        ff.PathRegex(3)  # type: ignore[arg-type]


def test_path_regex_rejects_bad_regex():
    with pytest.raises(ValueError, match=r"`pattern` '\[' is not a valid regular expression"):
        ff.PathRegex("[")


@pytest.mark.parametrize(
    "filter_",
    [nnx.Param, ..., None, True, "tag", [nnx.Param, nnx.BatchStat], ff.PathRegex("x")],
    ids=["type", "ellipsis", "none", "bool", "tag", "list", "regex"],
)
def test_to_predicate_accepts_nnx_filters(filter_):
    assert callable(to_predicate(filter_))


@pytest.mark.parametrize(
    "bad", [3, 2.5, {"a": 1}, [nnx.Param, 3]], ids=["int", "float", "dict", "list"]
)
def test_to_predicate_names_the_argument(bad):
    with pytest.raises(TypeError, match=r"`wrt` must be an NNX filter .* got "):
        to_predicate(bad, "wrt")
