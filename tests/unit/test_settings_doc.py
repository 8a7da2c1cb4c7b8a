"""docs/CONFIGURATION.md's table of variables against the settings classes that read them."""

import re
from collections.abc import Iterator
from pathlib import Path

from tasks.settings import FlowerSettings, KronosSettings, environment_variables
from worker.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs" / "CONFIGURATION.md"
SETTINGS_CLASSES = (KronosSettings, WorkerSettings, FlowerSettings)
# Documented variables that are not settings: no process reads them, the files named here do.
NOT_SETTINGS = {
    "KRONOS_SECRETS_DIR": "docker-compose.yml and ops/make-secrets.sh: where the Redis password files are",
}
# Where code lives; none of it may name a KRONOS_* variable the table lacks (a raw os.environ read, say).
CODE_PATHS = ["celeryconfig.py", "flowerconfig.py", "kronos_cli.py", "tasks", "worker", "schemas", "model", "ops"]
# A variable name, not a wildcard ("KRONOS_MAX_*") nor a file name ("KRONOS_INFERENCE.md").
VARIABLE = re.compile(r"KRONOS_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*]|\.[A-Za-z])")


def documented_variables() -> set[str]:
    rows = re.findall(r"^\|\s*`(KRONOS_[A-Z0-9_]+)`\s*\|", DOCS.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows)), "a variable has two rows"
    return set(rows)


def read_by_the_settings() -> set[str]:
    return {variable for settings_class in SETTINGS_CLASSES for variable in environment_variables(settings_class)}


def test_every_setting_is_documented() -> None:
    assert read_by_the_settings() - documented_variables() == set()


def test_every_documented_variable_is_a_setting_or_listed_as_none() -> None:
    assert documented_variables() - read_by_the_settings() - NOT_SETTINGS.keys() == set()


def test_the_list_of_non_settings_is_current() -> None:
    assert NOT_SETTINGS.keys() <= documented_variables()
    assert NOT_SETTINGS.keys() & read_by_the_settings() == set()


def files_under(relative: str) -> Iterator[Path]:
    path = REPO_ROOT / relative
    if path.is_file():
        yield path
    elif path.is_dir():
        yield from (p for p in path.rglob("*.py") if p.is_file())


def test_every_variable_named_in_code_is_documented() -> None:
    in_code = {
        variable
        for relative in CODE_PATHS
        for path in files_under(relative)
        for variable in VARIABLE.findall(path.read_text(errors="replace"))
    }
    assert in_code, "the scan found no variables at all"
    assert in_code - documented_variables() == set()
