"""
The documentation is checked like code: README.md and every page under docs/.

Every fenced code block is either checked here or marked, on the last non-blank line before its fence, with an
HTML comment (invisible on GitHub and in the built site):

- ``<!-- fragment -->`` (or ``<!-- fragment: why -->``): part of something larger; not checked.
- no marker, a Python block: a whole DAG file. It must parse, Airflow's ``DagBag`` must import it without errors,
  and it runs with ``dag.test()`` against ``FakeOpenAIServer`` (every task instance must succeed, and the fake must
  have created at least one batch, or exactly N with ``<!-- run: batches=N -->``).
- ``<!-- imports-only: why -->``: a whole DAG file that cannot run offline (S3, a real account): parsed and imported.
- ``<!-- file: NAME -->``: the block's text is written to NAME in the page's working folder (an input file the
  page's commands and DAGs read).
- ``<!-- console -->``: lines starting with ``$ python`` are run there (``python`` is this interpreter) and the
  other lines are their output, compared exactly.
- ``<!-- pytest -->``: a test module, run by pytest in a process of its own in the page's working folder, whose
  ``dags/`` is the DAG folder and on ``sys.path``; it must pass.
- ``<!-- log -->`` after a DAG block: task log lines its run printed; each line must be in a line of the run's
  output (which adds a time and a level around it), in this order.
- ``<!-- xcom: TASK_ID -->`` after a DAG block: the JSON value the task pushed as its XCom in that run.

Links and images must point at files that exist (and at headings that exist), mkdocs.yml's nav must list every
page, every ``make <target>`` the pages name must be a Makefile target, and every connection given as an
environment variable must be one the hook builds a client from.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import connection_env, deferring_server, register, task_states

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(
    r"^\s*<!--\s*(?P<kind>fragment|imports-only|run|file|console|pytest|log|xcom)\b\s*:?\s*(?P<arg>.*?)\s*-->\s*$"
)
#: Seconds between polls while the docs' DAGs run (their default is a minute, as it should be for real batches).
POLL_SECONDS = 0.2


@dataclass(frozen=True)
class Block:
    page: Path
    #: 1-based line of the opening fence.
    line: int
    lang: str
    text: str
    marker: str | None
    arg: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def __str__(self) -> str:  # the pytest id
        return self.where


def blocks_of(page: Path) -> list[Block]:
    found: list[Block] = []
    lines = page.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        fence, info = opened["fence"], opened["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{start + 1}: a code block is never closed")
        i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(before)
        indent = len(opened["indent"])
        text = "\n".join(line[indent:] if line[:indent].isspace() else line for line in body) + "\n"
        found.append(
            Block(
                page,
                start + 1,
                (info.split() or [""])[0].lower(),
                text,
                marker["kind"] if marker else None,
                marker["arg"] if marker else "",
            )
        )
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
PYTHON = [b for b in BLOCKS if b.lang in ("python", "py") and b.marker != "fragment"]


def defines_dag(tree: ast.AST) -> bool:
    """A ``DAG(...)`` (a ``with`` or a call) or a function decorated with ``@dag``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name == "DAG":
                return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for decorator in node.decorator_list:
                target = decorator.func if isinstance(decorator, ast.Call) else decorator
                if (isinstance(target, ast.Name) and target.id == "dag") or getattr(target, "attr", "") == "dag":
                    return True
    return False


def dag_blocks() -> list[Block]:
    out = []
    for block in PYTHON:
        if block.marker in ("file", "pytest"):
            continue  # written out for, or run by, test_pytest_blocks_pass
        try:
            tree = ast.parse(block.text)
        except SyntaxError:
            continue  # test_python_blocks_parse names it
        if defines_dag(tree):
            out.append(block)
    return out


DAG_BLOCKS = dag_blocks()
RUN_BLOCKS = [b for b in DAG_BLOCKS if b.marker != "imports-only"]


def test_the_pages_hold_checked_blocks() -> None:
    """The collection itself: if it found nothing, every test below would pass on nothing."""
    assert len(PAGES) > 10
    assert len(RUN_BLOCKS) >= 5
    assert any(b.marker == "console" for b in BLOCKS)
    assert any(b.marker == "pytest" for b in BLOCKS)


@pytest.mark.parametrize("block", PYTHON, ids=str)
def test_python_blocks_parse(block: Block) -> None:
    try:
        ast.parse(block.text, filename=block.where)
    except SyntaxError as error:
        pytest.fail(f"{block.where}: line {block.line + (error.lineno or 0)} of the page: {error.msg}")


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_every_block_is_checked_or_marked_a_fragment(block: Block) -> None:
    if block.marker in ("fragment", "file", "console", "pytest", "log", "xcom"):
        assert block.marker != "file" or block.arg, f"{block.where}: <!-- file: NAME --> needs a file name"
        return
    assert block.lang in ("python", "py"), (
        f"{block.where}: a {block.lang or 'plain'} block nothing checks: mark it <!-- fragment --> (or make it "
        "<!-- console --> output this test compares)"
    )
    defines_a_dag = block in DAG_BLOCKS
    assert defines_a_dag, (
        f"{block.where}: a Python block that defines no DAG: make it a whole DAG file (which this test imports and "
        "runs) or mark it <!-- fragment -->"
    )
    if block.marker == "imports-only":
        assert block.arg, f"{block.where}: say why the DAG cannot run offline: <!-- imports-only: why -->"


def _page_files(page: Path, folder: Path) -> None:
    """Write the page's ``<!-- file: NAME -->`` blocks into ``folder``."""
    for block in BLOCKS:
        if block.page == page and block.marker == "file":
            target = folder / block.arg
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")


def _dag_bag(path: Path) -> Any:
    """Airflow's own DAG file importer (it moved, and lost ``include_examples``, between 3.0 and 3.3)."""
    try:
        from airflow.dag_processing.dagbag import DagBag
    except ImportError:  # Airflow before 3.1
        from airflow.models.dagbag import DagBag

        return DagBag(dag_folder=str(path), include_examples=False, safe_mode=False)
    return DagBag(dag_folder=str(path), safe_mode=False)


def _load(block: Block, folder: Path) -> list:
    """The block as a DAG file in ``folder``, imported by Airflow's own DagBag: its DAGs, or the import errors."""
    name = re.sub(r"\W", "_", f"docs_{block.page.stem}_{block.line}")
    path = folder / f"{name}.py"
    path.write_text(block.text, encoding="utf-8")
    bag = _dag_bag(path)
    assert not bag.import_errors, f"{block.where}: the DAG does not import:\n" + "\n".join(bag.import_errors.values())
    assert bag.dags, f"{block.where}: the file imports but defines no DAG"
    return list(bag.dags.values())


@pytest.mark.parametrize("block", DAG_BLOCKS, ids=str)
def test_dag_blocks_import(block: Block, tmp_path: Path) -> None:
    _load(block, tmp_path)


@pytest.fixture
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The waiting operators' default poll interval, shortened for the run (their code is not changed)."""
    from airflow_provider_openai_batch.operators.base import BatchWaitingOperator
    from airflow_provider_openai_batch.operators.job import OpenAIBatchJobOperator
    from airflow_provider_openai_batch.sensors.openai_batch import OpenAIBatchSensor

    for cls, name in (
        (BatchWaitingOperator, "poll_interval"),
        (OpenAIBatchJobOperator, "poll_interval"),
        (OpenAIBatchSensor, "poke_interval"),
    ):
        defaults = inspect.unwrap(cls.__init__).__kwdefaults__
        assert name in defaults, f"{cls.__name__} has no default {name}"
        monkeypatch.setitem(defaults, name, POLL_SECONDS)


def _shown_after(block: Block) -> list[Block]:
    """The ``log`` and ``xcom`` blocks that follow a DAG block on its page, up to the next DAG block."""
    later = [b for b in BLOCKS if b.page == block.page and b.line > block.line]
    shown = []
    for other in later:
        if other in DAG_BLOCKS:
            break
        if other.marker in ("log", "xcom"):
            shown.append(other)
    return shown


def _check_shown(block: Block, run: Any, output: str) -> None:
    from tests.conftest import xcoms

    lines = output.splitlines()
    for shown in _shown_after(block):
        if shown.marker == "xcom":
            pushed = xcoms(run, shown.arg)
            assert pushed.get(-1) == json.loads(shown.text), f"{shown.where}: {shown.arg} pushed {pushed}"
            continue
        at = 0
        for expected in shown.text.splitlines():
            found = next((i for i in range(at, len(lines)) if expected.rstrip() in lines[i]), None)
            assert found is not None, f"{shown.where}: {expected!r} is not in the run's output (in order):\n{output}"
            at = found + 1


@pytest.mark.parametrize("block", RUN_BLOCKS, ids=str)
def test_dag_blocks_run(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    airflow_db: None,
    quick_polls: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    expected = re.fullmatch(r"batches=(\d+)", block.arg) if block.marker == "run" else None
    assert block.marker != "run" or expected, f"{block.where}: write <!-- run: batches=N -->"
    folder = tmp_path / "work"
    folder.mkdir()
    _page_files(block.page, folder)
    monkeypatch.chdir(folder)
    with deferring_server() as server:
        monkeypatch.setenv("AIRFLOW_CONN_OPENAI_DEFAULT", connection_env(server))
        for dag in _load(block, tmp_path):
            register(dag)
            run = dag.test()
            states = task_states(run)
            assert states and set(states.values()) == {"success"}, f"{block.where}: {dag.dag_id} ran {states}"
        captured = capfd.readouterr()
        _check_shown(block, run, captured.out + captured.err)
        if expected:
            assert server.batches_created == int(expected[1]), f"{block.where}: {server.batches_created} batches"
        else:
            assert server.batches_created >= 1, f"{block.where}: the DAG ran without creating a batch at the fake"


def _commands(block: Block) -> Iterator[tuple[str, list[str]]]:
    """(command, expected output lines) pairs of a console block; a trailing backslash continues a command."""
    command: str | None = None
    output: list[str] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            if command is not None:
                yield command, output
            command, output = line[2:], []
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command = command[:-1] + " " + lines[i].strip()
        else:
            assert command is not None, f"{block.where}: output before the first '$ ' command"
            output.append(line)
        i += 1
    if command is not None:
        yield command, output


CONSOLE = [b for b in BLOCKS if b.marker == "console"]


@pytest.mark.parametrize("block", CONSOLE, ids=str)
def test_console_blocks_show_what_the_commands_print(block: Block, tmp_path: Path) -> None:
    _page_files(block.page, tmp_path)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env["PYTHONPATH"] = str(ROOT)
    commands = list(_commands(block))
    assert commands, f"{block.where}: a console block without a '$ ' command"
    for command, expected in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", f"{block.where}: only python commands are run here, not {argv[0]!r}"
        done = subprocess.run(
            [sys.executable, *argv[1:]],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            check=False,
        )
        got = [line.rstrip() for line in done.stdout.splitlines()]
        assert got == [line.rstrip() for line in expected], (
            f"{block.where}: `{command}` printed (exit {done.returncode}):\n{done.stdout}"
        )


PYTEST = [b for b in BLOCKS if b.marker == "pytest"]


@pytest.mark.parametrize("block", PYTEST, ids=str)
def test_pytest_blocks_pass(block: Block, tmp_path: Path, airflow_db: None) -> None:
    """As a user runs their own tests: this session's Airflow home and database, the page's dags folder."""
    _page_files(block.page, tmp_path)
    (tmp_path / "dags").mkdir(exist_ok=True)
    (tmp_path / "test_from_the_docs.py").write_text(block.text, encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW_CONN_")}
    env["AIRFLOW__CORE__DAGS_FOLDER"] = str(tmp_path / "dags")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path / "dags")])
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--show-capture=no", "test_from_the_docs.py"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{block.where}: the test failed:\n{done.stdout[-4000:]}"
    assert " passed" in done.stdout, done.stdout[-2000:]


# --- links, nav, make targets, connections ---------------------------------------------------------------------


def _without_blocks(page: Path) -> str:
    return re.sub(r"^(\s*)(`{3,}|~{3,}).*?^\1\2\s*$", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def _prose(page: Path) -> str:
    """The page without its code blocks and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", _without_blocks(page))


def slug(heading: str) -> str:
    """Python-Markdown's toc slug (what mkdocs uses for anchors): lowercase words joined by '-'."""
    text = re.sub(r"[`*]", "", heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(m[1]) for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", _without_blocks(page), flags=re.M)}


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|<img[^>]+src=\"([^\"]+)\"")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_pages_images_and_headings_that_exist(page: Path) -> None:
    broken = []
    for match in LINK.finditer(_prose(page)):
        target = match[1] or match[2]
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_nav_lists_every_page_once() -> None:
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def files(nav: object) -> Iterator[str]:
        if isinstance(nav, str):
            yield nav
        elif isinstance(nav, list):
            for item in nav:
                yield from files(item)
        elif isinstance(nav, dict):
            for value in nav.values():
                yield from files(value)

    listed = list(files(config["nav"]))
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md")), listed


def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def test_the_readme_commands_are_make_targets() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = {m[1] for m in re.finditer(r"^make (\w[\w-]*)", readme, flags=re.M)}
    assert {"demo", "test"} <= commands, "the README's front page shows `make demo` and `make test`"
    assert commands <= _make_targets()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_make_command_named_is_a_target(page: Path) -> None:
    text = page.read_text()
    named = set(re.findall(r"`make ([a-z][\w-]*)", text)) | set(re.findall(r"^make ([a-z][\w-]*)", text, flags=re.M))
    assert named <= _make_targets(), f"{page.relative_to(ROOT)} names missing targets: {named - _make_targets()}"


CONNECTIONS = [
    (block, m[1], m[2]) for block in BLOCKS for m in re.finditer(r"export (AIRFLOW_CONN_\w+)='([^']*)'", block.text)
]


@pytest.mark.parametrize("block, name, value", CONNECTIONS, ids=lambda v: str(v) if isinstance(v, Block) else "")
def test_connections_in_the_docs_build_a_client(
    block: Block, name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow_provider_openai_batch.hooks.openai_batch import OpenAIBatchHook

    conn = json.loads(value)
    monkeypatch.setenv(name, value)
    hook = OpenAIBatchHook(name.removeprefix("AIRFLOW_CONN_").lower())
    client = hook.get_conn()
    host = conn.get("host") or "https://api.openai.com/v1"
    assert str(client.base_url).lower().startswith(host.rstrip("/").lower()), f"{block.where}: {client.base_url}"
    assert hook.is_azure == ((conn.get("extra") or {}).get("api_type") == "azure"), block.where


def test_connection_extras_on_the_command_line_are_json() -> None:
    found = [(b, m[1]) for b in BLOCKS for m in re.finditer(r"--conn-extra '([^']*)'", b.text)]
    assert found
    for block, extra in found:
        assert isinstance(json.loads(extra), dict), block.where


#: The fake server's route names (``srv.count("batches.create")``), which read like ``batches.<name>``.
API_ROUTES = {("batches", "create"), ("batches", "retrieve"), ("batches", "list"), ("batches", "cancel")}


def test_the_module_names_the_pages_write_exist() -> None:
    """Every ``module.name`` of ours written as code (``tokens.queue_tokens``, ``batches.CreatePath``) exists."""
    import pkgutil

    import airflow_provider_openai_batch as package

    prefix = f"{package.__name__}."
    modules = {name for _, name, _ in pkgutil.walk_packages(package.__path__, prefix=prefix)}
    pattern = r"`(?:airflow_provider_openai_batch\.)?([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]\w*)`"
    checked, missing = 0, []
    for page in PAGES:
        for module, name in re.findall(pattern, page.read_text()):
            full = prefix + module
            if full not in modules or name in ("py", "md") or (module, name) in API_ROUTES:
                continue  # not one of ours: `dag.test`, a file name (`polling.py`), an API route (`batches.create`)
            checked += 1
            if not hasattr(importlib.import_module(full), name) and f"{full}.{name}" not in modules:
                missing.append(f"{page.relative_to(ROOT)}: {module}.{name}")
    assert checked >= 5, f"only {checked} names found: is the pattern still right?"
    assert not missing, missing


def test_the_tests_the_pages_name_exist() -> None:
    """The lifecycle table and the guarantees name their tests: each is a test module or function (or its prefix)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    defined = set(re.findall(r"^(?:async )?def (test_\w+)", sources, flags=re.M))
    modules = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    named = {
        n
        for page in PAGES
        for code in re.findall(r"`([^`]+)`", _without_blocks(page))
        for n in re.findall(r"\btest_\w+", code)
    }
    assert len(named) >= 20
    missing = [
        name
        for name in sorted(named)
        if name not in modules and name not in defined and not any(d.startswith(name) for d in defined)
    ]
    assert not missing, missing
