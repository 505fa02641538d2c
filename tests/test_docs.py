"""The documentation (README.md and docs/*.md) against the code: the generated flag reference is current, every
command and snippet is marked and runs, every page is reachable from the README and every link resolves, and
the README's quick start is CI's install and test commands and trains as it says."""
import re
import shlex
import subprocess
import sys

import pytest

from doc_snippets import REPO, environment, extract, free_port, make_scratch, marking_errors, pages, run_page

STEP = re.compile(r"Epoch: 0, Step: (\d+), Loss: ([0-9.]+), Time: ([0-9.]+) ms")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


def _blocks():
    return [b for page in pages() for b in extract(page)]


def _pages_with(marker):
    return [p for p in pages() if any(b.runnable and b.marker == marker for b in extract(p))]


def _name(page):
    return str(page.relative_to(REPO))


# ----------------------------------------------------------------------------------------------- flags.md
def test_flag_reference_is_current():
    run = subprocess.run([sys.executable, str(REPO / "tools" / "gen_flag_reference.py"), "--check"],
                         capture_output=True, text=True, env=environment(), timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr


def test_flag_reference_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "flags.md"
    stale.write_text((REPO / "docs" / "flags.md").read_text().replace("| refused |", "| implemented |", 1))
    run = subprocess.run([sys.executable, str(REPO / "tools" / "gen_flag_reference.py"), "--check", "--output",
                          str(stale)], capture_output=True, text=True, env=environment(), timeout=300)
    assert run.returncode == 1 and "out of date" in run.stderr and "gen_flag_reference.py" in run.stderr


# ----------------------------------------------------------------------------------------------- markers
def test_every_runnable_block_is_marked():
    blocks = _blocks()
    assert sum(b.runnable for b in blocks) > 20, "expected the pages' commands and snippets"
    errors = marking_errors(blocks)
    assert not errors, "\n".join(errors)


def test_exactly_one_quickstart_block_in_the_readme():
    quickstart = [b for b in _blocks() if b.marker == "quickstart"]
    assert len(quickstart) == 1, [b.where() for b in quickstart]
    assert quickstart[0].page == REPO / "README.md"


# ----------------------------------------------------------------------------------------------- links
def _anchor(text: str) -> str:
    """GitHub's heading anchor: link text kept, lower case, punctuation but - and _ dropped, spaces to -."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page):
    seen, found = {}, set()
    in_code = False
    for line in page.read_text().splitlines():
        if re.match(r"^\s*(```|~~~)", line):
            in_code = not in_code
            continue
        m = None if in_code else _HEADING.match(line)
        if m:
            base = _anchor(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def _links(page):
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if re.match(r"^\s*(```|~~~)", line):
            in_code = not in_code
            continue
        if in_code:
            continue
        for target in _LINK.findall(re.sub(r"`[^`]*`", "", line)):
            yield number, target


def test_every_docs_page_is_linked_from_the_readme():
    readme_targets = {(REPO / t.split("#")[0]).resolve() for _, t in _links(REPO / "README.md")
                      if not t.startswith(("http:", "https:", "#"))}
    unlinked = [_name(p) for p in sorted((REPO / "docs").glob("*.md")) if p.resolve() not in readme_targets]
    assert not unlinked, f"docs pages the README does not link to: {unlinked}"


def test_every_relative_link_resolves():
    broken = []
    for page in pages():
        for number, target in _links(page):
            if target.startswith(("http:", "https:", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{_name(page)}:{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{_name(page)}:{number}: {target} (no heading with anchor #{anchor})")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move details into docs/"


# ----------------------------------------------------------------------------------------------- quick start
def _quickstart_commands():
    (block,) = [b for b in _blocks() if b.marker == "quickstart"]
    return [line.strip() for line in block.code.splitlines() if line.strip()]


def _ci_commands():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    install = [l.strip() for l in ci if l.strip().startswith("pip install") and "--upgrade pip" not in l]
    test = [l.strip() for l in ci if l.strip().startswith("python -m pytest")]
    assert len(install) == 1 and len(test) == 1, (install, test)
    return [w for w in shlex.split(install[0]) if w != "--quiet"], shlex.split(test[0])


def test_quickstart_installs_and_tests_as_ci_does():
    install, test = _ci_commands()
    setup, test_line = _quickstart_commands()
    steps = [shlex.split(part) for part in setup.split("&&")]
    assert install in steps, f"the quick start's install step differs from .ci/run's {install}: {steps}"
    assert shlex.split(test_line) == test, f"the quick start's test command differs from .ci/run's: {test_line}"
    assert shlex.split("python3 -m venv .venv") == steps[0]  # a fresh environment, as CI makes


def test_quickstart_trains_the_tiny_gpt(tmp_path):
    """The quick start's training command (the last step of its first line) trains on the bundled corpus:
    the loss falls, evaluation runs, a checkpoint is written, and only the last rank logs."""
    train = shlex.split(_quickstart_commands()[0].split("&&")[-1])
    assert train == ["bash", "examples/gpt/pretrain_gpt.sh"], train
    scratch = make_scratch(tmp_path)
    env = dict(environment(), MASTER_PORT=str(free_port()), LOG_DIR=str(tmp_path / "logs"))
    run = subprocess.run(train + ["--train-iters", "30", "--eval-interval", "15", "--save", str(tmp_path / "ckpt"),
                                  "--save-interval", "20"],
                         cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    last_rank_log = (tmp_path / "logs" / "worker_1.log").read_text(errors="replace")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + last_rank_log[-3000:]
    losses = {int(s): float(l) for s, l, _ in STEP.findall(last_rank_log)}
    assert sorted(losses) == list(range(1, 31))
    assert losses[30] < losses[1] - 1.0, losses  # from ln(1024) ~ 6.9 the loss falls visibly
    assert "validation loss at iteration 15 |" in last_rank_log
    assert "validation loss at iteration 30 on test set |" in last_rank_log
    assert re.search(r"iteration\s+30/\s+30 \| consumed samples:\s+240 \|", last_rank_log)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert "Step:" not in (tmp_path / "logs" / "worker_0.log").read_text(errors="replace")  # one rank logs


# ----------------------------------------------------------------------------------------------- snippets
@pytest.mark.parametrize("page", _pages_with("quick"), ids=_name)
def test_quick_snippets_run(page, tmp_path):
    run_page(page, ("quick",), scratch=make_scratch(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("page", _pages_with("slow"), ids=_name)
def test_slow_snippets_run(page, tmp_path):
    """The page's quick and slow blocks in order (a slow block may use what a quick one wrote)."""
    run_page(page, ("quick", "slow"), scratch=make_scratch(tmp_path), timeout=1800)
