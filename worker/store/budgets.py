"""The API budgets' rows (`worker.relay.budget`): one row per destination and window,
spent under a lock so that replicas sharing an account never overspend it together."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

import sqlalchemy as sa

from worker.store.engine import SqlBase
from worker.store.schema import delivery_budgets

HOLD = "hold"  # the row whose window_start is the end of a hold the API asked for


class BudgetRows(SqlBase):
    """`worker.relay.budget.BudgetStore` on SQL."""

    def spend_budget(
        self,
        destination: str,
        *,
        now: datetime,
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
                            "window_start": starts.get(name, now),
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
            used = {
                name: rows[name].used if rows[name].window_start == start else 0
                for name, start in starts.items()
            }
            if not allow(used, hold.window_start, hold.note):
                return False
            for name, start in starts.items():
                connection.execute(
                    sa.update(delivery_budgets)
                    .where(
                        delivery_budgets.c.destination == destination,
                        delivery_budgets.c.window == name,
                    )
                    .values(window_start=start, used=used[name] + 1)
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
