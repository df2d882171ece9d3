import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import flax_freeze as ff
from flax_freeze import linen as ffl
from flax_freeze._filters import path_str, to_predicate
from helpers import param_types


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


# --------------------------------------------------------------------------- PathRegex sep, flags


def test_path_regex_takes_a_compiled_pattern_and_its_flags():
    f = ff.PathRegex(re.compile("HEAD/.*", re.IGNORECASE))
    assert f(("head", "kernel"), None) is True
    assert f(("body", "kernel"), None) is False
    assert f.pattern == "HEAD/.*"
    assert repr(f) == "PathRegex(re.compile('HEAD/.*', re.IGNORECASE))"
    assert ff.PathRegex(re.compile("HEAD/.*"))(("head", "kernel"), None) is False


def test_path_regex_joins_with_sep():
    f = ff.PathRegex(r"blocks\.[0-2]\..*", sep=".")
    assert f(("blocks", 1, "lin", "kernel"), None) is True
    assert f(("blocks", 3, "lin", "kernel"), None) is False
    assert ff.PathRegex("blocks/1/.*", sep=".")(("blocks", 1, "kernel"), None) is False
    assert f.sep == "."
    assert f.join(("blocks", 1)) == "blocks.1"
    assert repr(f) == r"PathRegex('blocks\\.[0-2]\\..*', sep='.')"


def test_path_regex_equality_covers_pattern_flags_and_sep():
    assert ff.PathRegex(re.compile("a/.*")) == ff.PathRegex("a/.*")
    assert hash(ff.PathRegex(re.compile("a/.*"))) == hash(ff.PathRegex("a/.*"))
    assert ff.PathRegex("a.*", sep=".") != ff.PathRegex("a.*")
    assert ff.PathRegex(re.compile("a", re.IGNORECASE)) != ff.PathRegex("a")


def test_path_regex_with_sep_selects_in_a_model():
    model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Linear(2, 2, rngs=nnx.Rngs(1)))
    ff.freeze(model, ff.PathRegex(r"layers\.1\..*", sep="."))
    assert param_types(model) == {
        "layers/0/kernel": "Param",
        "layers/0/bias": "Param",
        "layers/1/kernel": "FrozenParam",
        "layers/1/bias": "FrozenParam",
    }


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        pytest.param(
            lambda: ff.PathRegex(re.compile(b"a/.*")),  # type: ignore[arg-type]
            TypeError,
            r"`pattern` must match text, got a bytes pattern re\.compile\(b'a/\.\*'\)\. Compile "
            r"a str pattern, e\.g\. re\.compile\('a/\.\*'\)\.",
            id="bytes-pattern",
        ),
        pytest.param(
            lambda: ff.PathRegex(None),  # type: ignore[arg-type]
            TypeError,
            r"`pattern` must be a regular expression string, got None\. Pass e\.g\. "
            r"PathRegex\(\"backbone/\.\*\"\), or a pattern compiled with re\.compile\.",
            id="none-pattern",
        ),
        pytest.param(
            lambda: ff.PathRegex("a", sep=1),  # type: ignore[arg-type]
            TypeError,
            r"`sep` must be a string such as \"/\" or \"\.\", got 1\.",
            id="int-sep",
        ),
        pytest.param(
            lambda: ff.PathRegex("a", sep=""),
            ValueError,
            r"`sep` must not be empty: keys joined with \"\" run together\. Pass e\.g\. "
            r"sep=\"/\" \(the default\) or sep=\"\.\"\.",
            id="empty-sep",
        ),
    ],
)
def test_path_regex_rejects_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- nnx.Nothing


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.body = nnx.Linear(2, 2, rngs=rngs)
        self.head = nnx.Linear(2, 1, rngs=rngs)


NOTHING = [
    pytest.param(nnx.Nothing(), id="instance"),
    pytest.param(nnx.Nothing, id="class"),
    pytest.param(False, id="false"),
]


@pytest.mark.parametrize("nothing", NOTHING)
def test_nothing_is_a_no_op_for_freeze_unfreeze_and_freezing(nothing):
    model = ff.freeze(Net(nnx.Rngs(0)), ff.PathRegex("body/.*"))
    before = param_types(model)
    assert ff.freeze(model, nothing) is model
    assert ff.unfreeze(model, nothing) is model
    with ff.freezing(model, nothing) as inner:
        assert inner is model
        assert param_types(model) == before
    assert param_types(model) == before
    tree = {"w": jnp.ones(2)}
    assert ff.freeze(tree, nothing) is tree


@pytest.mark.parametrize("nothing", NOTHING)
def test_nothing_is_a_no_op_for_linen(nothing):
    params = nn.Dense(2).init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    assert ffl.freeze(params, nothing) is params
    frozen = ffl.freeze(params, "kernel")
    assert ffl.unfreeze(frozen, nothing) is frozen
    state = ffl.TrainState.create(apply_fn=None, params=frozen, tx=optax.adam(0.1))
    assert state.freeze(nothing).params is frozen


def test_nothing_class_becomes_nnx_nothing():
    pred = to_predicate(nnx.Nothing)
    assert isinstance(pred, nnx.Nothing)
    assert not nnx.state(Net(nnx.Rngs(0)), pred)


def test_none_still_raises_and_says_what_to_pass():
    with pytest.raises(
        ValueError,
        match=r"`filter` None passed to freeze\(\) matched no parameter of Net\. .* None "
        r"selects nothing as an NNX filter: omit the filter to freeze every trainable "
        r"parameter, or pass nnx\.Nothing to change nothing on purpose\.",
    ):
        ff.freeze(Net(nnx.Rngs(0)), None)
    with pytest.raises(ValueError, match=r"omit the filter to unfreeze every frozen parameter"):
        ff.unfreeze(ff.freeze(Net(nnx.Rngs(0))), None)


# --------------------------------------------------------------------------- plain strings


def test_a_plain_string_is_a_path_regex_in_freeze_unfreeze_and_freezing():
    model = ff.freeze(Net(nnx.Rngs(0)), "head/.*")
    assert param_types(model) == {
        "body/kernel": "Param",
        "body/bias": "Param",
        "head/kernel": "FrozenParam",
        "head/bias": "FrozenParam",
    }
    ff.unfreeze(model, "head/bias")
    assert param_types(model)["head/bias"] == "Param"
    with ff.freezing(model, ["body/kernel", nnx.PathContains("bias")]):
        assert param_types(model) == {
            "body/kernel": "FrozenParam",
            "body/bias": "FrozenParam",
            "head/kernel": "FrozenParam",
            "head/bias": "FrozenParam",
        }
    assert param_types(model)["body/kernel"] == "Param"


def test_a_plain_string_selects_the_same_in_ff_and_ffl():
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(nn.Dense(3)(x))

    x = jnp.ones((1, 3))
    params = MLP().init(jax.random.key(0), x)["params"]
    model = nnx.bridge.lazy_init(nnx.bridge.ToNNX(MLP(), rngs=nnx.Rngs(0)), x)
    for pattern in ("Dense_0/.*", ".*/kernel", "Dense_1/bias"):
        linen = ffl.freeze(params, pattern)
        linen_frozen = {
            "/".join(str(k.key) for k in kp)
            for kp, _ in jax.tree_util.tree_flatten_with_path(
                linen, is_leaf=lambda v: isinstance(v, ffl.FrozenBox)
            )[0]
            if isinstance(_, ffl.FrozenBox)
        }
        with ff.freezing(model, pattern):
            nnx_frozen = {p for p, t in param_types(model).items() if t == "FrozenParam"}
        assert nnx_frozen == linen_frozen, pattern


def test_a_string_that_is_a_tag_raises_even_with_missing_ok():
    model = Net(nnx.Rngs(0))
    model.head.kernel.set_metadata("tag", "probe")
    for missing_ok in (False, True):
        with pytest.raises(
            ValueError,
            match=r"`filter` 'probe' passed to freeze\(\) is a path regex \(a plain string "
            r"always is in flax_freeze\) and matches no path, but 1 parameter\(s\) carry the "
            r"NNX tag 'probe': \[head/kernel\]\. To select them by tag pass "
            r"nnx\.WithTag\('probe'\); to select by path pass a pattern such as "
            r"ff\.PathRegex\('head/kernel'\)\.",
        ):
            ff.freeze(model, "probe", missing_ok=missing_ok)
    ff.freeze(model, nnx.WithTag("probe"))
    assert param_types(model)["head/kernel"] == "FrozenParam"


def test_a_string_that_matches_nothing_names_both_fixes():
    with pytest.raises(
        ValueError,
        match=r"`filter` 'head' passed to freeze\(\) matched no parameter of Net\. Its "
        r"parameter paths are: body/bias, body/kernel, head/bias, head/kernel\. A plain "
        r"string is a path regex here, as ff\.PathRegex\('head'\); to select by NNX tag pass "
        r"nnx\.WithTag\('head'\)\. The pattern must match the whole path \(re\.fullmatch\): "
        r"'head/\.\*' would select 2 of them \(head/bias, head/kernel\)\. Check the filter "
        r"against these paths, or pass missing_ok=True to allow an empty match\.$",
    ):
        ff.freeze(Net(nnx.Rngs(0)), "head")
    assert ff.freeze(Net(nnx.Rngs(0)), "head", missing_ok=True) is not None


def test_a_bad_regex_string_names_the_pattern():
    with pytest.raises(ValueError, match=r"`pattern` 'head\(' is not a valid regular expression"):
        ff.freeze(Net(nnx.Rngs(0)), "head(")


def test_to_predicate_turns_strings_into_path_regexes_on_request():
    assert to_predicate("a/.*", strings="path") == ff.PathRegex("a/.*")
    pred = to_predicate(["a/.*", nnx.Param], strings="path")
    assert pred(("a", "b"), None)
    assert pred(("c",), nnx.Param(1.0))
    assert not pred(("c",), None)
    assert isinstance(to_predicate("a"), nnx.WithTag)  # NNX's meaning otherwise


# --------------------------------------------------------------------------- matched nothing


@pytest.mark.parametrize(
    "filter_",
    [
        pytest.param(ff.PathRegex("kernel"), id="leaf-name"),
        pytest.param(ff.PathRegex("head"), id="module-name"),
    ],
)
def test_path_regex_that_matches_nothing_names_the_corrected_pattern(filter_):
    expected = {
        "kernel": r"PathRegex\('\.\*/kernel'\) would select 2 of them \(body/kernel, "
        r"head/kernel\)",
        "head": r"PathRegex\('head/\.\*'\) would select 2 of them \(head/bias, head/kernel\)",
    }[filter_.pattern]
    with pytest.raises(ValueError, match=r"\(re\.fullmatch\): " + expected):
        ff.freeze(Net(nnx.Rngs(0)), filter_)


def test_matched_nothing_uses_the_filters_sep_and_keeps_its_flags():
    with pytest.raises(
        ValueError,
        match=r"Its parameter paths are: body\.bias, body\.kernel, head\.bias, head\.kernel\. "
        r"The pattern must match the whole path \(re\.fullmatch\): PathRegex\(re\.compile\("
        r"'HEAD\\\\\.\.\*', re\.IGNORECASE\), sep='\.'\) would select 2 of them",
    ):
        ff.freeze(Net(nnx.Rngs(0)), ff.PathRegex(re.compile("HEAD", re.IGNORECASE), sep="."))


def wide(n: int) -> nnx.Module:
    model = nnx.Module()
    for i in range(n):
        setattr(model, f"p{i:02d}", nnx.Param(jnp.ones(1)))
    return model


def test_matched_nothing_lists_every_path_up_to_a_dozen():
    listed = re.escape(", ".join(f"p{i:02d}" for i in range(12)))
    with pytest.raises(ValueError, match=rf"Its parameter paths are: {listed}\. Check the filter"):
        ff.freeze(wide(12), ff.PathRegex("q.*"))
    with pytest.raises(
        ValueError, match=rf"Its parameter paths are: {listed}, \.\.\. \(13 in all\)\. Check"
    ):
        ff.freeze(wide(13), ff.PathRegex("q.*"))
