import pytest

from f2m_ray import labels
from f2m_ray.errors import F2MError


@pytest.mark.parametrize(
    "name, margin, shape",
    [
        ("spiculate-irregular", "spiculated", "irregular"),  # the paper's spelling
        ("SPICULATED-IRREGULAR", "spiculated", "irregular"),  # DDSM's
        ("ILL_DEFINED-ROUND", "ill-defined", "round"),
        ("ill-defined-round", "ill-defined", "round"),
        ("circumscribed-lobular", "circumscribed", "lobulated"),
        ("ill_defined-architectural_distortion", "ill-defined", "architectural-distortion"),
    ],
)
def test_parse_category_aliases(name, margin, shape):
    cat = labels.parse_category(name)
    assert (cat.margin, cat.shape) == (margin, shape)
    assert cat.name == f"{margin}-{shape}"


def test_ids_come_from_one_place():
    cats = labels.all_categories()
    assert len(cats) == len(labels.MARGINS) * len(labels.SHAPES) == 25
    assert sorted(c.id for c in cats) == list(range(25))
    cat = labels.parse_category("spiculated-irregular")
    assert cat.margin_id == labels.margin_id("SPICULATED") == 4
    assert cat.shape_id == labels.shape_id("IRREGULAR") == 3
    assert labels.shape_id("lobular") == labels.SHAPES.index("lobulated")


@pytest.mark.parametrize("bad", ["spiky-irregular", "spiculated", "", "round-spiculated"])
def test_unknown_category_lists_valid_names(bad):
    with pytest.raises(labels.UnknownLabelError) as err:
        labels.parse_category(bad)
    message = str(err.value)
    assert "circumscribed" in message and "architectural-distortion" in message
    assert "\n" not in message


def test_unknown_margin_lists_valid_margins():
    with pytest.raises(F2MError, match="valid margins: circumscribed, microlobulated"):
        labels.canonical_margin("LYMPH_NODE")


def test_check_vocabulary_refuses_another():
    labels.check_vocabulary(labels.vocabulary(), "x")
    other = {"margins": ["a", "b"], "shapes": list(labels.SHAPES)}
    with pytest.raises(F2MError, match="another BI-RADS vocabulary"):
        labels.check_vocabulary(other, "checkpoint X")


def test_category_lists_take_any_spelling_and_all_once_each():
    from f2m_ray.labels import all_categories, parse_categories

    chosen = parse_categories(["SPICULATE-irregular", "all", "spiculated-irregular"])
    assert chosen[0].name == "spiculated-irregular" and len(chosen) == len(set(chosen)) == len(all_categories()) == 25
    assert set(chosen) == set(all_categories())
    few = parse_categories(["all"], every=lambda: all_categories()[:2])
    assert [c.name for c in few] == [c.name for c in all_categories()[:2]]
    with pytest.raises(F2MError, match="unknown category 'spiky'.*; or 'all' for every category in the bank$"):
        parse_categories(["spiky"], where=" in the bank")
