"""The BI-RADS vocabulary: the only source of margin, shape and category ids.

A category is ``MARGIN-SHAPE`` (``spiculated-irregular``). Names are matched
case-insensitively with ``_`` and ``-`` treated alike, and the spellings of the
paper (``spiculate``) and of CBIS-DDSM (``SPICULATED``, ``ILL_DEFINED``,
``LOBULATED``) are accepted as aliases. Class ids are positions in ``MARGINS``
and ``SHAPES``; they are stored in checkpoints (``vocabulary()``) so that a model
trained with another vocabulary is refused rather than silently mislabeled.
"""

from __future__ import annotations

from dataclasses import dataclass

from f2m_ray.errors import F2MError

MARGINS: tuple[str, ...] = (
    "circumscribed",
    "microlobulated",
    "obscured",
    "ill-defined",
    "spiculated",
)
SHAPES: tuple[str, ...] = (
    "round",
    "oval",
    "lobulated",
    "irregular",
    "architectural-distortion",
)

# Alternative spellings, already normalized by _normalize (lower case, '_' -> '-').
MARGIN_ALIASES: dict[str, str] = {
    "spiculate": "spiculated",
    "speculated": "spiculated",
    "illdefined": "ill-defined",
    "ill-defined": "ill-defined",
    "microlobular": "microlobulated",
    "micro-lobulated": "microlobulated",
    "circumscribe": "circumscribed",
}
SHAPE_ALIASES: dict[str, str] = {
    "lobular": "lobulated",
    "architectural": "architectural-distortion",
    "arch-distortion": "architectural-distortion",
}

# The paper's three categories (section 3.4, Fig. 5).
PAPER_CATEGORIES: tuple[str, ...] = (
    "ill-defined-round",
    "spiculated-irregular",
    "circumscribed-oval",
)


class UnknownLabelError(F2MError, ValueError):
    """A margin, shape or category name that the vocabulary does not know."""


def _normalize(name: str) -> str:
    return str(name).strip().lower().replace("_", "-").replace(" ", "-")


def _lookup(name: str, valid: tuple[str, ...], aliases: dict[str, str], kind: str) -> str:
    key = _normalize(name)
    key = aliases.get(key, key)
    if key not in valid:
        raise UnknownLabelError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(valid)}")
    return key


def canonical_margin(name: str) -> str:
    """The canonical spelling of a margin name (``'SPICULATED'`` -> ``'spiculated'``)."""
    return _lookup(name, MARGINS, MARGIN_ALIASES, "margin")


def canonical_shape(name: str) -> str:
    """The canonical spelling of a shape name (``'LOBULATED'``/``'lobular'`` -> ``'lobulated'``)."""
    return _lookup(name, SHAPES, SHAPE_ALIASES, "shape")


def margin_id(name: str) -> int:
    return MARGINS.index(canonical_margin(name))


def shape_id(name: str) -> int:
    return SHAPES.index(canonical_shape(name))


@dataclass(frozen=True, order=True)
class Category:
    """One BI-RADS category: a (margin, shape) pair in canonical spelling."""

    margin: str
    shape: str

    @property
    def name(self) -> str:
        return f"{self.margin}-{self.shape}"

    @property
    def margin_id(self) -> int:
        return MARGINS.index(self.margin)

    @property
    def shape_id(self) -> int:
        return SHAPES.index(self.shape)

    @property
    def id(self) -> int:
        """A stable integer for the pair: ``margin_id * len(SHAPES) + shape_id``."""
        return self.margin_id * len(SHAPES) + self.shape_id

    def __str__(self) -> str:
        return self.name


def all_categories() -> list[Category]:
    return [Category(m, s) for m in MARGINS for s in SHAPES]


def category_names() -> list[str]:
    return [c.name for c in all_categories()]


def make_category(margin: str, shape: str) -> Category:
    return Category(canonical_margin(margin), canonical_shape(shape))


ALL = "all"  # --category all: every category (that the context offers)


def parse_categories(names, every=None, where: str = "") -> list[Category]:
    """--category values -> Categories in order, duplicates dropped: each an accepted spelling of one
    category, or "all" for every category `every()` returns (default: the whole vocabulary). An unknown
    name is an F2MError that offers "all" (`where` says what "all" covers)."""
    chosen: list[Category] = []
    for name in names:
        if str(name).strip().lower() == ALL:
            found = every() if every else all_categories()
        else:
            try:
                found = [parse_category(name)]
            except UnknownLabelError as err:
                raise F2MError(f"{err}; or '{ALL}' for every category{where}") from None
        chosen.extend(c for c in found if c not in chosen)
    return chosen


def parse_category(name: str) -> Category:
    """Parse ``MARGIN-SHAPE`` (any accepted spelling) into a Category.

    Both parts may contain hyphens (``ill-defined-architectural-distortion``), so
    every split point is tried; exactly one must give a known margin and shape.
    """
    key = _normalize(name)
    parts = key.split("-")
    found: list[Category] = []
    for cut in range(1, len(parts)):
        margin, shape = "-".join(parts[:cut]), "-".join(parts[cut:])
        try:
            found.append(make_category(margin, shape))
        except UnknownLabelError:
            continue
    if len(found) != 1:
        raise UnknownLabelError(
            f"unknown category {name!r}; a category is MARGIN-SHAPE with margin in "
            f"({', '.join(MARGINS)}) and shape in ({', '.join(SHAPES)}), "
            f"e.g. {', '.join(PAPER_CATEGORIES)}"
        )
    return found[0]


def vocabulary() -> dict[str, list[str]]:
    """The vocabulary as stored in checkpoints, feature banks and dataset manifests."""
    return {"margins": list(MARGINS), "shapes": list(SHAPES)}


def check_vocabulary(stored: dict, what: str) -> None:
    """Refuse an artifact written with another vocabulary (ids would mean other labels)."""
    if stored != vocabulary():
        raise F2MError(
            f"{what} was written with another BI-RADS vocabulary "
            f"(margins {stored.get('margins')}, shapes {stored.get('shapes')}); "
            f"this version uses margins {list(MARGINS)}, shapes {list(SHAPES)}"
        )
