"""Driver.execute_row binds a row by position as execute binds the same names from a dict."""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa

from idemstore.db.driver import Driver, Statement


def test_execute_row_matches_execute_whatever_the_bind_order() -> None:
    engine = sa.create_engine("sqlite://")
    dialect = engine.dialect
    # The SQL names p_b before p_a: the row (in names order) must be reordered.
    stmt = Statement(
        "pair",
        lambda d: sa.select(
            sa.bindparam("p_b", type_=sa.String()).label("b"),
            sa.bindparam("p_a", type_=sa.String()).label("a"),
            sa.bindparam("p_c", type_=sa.String()).label("c"),
        ),
    )
    in_order = Statement(
        "in_order",
        lambda d: sa.select(
            sa.bindparam("p_a", type_=sa.String()).label("a"),
            sa.bindparam("p_b", type_=sa.String()).label("b"),
        ),
    )
    driver = Driver(sqlite3.connect(":memory:"), dialect, owns_transaction=False)
    names = ("p_a", "p_b", "p_c")
    for values in (("1", "2", "3"), ("x", "y", "z")):
        by_name = driver.execute(stmt, dict(zip(names, values, strict=True)))
        assert (
            driver.execute_row(stmt, names, values)
            == by_name
            == [(values[1], values[0], values[2])]
        )
    assert driver.execute_row(in_order, ("p_a", "p_b"), ("1", "2")) == [("1", "2")]
    driver.close()
