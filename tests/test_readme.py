"""The README's examples run as written, and the commands the docs give exist.

1. Every ```python block of README.md's "## Usage" section (up to the next "## " heading; its
   "### " subsections included) runs as a new user who copies that one block would run it: alone,
   in a fresh namespace, in a temporary working directory (files it saves land there). One test
   per block, id "<n>-<first line>"; the test fails if the block raises (warnings are errors, as
   in the whole suite) or takes longer than BLOCK_SECONDS. So each block must be self-contained
   (its imports, its model) and quick (small models). Tracebacks point at README.md's lines.

   A block that truly cannot run here opts out with an HTML comment on the line right before its
   opening fence (blank lines in between are allowed); the reason is required and is shown in
   pytest's skip summary:

       <!-- readme-test: skip (needs a GPU) -->
       ```python
       ...

   Any other "readme-test:" comment, or a marker not followed by a ```python block, fails
   test_usage_section_parses.

2. Every `sparseprune <subcommand>` in the Usage section's ```bash blocks and in
   benchmarks/README.md's shell blocks exists (`sparseprune <subcommand> --help` exits 0) and
   every `--option` written with it appears in that help.

3. Every `python benchmarks/<script>.py` in README.md and benchmarks/README.md (code blocks and
   inline code) names an existing script, and every `--option` written with it, or in inline
   code under a benchmarks/README.md heading that names the script, appears in the script's
   `--help`; every file of benchmarks/ is named in benchmarks/README.md.

4. Each JSON in benchmarks/results/ records the command that wrote it, and the docs give that
   command: benchmarks/README.md must, and any doc command writing that JSON must match it.

All the --help output comes from one subprocess (fixtures `_help_runner`, `helps`): it imports torch
once, while the README blocks run.
"""
from __future__ import annotations

import builtins
import importlib.metadata
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCH_README = ROOT / "benchmarks" / "README.md"
BLOCK_SECONDS = 15.0  # a block takes ~1 s (busy 2-core machine: up to 3 s); this catches a slow example
PYTHON_LANGS = ("python", "py", "python3")
SHELL_LANGS = ("bash", "sh", "shell", "console")

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^\s`]*)")
_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:\s+(?P<text>.*?))?\s*#*\s*$")
_MARKER = re.compile(r"^\s*<!--\s*readme-test:\s*skip\s*\((?P<reason>[^()]*\S[^()]*)\)\s*-->\s*$")
_SCRIPT = re.compile(r"^benchmarks/[\w.-]+\.py$")


# ---------------------------------------------------------------------------------- markdown
@dataclass(frozen=True)
class Block:
    lang: str  # the info string's first word, lower case ("" when absent)
    code: str
    line: int  # 1-based line of the block's first code line in its file
    skip: Optional[str] = None  # reason given by a readme-test skip marker


@dataclass
class Section:
    """One "## " section of a Markdown file: its fenced blocks and its prose (fences removed)."""

    title: str
    source: str  # the file, relative to the repository root
    blocks: List[Block] = field(default_factory=list)
    paragraphs: List[Tuple[str, str]] = field(default_factory=list)  # (heading above it, text)
    errors: List[str] = field(default_factory=list)


def parse_markdown(path: Path) -> List[Section]:
    """The file's "## " sections (the text before the first one is a section titled "").

    Headings inside fenced blocks are code, not headings. A fence closes with the same character
    repeated at least as often; an unclosed fence is an error. Indented fences (list items) have
    their indentation removed from the code.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    source = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    sections = [Section("", source)]
    heading = ""
    marker: Optional[Tuple[int, str]] = None  # (line, reason) waiting for its block
    new_paragraph = True
    i = 0
    while i < len(lines):
        line, sec = lines[i], sections[-1]
        fence = _FENCE.match(line)
        if fence:
            close = re.compile(r"^ {0,3}" + re.escape(fence["fence"][0]) + "{" + str(len(fence["fence"])) + r",}\s*$")
            indent = len(fence["indent"])
            body, j = [], i + 1
            while j < len(lines) and not close.match(lines[j]):
                body.append(_dedent(lines[j], indent))
                j += 1
            if j == len(lines):
                sec.errors.append(f"{source}:{i + 1}: code fence never closed")
            lang = fence["info"].lower()
            skip = None
            if marker is not None:
                if lang in PYTHON_LANGS:
                    skip = marker[1]
                else:
                    sec.errors.append(f"{source}:{marker[0]}: skip marker not followed by a ```python block")
                marker = None
            sec.blocks.append(Block(lang, "\n".join(body) + "\n", i + 2, skip))
            new_paragraph = True
            i = j + 1
            continue
        m = _HEADING.match(line)
        if m:
            heading = m["text"] or ""
            if len(m["hashes"]) == 2:
                sections.append(Section(heading, source))
                sec = sections[-1]
        if "readme-test:" in line:
            mk = _MARKER.match(line)
            if mk is None:
                sec.errors.append(f"{source}:{i + 1}: malformed marker {line.strip()!r}; the only one is "
                                  "'<!-- readme-test: skip (reason) -->'")
            else:
                if marker is not None:
                    sec.errors.append(f"{source}:{marker[0]}: skip marker not followed by a ```python block")
                marker = (i + 1, mk["reason"].strip())
        elif line.strip() and marker is not None:
            sec.errors.append(f"{source}:{marker[0]}: skip marker not right before a ```python block")
            marker = None
        if not line.strip() or m:
            new_paragraph = True
        elif new_paragraph:
            sec.paragraphs.append((heading, line))
            new_paragraph = False
        else:
            sec.paragraphs[-1] = (heading, sec.paragraphs[-1][1] + "\n" + line)
        i += 1
    if marker is not None:
        sections[-1].errors.append(f"{source}:{marker[0]}: skip marker not followed by a ```python block")
    return sections


def _dedent(line: str, indent: int) -> str:
    n = len(line) - len(line.lstrip(" "))
    return line[min(n, indent):]


def usage_section() -> Section:
    found = [s for s in parse_markdown(README) if s.title == "Usage"]
    assert len(found) == 1, f'README.md must have exactly one "## Usage" section, found {len(found)}'
    return found[0]


def _usage_python_blocks() -> List[Block]:
    try:
        return [b for b in usage_section().blocks if b.lang in PYTHON_LANGS]
    except AssertionError:
        return []  # test_usage_section_parses reports it


def _block_id(index: int, block: Block) -> str:
    first = next((ln.strip() for ln in block.code.splitlines() if ln.strip()), "")
    return f"{index}-{first[:50]}"


USAGE_BLOCKS = _usage_python_blocks()


# ---------------------------------------------------------------------------------- shell commands
def logical_lines(code: str) -> List[str]:
    """Lines of a shell block with backslash continuations joined."""
    out, pending = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append(pending + line)
            pending = ""
    if pending:
        out.append(pending)
    return out


def shell_commands(text: str) -> List[List[str]]:
    """Simple commands of one shell line: tokens split at ; && || | and redirections dropped;
    # comments removed."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    try:
        tokens = list(lex)
    except ValueError:  # unbalanced quotes: prose, not a command
        return []
    commands, current, skip_next = [], [], False
    for tok in tokens:
        if skip_next:
            skip_next = False
        elif tok in (";", "&&", "||", "|", "&"):
            commands.append(current)
            current = []
        elif tok in (">", ">>", "<", "2>", ">&"):
            skip_next = True
        else:
            current.append(tok)
    commands.append(current)
    return [c for c in commands if c]


def options(args: List[str]) -> List[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and len(a) > 2]


def cli_invocations(sections: List[Section]) -> List[Tuple[str, List[str], str]]:
    """(subcommand, its --options, where) for every `sparseprune ...` or `python -m sparseprune
    ...` in the sections' shell blocks."""
    found = []
    for sec in sections:
        for block in sec.blocks:
            if block.lang not in SHELL_LANGS:
                continue
            for line in logical_lines(block.code):
                for cmd in shell_commands(line):
                    if cmd[:3] in (["python", "-m", "sparseprune"], ["python3", "-m", "sparseprune"]):
                        cmd = cmd[2:]
                    if cmd[0] != "sparseprune":
                        continue
                    sub = next((a for a in cmd[1:] if not a.startswith("-")), None)
                    if sub is not None:
                        found.append((sub, options(cmd[1:]), f"{sec.source} block at line {block.line}: {line.strip()}"))
    return found


def inline_code(text: str) -> List[str]:
    """Code spans of Markdown prose (a span may cross a line break)."""
    return [m.group(2).replace("\n", " ").strip() for m in re.finditer(r"(`+)(.+?)\1", text, flags=re.S)]


def script_invocations(path: Path) -> List[Tuple[str, List[str], str]]:
    """(script, its arguments, where) for every `python benchmarks/<script>.py ...` of a Markdown
    file, in shell blocks and in inline code."""
    snippets: List[Tuple[str, str]] = []
    for sec in parse_markdown(path):
        for block in sec.blocks:
            if block.lang in SHELL_LANGS or block.lang == "":
                snippets += [(ln, f"{sec.source} block at line {block.line}") for ln in logical_lines(block.code)]
        for heading, text in sec.paragraphs:
            snippets += [(code, f"{sec.source} under {heading!r}") for code in inline_code(text)]
    found = []
    for snippet, where in snippets:
        for cmd in shell_commands(snippet):
            for k in range(len(cmd) - 1):
                if cmd[k] in ("python", "python3") and _SCRIPT.match(cmd[k + 1]):
                    found.append((cmd[k + 1], cmd[k + 2:], f"{where}: {snippet.strip()}"))
    return found


def bench_readme_section_options() -> List[Tuple[str, List[str], str]]:
    """(script, --options, where) for the inline code under each benchmarks/README.md heading
    that names one benchmark script: the options its prose describes."""
    found = []
    for sec in parse_markdown(BENCH_README):
        scripts = {c for c in inline_code(sec.title) if _SCRIPT.match(c)}
        if len(scripts) != 1:
            continue
        (script,) = scripts
        for heading, text in sec.paragraphs:
            for code in inline_code(text):
                opts = re.findall(r"(?<![\w-])--[a-z][\w-]*", code)
                if opts:
                    found.append((script, opts, f"benchmarks/README.md under {heading!r}: `{code}`"))
    return found


# ---------------------------------------------------------------------------------- --help, once
# One subprocess prints every --help the docs need: `sparseprune SUB --help` is cli.main([SUB,
# "--help"]) (what the console script calls: test_console_script_is_cli_main), a script's is the
# script run as __main__ with argv [script, "--help"]. One process imports torch once; a process
# per command took ~25 s on a busy 2-core machine.
_HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
from sparseprune.cli import main
out = {}
for kind, name in json.loads(sys.argv[1]):
    stdout, stderr, argv = io.StringIO(), io.StringIO(), sys.argv
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            if kind == "cli":
                code = main([name, "--help"])
            else:
                sys.argv = [name, "--help"]
                runpy.run_path(name, run_name="__main__")
                code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:
        code = 1
        stderr.write(f"{type(e).__name__}: {e}")
    finally:
        sys.argv = argv
    out[kind + ":" + name] = [code, stdout.getvalue(), stderr.getvalue()]
print(json.dumps(out))
"""


def all_cli_invocations() -> List[Tuple[str, List[str], str]]:
    """`sparseprune` commands of README.md's Usage section and of benchmarks/README.md."""
    return cli_invocations([usage_section()] + parse_markdown(BENCH_README))


def all_script_invocations() -> List[Tuple[str, List[str], str]]:
    """(script, --options, where): benchmark commands in both docs, and the options that the
    prose under a benchmarks/README.md heading naming a script describes."""
    commands = script_invocations(README) + script_invocations(BENCH_README)
    return [(s, options(args), where) for s, args, where in commands] + bench_readme_section_options()


RESULTS = ROOT / "benchmarks" / "results"
OUTPUT_OPTIONS = ("--json", "--markdown")  # where a run wrote its files, not what it measured


def recorded_command(result: Path) -> Optional[List[str]]:
    """[script, args...] that wrote a results JSON, from its metadata ("argv", else "command")."""
    meta = json.loads(result.read_text(encoding="utf-8")).get("metadata", {})
    if "argv" in meta:
        argv = list(meta["argv"])
    elif "command" in meta:
        argv = shlex.split(meta["command"])[1:]  # drop "python"
    else:
        return None
    argv[0] = argv[0][argv[0].find("benchmarks/"):] if "benchmarks/" in argv[0] else argv[0]
    return argv


def split_outputs(args: List[str]) -> Tuple[List[str], Dict[str, str]]:
    """(the arguments without --json/--markdown, {option: path})."""
    rest, outputs, i = [], {}, 0
    while i < len(args):
        opt, eq, value = args[i].partition("=")
        if opt in OUTPUT_OPTIONS:
            outputs[opt] = value if eq else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if eq else 2
        else:
            rest.append(args[i])
            i += 1
    return rest, outputs


@dataclass(frozen=True)
class Help:
    code: int
    stdout: str
    stderr: str


@pytest.fixture(scope="module", autouse=True)
def _help_runner():
    """Starts the --help subprocess with the module's first test, so that it imports torch on the
    second core while the README blocks run (on one thread); `helps` collects its output."""
    jobs = sorted({("cli", sub) for sub, _, _ in all_cli_invocations()}
                  | {("script", s) for s, _, _ in all_script_invocations() if (ROOT / s).is_file()})
    env = dict(os.environ, COLUMNS="1000")  # no wrapping: every option stays one token
    proc = subprocess.Popen([sys.executable, "-c", _HELP_RUNNER, json.dumps(jobs)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def helps(_help_runner) -> Dict[str, Help]:
    """"cli:SUB" / "script:PATH" -> the --help run of every subcommand and script the docs name."""
    out, err = _help_runner.communicate(timeout=300)
    assert _help_runner.returncode == 0, f"the --help runner failed:\n{err[-2000:]}"
    return {key: Help(*value) for key, value in json.loads(out.splitlines()[-1]).items()}


def _missing_options(help_text: str, opts: List[str]) -> List[str]:
    return [o for o in opts if not re.search(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])", help_text)]


# ---------------------------------------------------------------------------------- tests
def test_usage_section_parses():
    sec = usage_section()
    assert not sec.errors, "\n".join(sec.errors)
    assert USAGE_BLOCKS, "no ```python block found in README.md's Usage section"
    assert any(b.lang in SHELL_LANGS for b in sec.blocks), "no ```bash block found in README.md's Usage section"


def test_parser_finds_blocks_markers_and_commands(tmp_path):
    """The extraction itself, on a small document with the cases later README edits may bring."""
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# T\n## Usage\ntext `python benchmarks/b.py --x 1\n--y` end\n"
        "```python\nprint(1)\n## not a heading\n```\n"
        "### Sub\n<!-- readme-test: skip (needs a GPU) -->\n\n````py\nx = 1\n```\n````\n"
        "1. item\n   ```bash\n   sparseprune run f --input a.npy \\\n       --batch 2 # c --z\n   ```\n"
        "## Next\n```python\nafter\n```\n",
        encoding="utf-8",
    )
    sections = parse_markdown(doc)
    usage = [s for s in sections if s.title == "Usage"][0]
    assert [(b.lang, b.line, b.skip) for b in usage.blocks] == [
        ("python", 6, None), ("py", 13, "needs a GPU"), ("bash", 18, None)]
    assert usage.blocks[0].code == "print(1)\n## not a heading\n"
    assert usage.blocks[1].code == "x = 1\n```\n"
    assert not usage.errors
    assert [(sub, opts) for sub, opts, _ in cli_invocations([usage])] == [("run", ["--input", "--batch"])]
    assert [(s, a) for s, a, _ in script_invocations(doc)] == [("benchmarks/b.py", ["--x", "1", "--y"])]
    assert shell_commands("a && sparseprune info > out.txt; b | c") == [["a"], ["sparseprune", "info"], ["b"], ["c"]]

    bad = tmp_path / "bad.md"
    bad.write_text("## Usage\n<!-- readme-test: skip -->\n```python\n1\n```\n"
                   "<!-- readme-test: skip (why) -->\ntext\n```python\n2\n```\n"
                   "<!-- readme-test: skip (why) -->\n```bash\nls\n```\n```python\nopen\n", encoding="utf-8")
    errors = parse_markdown(bad)[1].errors
    assert len(errors) == 4, errors
    assert [e.split(":")[1] for e in errors] == ["2", "6", "11", "15"]


@pytest.mark.parametrize("block", USAGE_BLOCKS, ids=[_block_id(i + 1, b) for i, b in enumerate(USAGE_BLOCKS)])
def test_usage_python_block_runs(block: Block, tmp_path, monkeypatch):
    if block.skip is not None:
        pytest.skip(block.skip)
    monkeypatch.chdir(tmp_path)
    # Leading newlines make tracebacks give README.md's own line numbers.
    code = compile("\n" * (block.line - 1) + block.code, str(README), "exec")
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # same results; a shared test machine is not oversubscribed by convert's timing
    start = time.perf_counter()
    try:
        exec(code, namespace)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    assert seconds < BLOCK_SECONDS, (
        f"README.md block at line {block.line} took {seconds:.1f} s: make its example quick (smaller model)")


def test_usage_cli_subcommands_exist(helps):
    assert cli_invocations([usage_section()]), "no `sparseprune <subcommand>` in README.md's Usage bash blocks"
    problems = []
    for sub, opts, where in all_cli_invocations():
        result = helps[f"cli:{sub}"]
        if result.code != 0:
            problems.append(f"{where}\n  `sparseprune {sub} --help` exited {result.code}: {result.stderr[-500:]}")
        elif _missing_options(result.stdout, opts):
            problems.append(f"{where}\n  not in `sparseprune {sub} --help`: {_missing_options(result.stdout, opts)}")
    assert not problems, "\n".join(problems)


def test_benchmark_commands_match_scripts(helps):
    invocations = all_script_invocations()
    scripts = {s for s, _, _ in invocations}
    assert {"benchmarks/bench_linear_table.py", "benchmarks/bench_conv_table.py",
            "benchmarks/bench_executable.py"} <= scripts, f"benchmark commands not found in the docs: {scripts}"
    problems = []
    for script, opts, where in invocations:
        if not (ROOT / script).is_file():
            problems.append(f"{where}\n  {script} does not exist")
            continue
        result = helps[f"script:{script}"]
        if result.code != 0:
            problems.append(f"{where}\n  `python {script} --help` exited {result.code}: {result.stderr[-500:]}")
        elif _missing_options(result.stdout, opts):
            problems.append(f"{where}\n  not in `python {script} --help`: {_missing_options(result.stdout, opts)}")
    assert not problems, "\n".join(problems)


def test_docs_give_the_commands_of_the_committed_results():
    """Each JSON in benchmarks/results/ records the command that wrote it; benchmarks/README.md
    gives that command (writing to that JSON), and any command in either doc that writes it has
    the same arguments apart from the output paths."""
    results = sorted(RESULTS.glob("*.json"))
    assert results, "no results JSON in benchmarks/results/"
    docs = script_invocations(README) + script_invocations(BENCH_README)
    problems = []
    for result in results:
        name = result.relative_to(ROOT).as_posix()
        argv = recorded_command(result)
        if argv is None:
            problems.append(f"{name} records no command (metadata 'argv' or 'command')")
            continue
        recorded = shlex.join(["python", *argv])
        writers = [(s, a, where) for s, a, where in docs if split_outputs(a)[1].get("--json") == name]
        if not any(where.startswith("benchmarks/README.md") for _, _, where in writers):
            problems.append(f"benchmarks/README.md gives no command writing --json {name}; it was made by {recorded}")
        for script, args, where in writers:
            if script != argv[0] or split_outputs(args)[0] != split_outputs(argv[1:])[0]:
                problems.append(f"{where}\n  writes {name}, which was made by {recorded}")
    assert not problems, "\n".join(problems)


def test_console_script_is_cli_main():
    """`sparseprune ...` in the docs is sparseprune.cli:main, which the --help runner calls."""
    scripts = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "sparseprune"]
    assert [e.value for e in scripts] == ["sparseprune.cli:main"]


def test_benchmarks_readme_names_every_file():
    text = BENCH_README.read_text(encoding="utf-8")
    files = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    assert files, "no scripts in benchmarks/"
    missing = [f for f in files if not re.search(r"(?<![\w.-])" + re.escape(f) + r"(?![\w.-])", text)]
    assert not missing, f"benchmarks/README.md does not describe: {missing}"
