"""The migrations form one line: one base, one head.

Several branches add migrations at once; merged, two scripts can name the same
`down_revision` and Alembic then has two heads: `upgrade head` refuses to run and an
installed relay cannot start. This fails first, and says how to mend it.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

REPO = Path(__file__).resolve().parents[2]


def scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(Config(str(REPO / "alembic.ini")))


def test_the_migrations_have_exactly_one_head() -> None:
    heads = scripts().get_heads()
    assert len(heads) == 1, (
        f"Alembic has {len(heads)} heads {heads}: renumber the newer script's "
        "down_revision onto the other, or `alembic merge` them"
    )


def test_the_migrations_have_exactly_one_base() -> None:
    assert len(scripts().get_bases()) == 1
