"""Keep the docs true: every `sftlab` command line, run config and link in README.md and docs/*.md.

- Each command line in a ```bash / sh / shell / console block (and each `$ ` line in any block)
  that runs `sftlab` (also as `.venv/bin/sftlab`, `python -m sftlab`, after `VAR=value`, or under
  `torchrun ... -m sftlab`) names a real subcommand, and each option it uses is one of that
  command's options, checked against the real typer app. So is each inline `sftlab ...` code span
  (the command signatures in headings and prose).
- Each ```yaml block with a top-level `model:` key is a valid run config (`load_config`).
- Each relative link resolves to a file, and each `#anchor` to a heading of its page.

A failure is named by FILE:LINE.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer.main
import yaml

from sftlab.cli import app
from sftlab.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"bash", "sh", "shell", "console"}
GLOBAL_OPTIONS = {"--debug", "--help"}
CLI = typer.main.get_command(app)


@dataclass
class Block:
    path: Path
    language: str
    start: int  # line number (1-based) of the first line inside the fence
    lines: list[str]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path) -> list[Block]:
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if current is None and fence:
            current = Block(path, fence.group(2).lower(), number + 1, [])
        elif current is not None and re.match(r"^\s*(```+|~~~+)\s*$", line):
            blocks.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    return blocks


def prose_lines(path: Path) -> list[tuple[int, str]]:
    """The lines outside fenced code blocks, with their line numbers."""
    out, inside = [], False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"^\s*(```+|~~~+)", line):
            inside = not inside
            continue
        if not inside:
            out.append((number, line))
    return out


def inline_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each inline code span that runs sftlab; a span may wrap a line."""
    lines = dict(prose_lines(path))
    text = "\n".join(lines.get(n, "") for n in range(1, max(lines, default=0) + 1))
    out = []
    for match in re.finditer(r"`([^`]+)`", text):
        number = text.count("\n", 0, match.start()) + 1
        for part in re.split(r"&&|;", match.group(1)):
            part = " ".join(part.split())
            if part.startswith("sftlab "):
                out.append((number, part))
    return out


def shell_commands(block: Block) -> list[tuple[int, str]]:
    """(line number, command) for each logical line of a block; backslash continuations joined."""
    out, pending, start = [], "", None
    for offset, line in enumerate(block.lines):
        number = block.start + offset
        if not pending and block.language not in SHELL_LANGUAGES and not line.startswith("$ "):
            continue
        line = line.removeprefix("$ ")
        if start is None:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def split_shell(command: str) -> list[list[str]]:
    """The simple commands of a shell line (split at |, &, ;, && ...), `# comments` dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: fall back to whitespace
        tokens = command.split("#")[0].split()
    segments, current = [], []
    for token in tokens:
        if token and set(token) <= set("|&;()<>"):
            if current:
                segments.append(current)
            current = []
        else:
            current.append(token)
    if current:
        segments.append(current)
    return segments


def sftlab_args(tokens: list[str]) -> list[str] | None:
    """The arguments after `sftlab` when this simple command runs sftlab, else None."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value
        tokens = tokens[1:]
    if not tokens:
        return None
    if Path(tokens[0]).name == "sftlab":
        return tokens[1:]
    for index in range(len(tokens) - 1):  # python -m sftlab, torchrun ... -m sftlab, srun torchrun ...
        if tokens[index] == "-m" and tokens[index + 1] == "sftlab":
            launcher = Path(tokens[0]).name
            if launcher.startswith("python") or launcher in ("torchrun", "srun", "uv", "exec"):
                return tokens[index + 2 :]
    return None


def is_group(command) -> bool:
    return isinstance(getattr(command, "commands", None), dict)


def command_options(command) -> set[str]:
    """Every spelling of the command's options (typer's click objects: its own click copy)."""
    names = set(GLOBAL_OPTIONS)
    for param in command.params:
        if param.param_type_name == "option":
            names.update(param.opts)
            names.update(param.secondary_opts)
    return names


def check_args(args: list[str]) -> list[str]:
    """Problems with `sftlab ARGS`: an unknown subcommand, or options that command does not have."""
    problems = []
    args = [a for a in args if a]
    while args and args[0].startswith("-"):  # global options before the subcommand
        if args[0].split("=")[0] not in GLOBAL_OPTIONS:
            problems.append(f"unknown global option {args[0]!r}")
        args = args[1:]
    command = CLI
    path = ["sftlab"]
    while is_group(command):
        if not args:
            return problems  # `sftlab --help`, `sftlab models`: a group alone
        name, args = args[0], args[1:]
        if name not in command.commands:
            return problems + [f"{' '.join(path)}: no subcommand {name!r} (has {', '.join(sorted(command.commands))})"]
        command, path = command.commands[name], path + [name]
    valid = command_options(command)
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
        elif re.match(r"^-[A-Za-z]", arg):
            name = arg[:2]
        else:
            continue
        if name not in valid:
            problems.append(f"{' '.join(path)}: no option {name!r} (has {', '.join(sorted(valid))})")
    return problems


def check_command_line(command: str) -> list[str] | None:
    """Problems with each sftlab invocation on a shell line; None when the line runs no sftlab."""
    found, problems = False, []
    for tokens in split_shell(command):
        args = sftlab_args(tokens)
        if args is not None:
            found = True
            problems += check_args(args)
    return problems if found else None


def check_inline(span: str) -> list[str]:
    """An inline `sftlab ...` span, e.g. a signature `sftlab inspect CONFIG [-n N | --row I]`."""
    tokens = [t.strip("[](){}.,") for t in span.split()[1:]]
    return check_args([t for t in tokens if t and t != "|"])


def unique_ids(cases: list[tuple[str, object]]) -> list:
    """pytest params with ids FILE:LINE; a second case on the same line gets FILE:LINE(2), ..."""
    seen: dict[str, int] = {}
    out = []
    for name, value in cases:
        seen[name] = seen.get(name, 0) + 1
        out.append(pytest.param(value, id=name if seen[name] == 1 else f"{name}({seen[name]})"))
    return out


def collect_commands() -> list:
    cases = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            for number, command in shell_commands(block):
                if check_command_line(command) is not None:
                    cases.append((f"{rel(path)}:{number}", ("line", command)))
        for number, span in inline_commands(path):
            cases.append((f"{rel(path)}:{number}", ("inline", span)))
    return unique_ids(cases)


COMMANDS = collect_commands()


def test_the_docs_have_commands():
    assert len(COMMANDS) > 50  # a broken collector would pass every check below


@pytest.mark.parametrize("case", COMMANDS)
def test_command_and_options_exist(case):
    kind, text = case
    problems = check_command_line(text) if kind == "line" else check_inline(text)
    assert not problems, f"{text}\n  " + "\n  ".join(problems)


def test_the_checker_reports_what_is_wrong():
    assert check_command_line("sftlab train x.yaml --no-such-flag")
    assert check_command_line(".venv/bin/sftlab train x.yaml -q")
    assert check_command_line("sftlab no-such-command x")
    assert check_command_line("sftlab models fetch smollm2-135m-instruct")
    assert check_command_line("torchrun --nproc-per-node 2 -m sftlab train x.yaml --nprocs 2")
    assert check_command_line("printf 'hi\\n' | sftlab chat runs/demo --max-tokens 8")
    assert check_command_line("SFTLAB_API_KEY=k sftlab serve runs/demo --key k")
    assert check_inline("sftlab inspect CONFIG [-n N | --rows I]")
    assert check_command_line("sftlab train x.yaml --set a=1 --resume --no-force --nproc 2  # ok --bogus") == []
    assert check_command_line("sftlab --debug models pull gemma3-270m --force") == []
    assert check_command_line("python -m sftlab.eval.suite -o x.jsonl") is None
    assert check_command_line("pip install 'sftlab[lmeval]'") is None


MAKE_TARGETS = set(re.findall(r"(?m)^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text()))


def make_lines() -> list:
    cases = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            for number, command in shell_commands(block):
                for tokens in split_shell(command):
                    if tokens and tokens[0] == "make":
                        cases.append((f"{rel(path)}:{number}", tokens[1:]))
    return unique_ids(cases)


@pytest.mark.parametrize("targets", make_lines())
def test_make_targets_exist(targets):
    missing = [t for t in targets if not t.startswith("-") and "=" not in t and t not in MAKE_TARGETS]
    assert not missing, f"no such Makefile target: {missing}"


def yaml_configs() -> list:
    cases = []
    for path in DOC_FILES:
        for block in fenced_blocks(path):
            if block.language in ("yaml", "yml") and re.search(r"(?m)^model:", "\n".join(block.lines)):
                cases.append(pytest.param("\n".join(block.lines), id=f"{rel(path)}:{block.start}"))
    return cases


YAML_CONFIGS = yaml_configs()


def test_the_docs_have_run_configs():
    assert YAML_CONFIGS


@pytest.mark.parametrize("text", YAML_CONFIGS)
def test_run_config_is_valid(text, tmp_path):
    assert isinstance(yaml.safe_load(text), dict)
    path = tmp_path / "run.yaml"
    path.write_text(text)
    try:
        load_config(path, overrides=[])  # unknown keys and bad values raise; data files are not opened
    except ConfigError as error:
        pytest.fail(str(error))


def test_a_bad_run_config_is_reported(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: smollm2-135m-instruct\nlearning_rat: 1.0e-5\n")
    with pytest.raises(ConfigError):
        load_config(path, overrides=[])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def links() -> list:
    cases = []
    for path in DOC_FILES:
        for number, line in prose_lines(path):
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                cases.append(pytest.param((path, target), id=f"{rel(path)}:{number}:{target}"))
    return cases


LINKS = links()


def test_readme_links_its_docs_pages():
    linked = {target.split("#")[0] for path, target in (case.values[0] for case in LINKS) if path.name == "README.md"}
    pages = {f"docs/{page.name}" for page in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"docs pages not linked from README.md: {sorted(pages - linked)}"


@pytest.mark.parametrize("link", LINKS)
def test_link_resolves(link):
    path, target = link
    file_part, _, anchor = target.partition("#")
    destination = (path.parent / file_part).resolve() if file_part else path
    assert destination.exists(), f"{target}: {destination} does not exist"
    if anchor and destination.suffix == ".md":
        assert anchor in anchors(destination), f"{target}: no heading with anchor #{anchor} in {rel(destination)}"
