"""Every command in the code blocks of README.md and docs/*.md still parses with the current options.

Each shell line of a fenced block (not ```text / ```mermaid output blocks) is split into commands at
`&&`, `||`, `;` and `|`; `NAME="..."` lines define shell variables that later lines of the same block
use as `$NAME`. Then:

* `python main.py | train_original.py | dataloader.py ...`: the flags go to `options.parse_args`, the one
  parser of those scripts (with its cross-flag checks);
* `python benchmark.py ...`: its own `benchmark.parse`, and what it passes on to main.py's parser;
* `python compare.py ...`: `compare.parse` and `compare.plan`, and every run's flags through
  `options.parse_args`, as `compare.py` checks them before it starts (what `--dry_run` does without
  reading the data; nothing is trained);
* `torchrun ... script.py ...`: torchrun's own parser, then the script's flags as above;
* `python -m pytest ...`: the test files exist and each word of `-k` names something in them;
* `python -c "..."`: compiles, and a call of `write_movielens` binds to its signature;
* `pip install -r FILE`: FILE exists; `python3.11 -m venv DIR` and a few other programs (`tensorboard`,
  `source`, ...) are not checked.

A command with a `...` placeholder is skipped, and counted. A renamed or removed flag fails the test.
"""
import ast
import glob
import inspect
import os
import re
import shlex

import pytest
import torch

import ablation
import benchmark
from common import errors, runtime
import compare
import options
from studies import study
from ratings import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))
OPTIONS_SCRIPTS = ("main.py", "train_original.py", "dataloader.py")
NOT_CHECKED = ("tensorboard", "nvidia-smi", "cat", "ls", "cd", "export", "git", "head", "tail", "source")
OUTPUT_BLOCKS = ("text", "mermaid", "console-output", "output")
SEPARATORS = ("&&", "||", ";", "|")


# ------------------------------------------------------------------------------------------- extraction
def code_blocks(text):
    """(language, first line number, lines) of each fenced block."""
    blocks, current = [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None:
            if stripped.startswith("```"):
                current = (stripped[3:].strip().lower(), number + 1, [])
        elif stripped.startswith("```"):
            blocks.append(current)
            current = None
        else:
            current[2].append(line)
    assert current is None, f"unclosed code block from line {current[1] - 1}"
    return blocks


def logical_lines(lines, first):
    """Shell lines with backslash continuations joined: (line number, text)."""
    joined, start, parts = [], None, []
    for offset, line in enumerate(lines):
        if start is None:
            start = first + offset
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        joined.append((start, " ".join(parts)))
        start, parts = None, []
    if parts:
        joined.append((start, " ".join(parts)))
    return joined


ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


def expand(text, variables, where):
    def value(match):
        name = match.group(1) or match.group(2)
        assert name in variables, f"{where}: ${name} is not assigned earlier in its code block"
        return variables[name]

    return VARIABLE.sub(value, text)


def commands(path, root=REPO):
    """(where, argv) of every command in the shell blocks of `path` (relative to `root`)."""
    with open(os.path.join(root, path), encoding="utf-8") as handle:
        text = handle.read()
    found = []
    for language, first, lines in code_blocks(text):
        if language in OUTPUT_BLOCKS:
            continue
        variables = {}
        for number, line in logical_lines(lines, first):
            where = f"{path}:{number}"
            expanded = expand(line, variables, where)
            words = shlex.split(expanded, comments=True)
            if words[:1] == ["export"]:
                words = words[1:]
            if len(words) == 1 and ASSIGNMENT.match(words[0]):  # NAME="value": used later as $NAME
                name, value = words[0].split("=", 1)
                variables[name] = value
                continue
            lexer = shlex.shlex(expanded, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            argv = []
            for token in list(lexer) + [";"]:
                if token in SEPARATORS:
                    if argv:
                        found.append((where, argv))
                    argv = []
                else:
                    argv.append(token)
    return found


# ------------------------------------------------------------------------------------------- checks
class Skipped(Exception):
    """A command with a `...` placeholder."""


def parse_script(script, argv, where):
    """Hand `argv` to the parser of `script`; return a short label of what was checked."""
    name = os.path.basename(script)
    if name in OPTIONS_SCRIPTS:
        options.parse_args(argv)
    elif name == "benchmark.py":
        known = benchmark.parse(argv)
        # what benchmark.py hands on to main.py's parser for each case
        benchmark.case_args(known.models.split(",")[0], known.methods.split(",")[0], known.extra)
    elif name == "compare.py":
        config = compare.parse(argv)
        for piece in compare.plan(config):
            for _, _, run_argv in piece.steps:
                options.parse_args(run_argv)
    elif name == "ablation.py":
        for run in ablation.plan(*ablation.parse(argv)):
            for _, _, run_argv in run.steps:
                options.parse_args(run_argv)
    elif name == "synthetic.py":
        synthetic.build_parser().parse_args(argv)
    else:
        pytest.fail(f"{where}: {script} is not a MELO script this test knows how to check")
    return name


def check_python_c(code, where):
    """The code compiles; a `write_movielens(...)` call binds to its arguments (those it hands on to
    `synthetic_ratings` included)."""
    tree = ast.parse(code, filename=where)
    accepted = set(inspect.signature(synthetic.write_movielens).parameters) | \
        set(inspect.signature(synthetic.synthetic_ratings).parameters)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "write_movielens":
            unknown = sorted({k.arg for k in node.keywords} - accepted)
            assert not unknown, f"{where}: write_movielens has no argument {', '.join(unknown)}"
            inspect.signature(synthetic.write_movielens).bind(*node.args, **{k.arg: k.value for k in node.keywords})
    return "python -c"


def read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def check_pytest(argv, where):
    """The test files exist, and every name in a `-k` expression occurs in them."""
    words = list(argv)
    selected = None
    if "-k" in words:
        selected = words[words.index("-k") + 1]
    paths = [w for w in words if not w.startswith("-") and w != selected]
    for path in paths:
        assert os.path.exists(os.path.join(REPO, path.split("::")[0])), f"{where}: no {path}"
    if selected is not None:
        files = [os.path.join(REPO, p.split("::")[0]) for p in paths] or \
            glob.glob(os.path.join(REPO, "tests", "test_*.py"))
        texts = "".join(read(file) for file in files)
        for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", selected):
            assert word in ("and", "or", "not") or word in texts, f"{where}: -k {word!r} selects nothing"
    return "pytest"


def check(argv, where):
    """Check one command; returns the label of the checker, raises Skipped for placeholders."""
    if "..." in argv:
        raise Skipped(where)
    while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):  # VAR=value command
        argv = argv[1:]
    program, rest = os.path.basename(argv[0]), argv[1:]
    if re.fullmatch(r"python(3(\.\d+)?)?", program):  # python, python3, python3.11
        if rest[:2] == ["-m", "venv"]:
            return "venv"
        if rest[:1] == ["-c"]:
            return check_python_c(rest[1], where)
        if rest[:2] == ["-m", "pytest"]:
            return check_pytest(rest[2:], where)
        if rest[:2] == ["-m", "pip"]:
            program, rest = "pip", rest[2:]
        else:
            return parse_script(rest[0], rest[1:], where)
    if program == "torchrun":
        from torch.distributed.run import get_args_parser

        launched = get_args_parser().parse_args(rest)
        parse_script(launched.training_script, launched.training_script_args, where)
        return "torchrun"
    if program == "pip":
        if "-r" in rest:
            requirement = rest[rest.index("-r") + 1]
            assert os.path.exists(os.path.join(REPO, requirement)), f"{where}: no {requirement}"
        return "pip"
    assert program in NOT_CHECKED, f"{where}: {program} is neither a MELO command nor in NOT_CHECKED"
    return "not checked"


def check_document(path, root=REPO):
    """{label: count} of what was checked in `path`, 'skipped' counting placeholders. A command that does
    not parse fails with its file and line."""
    counts = {}
    for where, argv in commands(path, root):
        try:
            label = check(argv, where)
        except Skipped:
            label = "skipped"
        except SystemExit as error:  # argparse's error (one line on stderr)
            pytest.fail(f"{where}: `{' '.join(argv)}` does not parse (exit status {error.code})")
        except errors.MeloError as error:
            pytest.fail(f"{where}: `{' '.join(argv)}`: {error}")
        counts[label] = counts.get(label, 0) + 1
    return counts


@pytest.fixture
def cpu_only_device_check(monkeypatch, tmp_path):
    """`--device=cuda` in a document is a valid flag on a machine without a GPU too; compare.plan looks
    for finished runs under ./results, so it runs from an empty folder."""
    select = runtime.select_device

    def select_device(name):
        try:
            return select(name)
        except errors.MeloError:
            if torch.device(name).type == "cuda":
                return torch.device(name)
            raise

    monkeypatch.setattr(benchmark, "select_device", select_device)
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", DOCUMENTS)
def test_every_command_parses(path, cpu_only_device_check, capsys):
    check_document(path)  # docs/design.md, say, may hold no command at all


def test_the_readme_and_docs_are_checked_not_skipped(cpu_only_device_check, capsys):
    """So the test cannot pass vacuously: enough commands of each kind were parsed."""
    readme = check_document("README.md")
    every = {}
    for path in DOCUMENTS:
        for label, count in check_document(path).items():
            every[label] = every.get(label, 0) + count
    parsed = sum(count for label, count in readme.items() if label.endswith(".py") or label == "torchrun")
    assert parsed >= 25, readme
    for label in ("main.py", "train_original.py", "compare.py", "dataloader.py", "torchrun", "pip", "pytest"):
        assert readme.get(label, 0) >= 1, (label, readme)
    assert every.get("benchmark.py", 0) >= 1, every
    assert every.get("skipped", 0) <= 3, every  # placeholders stay the exception


BROKEN = """
```bash
D="--mode=ml-100k --data_path=u.data"
{command}
```
"""


@pytest.mark.parametrize("command", [
    "python main.py $D --num_train_iteration=5",              # an abbreviation (of a flag that exists)
    "python main.py $D --no_such_flag=1",
    "python main.py $D --test",                                 # --test needs --checkpoint_step
    "python train_original.py $D --pretrain_epoch=3",
    "python dataloader.py --mode=ml-5m",
    "python compare.py $D --seed=3",
    "python compare.py $D --model=gru4rec",                     # compare.py sets --model itself
    "python benchmark.py --models=gru4rec --itemz=1000",        # passed on to main.py's parser
    "torchrun --standalone --nproc_per_node=2 main.py $D --batchsize=4",
    "torchrun --procs_per_node=2 main.py $D",                  # torchrun's own flags too
    "python main.py $E --num_train_iterations=5",               # a variable never assigned
    "python -m pytest -q tests/test_no_such_file.py",
    "python -m pytest -q tests/test_meta_learner.py -k no_such_test",
    "pip install -r no-requirements.txt",
    "wget https://example.org/data.zip",                        # an unknown program
])
def test_a_renamed_flag_fails(command, tmp_path, cpu_only_device_check, capsys):
    """The checker itself: a document with one broken command fails."""
    (tmp_path / "broken.md").write_text(BROKEN.format(command=command))
    with pytest.raises((pytest.fail.Exception, AssertionError, SystemExit)):
        check_document("broken.md", root=str(tmp_path))


def test_placeholders_are_skipped_and_counted(tmp_path, cpu_only_device_check, capsys):
    (tmp_path / "placeholder.md").write_text(BROKEN.format(command="python compare.py ... --dry_run"))
    assert check_document("placeholder.md", root=str(tmp_path)) == {"skipped": 1}



def heading_anchors(path):
    """GitHub's anchors of the headings of a markdown file."""
    anchors = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            heading = re.match(r"^#+ (.*)", line)
            if heading:
                text = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower())
                anchors.add(text.replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", DOCUMENTS)
def test_relative_links_and_anchors_exist(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as handle:
        text = handle.read()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", text):
        if target.startswith(("http://", "https://")):
            continue
        linked = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(os.path.join(REPO, linked)), f"{path}: link to missing {linked}"
        if anchor and linked.endswith(".md"):
            assert anchor[1:] in heading_anchors(os.path.join(REPO, linked)), f"{path}: no heading {linked}{anchor}"


def headings(path):
    """The text of every heading of a markdown file, in lower case."""
    with open(path, encoding="utf-8") as handle:
        return {match.group(1).strip().lower() for match in map(re.compile(r"^#+ (.*)").match, handle) if match}


def test_the_tests_point_to_sections_that_exist():
    """A test's comment that sends its reader to a section, as '(README, Set-up)' or with a docs file's
    path, names a heading of that document (three named README sections that did not exist, issue 35)."""
    found = []
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "*.py"))):
        text = " ".join(read(path).replace("#", " ").split())  # comments may wrap a pointer over two lines
        for document, heading in re.findall(r"\((README|docs/[\w-]+\.md), ([^()]+)\)", text):
            document = "README.md" if document == "README" else document
            assert heading.lower() in headings(os.path.join(REPO, document)), f"{path}: no {heading!r} in {document}"
            found.append(heading)
    assert len(found) >= 4, found


def test_the_readmes_recipe_flags_are_compare_pys_melo():
    # the README's F="..." (main.py as compare.py trains MELO) must not drift from compare.py's start and defaults
    with open(os.path.join(REPO, "README.md")) as file:
        line = next(line for line in file if line.startswith('F="'))
    readme = shlex.split(line.strip()[2:])[0].split()
    assert set(study.START_FLAGS["fold-in"]) <= set(readme)
    config = compare.parse(["--data_path=u.data"])
    theirs = vars(options.parse_args(compare.run_flags(config, config.seeds[0], study.START_FLAGS[config.start])))
    mine = vars(options.parse_args(readme))
    names = [flag[2:].split("=", 1)[0] for flag in readme]
    assert {n: mine[n] for n in names} == {n: theirs[n] for n in names}
    # and nothing compare.py sets for its MELO beyond main.py's defaults is missing from it
    defaults = vars(options.parse_args([]))
    assert {n for n in theirs if theirs[n] != defaults[n]} - set(names) <= set(study.CONTROLLED) | {
        "data_path", "data_path_given", "mode", "rating_head"}
