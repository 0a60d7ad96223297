"""The API budgets' rows (`worker.relay.budget`): one row per destination and window,
spent under a lock so that replicas sharing an account never overspend it together.
Every time in them is the database's (`SqlStore.database_now`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime

import sqlalchemy as sa

from worker.store.engine import SqlBase
from worker.store.schema import delivery_budgets

HOLD = "hold"  # the row whose window_start is the end of a hold the API asked for
NO_HOLD = datetime(2000, 1, 1, tzinfo=UTC)  # a hold's row before any hold: long over


class BudgetRows(SqlBase):
    """`worker.relay.budget.BudgetStore` on SQL."""

    def spend_budget(
        self,
        destination: str,
        *,
        starts: Mapping[str, datetime],
        allow: Callable[[Mapping[str, int], datetime | None, str], bool],
    ) -> bool:
        names = [*starts, HOLD]
        with self._write() as connection:
            # Every row exists before it is locked, so that two first spenders cannot both
            # read "nothing used" (SQLite's BEGIN IMMEDIATE excludes them anyway).
            connection.execute(
                self._insert(delivery_budgets)
                .values(
                    [
                        {
                            "destination": destination,
                            "window": name,
                            "window_start": starts.get(name, NO_HOLD),
                            "used": 0,
                            "note": "",
                        }
                        for name in names
                    ]
                )
                .on_conflict_do_nothing()
            )
            query = (
                sa.select(delivery_budgets)
                .where(
                    delivery_budgets.c.destination == destination,
                    delivery_budgets.c.window.in_(names),
                )
                .order_by(delivery_budgets.c.window)
            )
            if self._postgresql:
                query = query.with_for_update()
            rows = {row.window: row for row in connection.execute(query)}
            hold = rows[HOLD]
            # `starts` came from the database's clock before this lock was had: a sharer
            # that read it a moment later may have begun the next window already. The
            # call counts in that window; a window never goes back.
            current = {name: max(start, rows[name].window_start) for name, start in starts.items()}
            used = {
                name: rows[name].used if rows[name].window_start == current[name] else 0
                for name in starts
            }
            if not allow(used, hold.window_start, hold.note):
                return False
            for name in starts:
                connection.execute(
                    sa.update(delivery_budgets)
                    .where(
                        delivery_budgets.c.destination == destination,
                        delivery_budgets.c.window == name,
                    )
                    .values(window_start=current[name], used=used[name] + 1)
                )
            return True

    def hold_budget(self, destination: str, *, until: datetime, limit: str) -> None:
        with self._write() as connection:
            statement = self._insert(delivery_budgets).values(
                destination=destination, window=HOLD, window_start=until, used=0, note=limit
            )
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["destination", "window"],
                    set_={
                        "window_start": sa.case(
                            (delivery_budgets.c.window_start < until, until),
                            else_=delivery_budgets.c.window_start,
                        ),
                        "note": limit,
                    },
                )
            )
