"""Tests that keep the documentation honest.

- every hook is documented in docs/plugin_hooks.md with its exact signature, and tested;
- every public function is documented in docs/api.md with its exact signature;
- every ``python`` code block in README.md and docs/*.md runs (blocks preceded by
  ``<!-- no-run -->`` are skipped), and every ``$ loaderkit ...`` line of a ``console`` block
  exits 0; the blocks of one file run in order, in one temporary directory, each ``python`` block
  in a fresh namespace;
- every command and option of the ``loaderkit`` command is documented in docs/cli.md;
- the README's set-up section has exactly two ``bash`` commands, and .ci/run runs the second.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import loaderkit
from loaderkit.contract import hookspecs
from loaderkit.pipeline.discover import reset_manager

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
DOC_FILES = [README, *sorted(DOCS.glob("*.md"))]
NO_RUN = "<!-- no-run -->"

SETUP_COMMANDS = (
    "bash .ci/setup && .venv/bin/loaderkit demo",
    "bash .ci/setup --test && .venv/bin/python -m pytest -q",
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    run: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, in order."""
    out: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(\S*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].rstrip() != fence:
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path}:{start + 1}: unclosed code block")
        previous = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        out.append(Block(path, start + 1, lang, "\n".join(body) + "\n", previous != NO_RUN))
        i += 1
    return out


def hook_signatures() -> dict[str, str]:
    """``name -> "name(arg, ...)"`` for every hookspec, from the functions themselves."""
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("loaderkit_"):
            out[name] = f"{name}({', '.join(inspect.signature(fn).parameters)})"
    return out


HOOKS = hook_signatures()


def test_hookspecs_found():
    assert len(HOOKS) >= 8, HOOKS


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_documented_with_signature(hook):
    text = (DOCS / "plugin_hooks.md").read_text(encoding="utf-8")
    assert f"`{HOOKS[hook]}`" in text, f"docs/plugin_hooks.md lacks the signature `{HOOKS[hook]}`"


def test_no_unknown_hook_documented():
    text = (DOCS / "plugin_hooks.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^#+ `(loaderkit_\w+)\(", text, re.MULTILINE))
    assert documented == set(HOOKS), f"documented but not hooks: {documented - set(HOOKS)}"


@pytest.mark.parametrize("hook", sorted(HOOKS))
def test_hook_has_a_test(hook):
    tests = [p for p in (ROOT / "tests").glob("*.py") if p.name != Path(__file__).name]
    users = [p.name for p in tests if hook in p.read_text(encoding="utf-8")]
    assert users, f"no test in tests/ mentions hook {hook}"


API_FUNCTIONS = ("load", "plan", "inspect", "verify", "strategy", "register", "unregister", "convert", "plan_of",
                 "load_pipeline", "plan_pipeline", "add_lora", "remove_lora")


def _plain_signature(fn) -> str:
    sig = inspect.signature(fn)
    params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=params, return_annotation=inspect.Signature.empty))


@pytest.mark.parametrize("name", API_FUNCTIONS)
def test_api_documented_with_signature(name):
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    want = f"loaderkit.{name}{_plain_signature(getattr(loaderkit, name))}"
    assert f"`{want}`" in text, f"docs/api.md lacks the signature `{want}`"


def test_every_error_documented():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    errors = [n for n in loaderkit.__all__ if n.endswith("Error")]
    missing = [n for n in errors if f"`{n}`" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"


# -- code blocks ----------------------------------------------------------------------------


def _run_python(block: Block) -> None:
    first = block.code.splitlines()[0] if block.code.strip() else ""
    m = re.match(r"^# file: (\w+\.py)$", first)
    if m:  # a module the reader saves; later blocks of the same page import it
        Path(m.group(1)).write_text(block.code, encoding="utf-8")
    # pad so that tracebacks give the line numbers of the Markdown file
    code = compile("\n" * block.line + block.code, str(block.path), "exec")
    namespace = {"__name__": "__main__", "__file__": str(block.path)}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(code, namespace)  # noqa: S102 - the documentation's own examples


def _run_console(block: Block) -> None:
    from loaderkit.cli import main

    for line in block.code.splitlines():
        if not line.startswith("$ "):
            continue  # output shown in the docs; it depends on the machine
        words = shlex.split(line[2:])
        env = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            key, _, value = words.pop(0).partition("=")
            env[key] = value
        assert words and words[0] == "loaderkit", f"{block.where}: only loaderkit commands run: {line}"
        with _environ(env), contextlib.redirect_stdout(io.StringIO()):
            reset_manager()
            status = main(words[1:])
        reset_manager()
        assert status == 0, f"{block.where}: `{line[2:]}` exited {status}"


@contextlib.contextmanager
def _environ(extra: dict[str, str]):
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


RUNNABLE = ("python", "console")
DOCS_WITH_EXAMPLES = [d for d in DOC_FILES if any(b.run and b.lang in RUNNABLE for b in blocks(d))]


def test_readme_and_guides_have_examples():
    names = {d.name for d in DOCS_WITH_EXAMPLES}
    assert {"README.md", "plugin_hooks.md", "writing_plugins.md", "strategies.md"} <= names


@pytest.mark.parametrize("doc", DOCS_WITH_EXAMPLES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # examples' mkdtemp() land here
    before = set(sys.modules)
    try:
        _run_blocks(doc)
    finally:
        for name in set(sys.modules) - before:  # forget modules the page saved
            if str(tmp_path) in (getattr(sys.modules[name], "__file__", None) or ""):
                del sys.modules[name]


def _run_blocks(doc: Path) -> None:
    for block in blocks(doc):
        if not block.run or block.lang not in RUNNABLE:
            continue
        reset_manager()
        with _environ({}):
            try:
                if block.lang == "python":
                    _run_python(block)
                else:
                    _run_console(block)
            except Exception as exc:
                raise AssertionError(f"example at {block.where} failed: {type(exc).__name__}: {exc}") from exc
            finally:
                reset_manager()


def test_no_run_blocks_are_rare():
    skipped = [b.where for doc in DOC_FILES for b in blocks(doc) if not b.run]
    assert len(skipped) <= 3, f"too many examples marked no-run: {skipped}"


def test_code_blocks_name_their_language():
    unnamed = [b.where for doc in DOC_FILES for b in blocks(doc) if not b.lang]
    assert not unnamed, f"code blocks without a language: {unnamed}"


# -- the command line -----------------------------------------------------------------------


def _cli_surface() -> dict[str, list[str]]:
    """Subcommand -> its option strings (``""`` for the top-level options)."""
    import argparse

    from loaderkit.cli import build_parser

    parser = build_parser()
    out = {"": [s for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")]}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = [s for a in sub._actions for s in a.option_strings if s not in ("-h", "--help")]
    return out


def test_cli_documented():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    surface = _cli_surface()
    missing = [f"loaderkit {c}" for c in surface if c and f"## `loaderkit {c}" not in text]
    for command, options in surface.items():
        missing += [f"{command} {o}".strip() for o in options if f"`{o}" not in text]
    assert not missing, f"docs/cli.md does not document: {missing}"


def test_readme_mentions_only_real_commands():
    surface = _cli_surface()
    text = README.read_text(encoding="utf-8")
    for command in re.findall(r"`loaderkit (\w+)", text):
        assert command in surface, f"README mentions `loaderkit {command}`, which does not exist"


# -- set-up commands ------------------------------------------------------------------------


def test_readme_has_exactly_the_two_setup_commands():
    bash = [b for b in blocks(README) if b.lang in ("bash", "sh", "shell", "console")]
    assert [b.code.strip() for b in bash] == list(SETUP_COMMANDS), [b.code for b in bash]
    assert all(b.lang == "bash" for b in bash)


def _ci_commands() -> list[str]:
    commands = []
    for raw in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        commands.append(line)
    return commands


def test_ci_runs_the_readme_test_command():
    bash = [b.code.strip() for b in blocks(README) if b.lang == "bash"]
    assert _ci_commands() == [bash[1]], f".ci/run runs {_ci_commands()}, the README says {bash[1]!r}"


def test_setup_command_parts_exist():
    assert (ROOT / ".ci" / "setup").is_file()
    assert "demo" in _cli_surface()
    text = (ROOT / ".ci" / "setup").read_text(encoding="utf-8")
    assert "--test" in text


# -- links ----------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("doc", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.is_file() and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{doc.relative_to(ROOT)} has broken links: {broken}"
