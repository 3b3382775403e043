"""The docs' lists are checked against the code, so a reader can trust them.

- the README starts with the two commands (`make demo`, `make test`);
- docs/api.md's route table is exactly the app's routes (method + path), and every
  `METHOD /path` written anywhere in the docs is a real route;
- docs/cli.md names every `quarkflow` command and subcommand, and every `quarkflow ...` in a
  code span or block of the docs is a real command;
- docs/configuration.md names every setting of `Settings` and no unknown `QF_*` variable, and
  no doc names an unknown one;
- docs/workbench.md names every page in pages/;
- every relative link (and its #anchor) and every repository path in a code span exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from pydantic import AliasChoices

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
ALL_DOCS = [README, ROOT / "bench" / "README.md", *sorted(DOCS.glob("*.md"))]
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
ROUTE = re.compile(rf"\b({'|'.join(METHODS)}) (/[A-Za-z0-9_/{{}}.-]*[A-Za-z0-9_}}])")
# the folders a path in a code span may start with; what the docs name as files or modules
REPO_ROOTS = ("quarkflow_core", "app", "pages", "flows", "db", "deploy", "tests", "bench",
              "scripts", "docs")  # fmt: skip
EXPECTED_ABSENT = {"deploy/.env"}  # written by the operator, never committed (operations.md)


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _code(text: str) -> list[str]:
    """Fenced blocks and inline code spans."""
    fences = re.findall(r"^```.*?^```", text, flags=re.S | re.M)
    return fences + re.findall(r"`([^`\n]+)`", _without_fences(text))


# ----------------------------------------------------------------------------- README


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert lines[:3] == ["# Quarkflow", "", "```bash"]
    assert lines[3].startswith("make demo   # ")
    assert lines[4].startswith("make test   # ")
    assert lines[5] == "```"


# ----------------------------------------------------------------------------- routes


@pytest.fixture(scope="module")
def app_routes(tmp_path_factory) -> set[tuple[str, str]]:
    from app.api import create_app
    from quarkflow_core.config import load_settings

    tmp = tmp_path_factory.mktemp("docs-app")
    settings = load_settings(
        data_dir=tmp,
        database_url=f"sqlite:///{tmp}/x.db",
        storage_url=f"file://{tmp}/s",
        secret_key="x",
    )
    app = create_app(settings, with_demo=False)  # no lifespan: nothing starts
    return {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }


def _route_table(text: str) -> list[tuple[str, str]]:
    rows = []
    for line in text.splitlines():
        m = re.match(rf"\| `({'|'.join(METHODS)}) (/[^`\s]*)`", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


def test_api_doc_lists_exactly_the_routes(app_routes):
    table = _route_table((DOCS / "api.md").read_text())
    assert len(table) == len(set(table)), "a route is listed twice"
    assert set(table) - app_routes == set(), "documented routes that do not exist"
    assert app_routes - set(table) == set(), "routes missing from docs/api.md"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_every_route_named_in_the_docs_exists(doc, app_routes):
    named = {(m.group(1), m.group(2)) for m in ROUTE.finditer(doc.read_text())}
    assert named - app_routes == set()


# ----------------------------------------------------------------------------- commands


def _cli_tree() -> dict[str, set[str]]:
    """Top-level command -> its subcommands (empty for a plain command)."""
    import app.cli

    root = typer.main.get_command(app.cli.app)  # a group: typer's own click, so duck-typed
    return {name: set(getattr(cmd, "commands", {})) for name, cmd in root.commands.items()}


def _command_paths(tree: dict[str, set[str]]) -> set[str]:
    paths = set()
    for name, subs in tree.items():
        paths |= {f"{name} {sub}" for sub in subs} if subs else {name}
    return paths


def _mentioned_commands(text: str) -> set[str]:
    """`quarkflow a [b]` inside code (not `kubectl -n quarkflow ...`)."""
    found = set()
    for block in _code(text):
        for m in re.finditer(
            r"(?<!-n )(?:^|(?<=[\s(/]))quarkflow ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", block, re.M
        ):
            found.add(m.group(1))
    return found


def test_cli_doc_lists_every_command():
    text = (DOCS / "cli.md").read_text()
    documented = set()
    for words in _mentioned_commands(text):
        documented |= {words, words.split()[0]}
    missing = _command_paths(_cli_tree()) - documented
    assert missing == set(), "commands missing from docs/cli.md"


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_every_command_named_in_the_docs_exists(doc):
    tree = _cli_tree()
    for words in _mentioned_commands(doc.read_text()):
        first, _, second = words.partition(" ")
        assert first in tree, f"{_rel(doc)}: quarkflow {words}"
        if tree[first] and second:
            assert second in tree[first], f"{_rel(doc)}: quarkflow {words}"


# ----------------------------------------------------------------------------- settings


def _setting_names() -> dict[str, set[str]]:
    """Field -> the environment variables that set it (QF_<FIELD>, or its aliases)."""
    from quarkflow_core.config import Settings

    prefix = Settings.model_config["env_prefix"]
    names = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            names[field] = {str(c) for c in alias.choices}
        elif isinstance(alias, str):
            names[field] = {alias}
        else:
            names[field] = {f"{prefix}{field}".upper()}
    return names


def test_configuration_doc_lists_every_setting():
    text = (DOCS / "configuration.md").read_text()
    table = "\n".join(line for line in text.splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`((?:QF_)?[A-Z][A-Z0-9_]+)`", table))
    names = _setting_names()
    missing = {field for field, envs in names.items() if not envs & documented}
    assert missing == set(), "settings missing from docs/configuration.md"
    known = set().union(*names.values())
    assert {d for d in documented if d.startswith("QF_")} - known == set()


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_no_doc_names_an_unknown_setting(doc):
    known = set().union(*_setting_names().values())
    named = set(re.findall(r"\bQF_[A-Z0-9_]*[A-Z0-9]\b", doc.read_text()))
    # QF_TEST_* (the test harness's) and QF_BENCH_* (a benchmark's knobs) are not settings
    assert {n for n in named if not n.startswith(("QF_TEST_", "QF_BENCH_"))} - known == set()


# ----------------------------------------------------------------------------- pages


def test_workbench_doc_names_every_page():
    text = (DOCS / "workbench.md").read_text()
    pages = {f"pages/{p.name}" for p in (ROOT / "pages").glob("*.py") if p.name != "__init__.py"}
    assert {p for p in pages if f"`{p}`" not in text} == set()


# ----------------------------------------------------------------------------- links, paths


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text).replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6} (.+)$", _without_fences(doc.read_text()), flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_relative_links_and_anchors_exist(doc):
    text = re.sub(r"`[^`\n]+`", "", _without_fences(doc.read_text()))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", ALL_DOCS, ids=_rel)
def test_repository_paths_in_code_spans_exist(doc):
    """`quarkflow_core/queue.py`, `app/api/`, `quarkflow_core/storage` (a module or a package)."""
    missing = []
    for span in re.findall(r"`([^`\n]+)`", _without_fences(doc.read_text())):
        if not re.fullmatch(rf"(?:{'|'.join(REPO_ROOTS)})/[\w./-]*", span):
            continue
        path = span.rstrip("/")
        if path in EXPECTED_ABSENT:
            continue
        if not ((ROOT / path).exists() or (ROOT / f"{path}.py").exists()):
            missing.append(span)
    assert missing == []
