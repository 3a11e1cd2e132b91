"""Rule test tables, one module per rule family; ``ALL`` gathers them."""

from tests.cases import core

ALL = [*core.CASES]
