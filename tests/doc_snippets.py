"""Find and run the code blocks of README.md and docs/*.md, so the documentation cannot drift from the code.

A fenced block whose language is bash, sh or python is *runnable* and must say when it runs, in its info
string:

    ```bash test=quick            runs in the default test suite (tiny sizes, seconds to ~1 minute)
    ```bash test=slow             runs only with `pytest --run-slow`
    ```bash test=quickstart       the README's quick start: tests/test_docs.py checks it specially
    ```python test=quick ranks=2  a python block run under msrun with 2 workers
    ```python test=quick file=tiny_gpt.py   saved under that name (later blocks may import it), then run

Blocks of other languages (text, yaml, console, ...) are not run. A page's blocks run in order, in one scratch
directory per page holding symlinks to the repository's top-level entries (examples/, tools/, bench/,
convert/, mindtron/, tests/, ...), so a command is written as a user types it from the repository root and a
later block sees the files an earlier one wrote. Environment: PYTHONPATH = the repository and tests/,
MASTER_PORT a free port (fresh for each block), this interpreter first on PATH.

Standalone: `python tests/doc_snippets.py docs/data.md [--slow] [-v]` runs one page and prints each block's time
(and with -v its output).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from multiproc import free_port

REPO = Path(__file__).resolve().parent.parent
RUNNABLE = {"bash", "sh", "python"}
MARKERS = ("quick", "slow", "quickstart")
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_NOISE = ("[INFO]", "[WARNING]", "[DEBUG]")


@dataclass
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    options: Dict[str, str] = field(default_factory=dict)
    """The info string's key=value words, e.g. {"test": "quick", "ranks": "2"}."""
    code: str = ""

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE

    @property
    def marker(self) -> Optional[str]:
        return self.options.get("test")

    @property
    def ranks(self) -> int:
        return int(self.options.get("ranks", "1"))

    def where(self) -> str:
        try:
            name = self.page.relative_to(REPO)
        except ValueError:
            name = self.page
        return f"{name}:{self.line}"


def pages() -> List[Path]:
    """README.md, then docs/*.md by name."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


def extract(page: Path) -> List[Block]:
    """Every fenced block of a Markdown page (indented fences inside list items included)."""
    blocks: List[Block] = []
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent, info = m.group("fence"), m.group("indent"), m.group("info").strip()
        words = info.split()
        lang = words[0].lower() if words and "=" not in words[0] else ""
        options = dict(w.split("=", 1) for w in words if "=" in w)
        body: List[str] = []
        j = i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if close and close.group("fence").startswith(fence[0] * len(fence)) and not close.group("info").strip():
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise ValueError(f"{page}:{i + 1}: code fence never closed")
        blocks.append(Block(page, i + 1, lang, options, textwrap.dedent("\n".join(body)) + "\n"))
        i = j + 1
    return blocks


def marking_errors(blocks: Iterable[Block]) -> List[str]:
    """Runnable blocks without a valid test= marker (or with a bad ranks=), as messages naming page:line."""
    errors = []
    for b in blocks:
        if not b.runnable:
            continue
        if b.marker not in MARKERS:
            errors.append(f"{b.where()}: ```{b.lang} block needs test=quick, test=slow or test=quickstart in its "
                          f"info string (has {b.options or 'nothing'})")
        if "file" in b.options and (b.lang != "python" or "/" in b.options["file"]
                                    or not b.options["file"].endswith(".py")):
            errors.append(f"{b.where()}: file= takes a NAME.py, on python blocks only")
        if "ranks" in b.options:
            if b.lang != "python" or not b.options["ranks"].isdigit() or int(b.options["ranks"]) < 1:
                errors.append(f"{b.where()}: ranks= takes a positive integer, on python blocks only")
    return errors


def make_scratch(base: Optional[Path] = None) -> Path:
    """A fresh directory with a symlink to each top-level entry of the repository (no dot files)."""
    scratch = Path(tempfile.mkdtemp(prefix="mindtron_doc_", dir=str(base) if base else None))
    for entry in REPO.iterdir():
        if not entry.name.startswith("."):
            (scratch / entry.name).symlink_to(entry)
    return scratch


def environment() -> Dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("GLOG_v", "3")
    env.pop("MS_ROLE", None)
    return env


@dataclass
class Outcome:
    block: Block
    returncode: Optional[int]
    """None when the time limit stopped it."""
    output: str
    seconds: float


def run_block(block: Block, scratch: Path, timeout: float, index: int) -> Outcome:
    """Run one block in `scratch`; bash with -e -o pipefail, python directly or under msrun (ranks=N)."""
    env = environment()
    env["MASTER_PORT"] = str(free_port())
    if block.lang == "python":
        script = scratch / block.options.get("file", f"_snippet_{index}.py")
        script.write_text(block.code)
        if block.ranks > 1:
            msrun = Path(sys.executable).parent / "msrun"
            cmd = [str(msrun) if msrun.exists() else "msrun", "--worker_num", str(block.ranks), "--local_worker_num",
                   str(block.ranks), "--master_port", env["MASTER_PORT"], "--log_dir",
                   f"_snippet_{index}_logs", "--join=True", "--cluster_time_out", str(int(timeout)), script.name]
        else:
            cmd = [sys.executable, script.name]
    else:
        script = scratch / f"_snippet_{index}.sh"
        script.write_text(block.code)
        cmd = ["bash", "-e", "-o", "pipefail", script.name]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=str(scratch), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        code: Optional[int] = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate()
        code = None
    return Outcome(block, code, output, time.time() - start)


def _worker_logs(scratch: Path, since: float, tail: int = 40) -> str:
    """The tails of msrun worker logs written in `scratch` since `since` (for failure messages)."""
    parts = []
    for log in sorted(scratch.glob("**/worker_*.log")):
        if log.stat().st_mtime >= since:
            lines = [l for l in log.read_text(errors="replace").splitlines() if not l.startswith(_NOISE)]
            parts.append(f"----- {log.relative_to(scratch)} -----\n" + "\n".join(lines[-tail:]))
    return "\n".join(parts)


def run_page(page: Path, markers=("quick",), scratch: Optional[Path] = None, timeout: float = 600,
             report=None) -> List[Outcome]:
    """Run the page's runnable blocks carrying one of `markers`, in order, in one scratch directory.

    Raises AssertionError at the first failing block, naming it and showing its output and worker logs."""
    scratch = scratch or make_scratch()
    outcomes = []
    for index, block in enumerate(extract(page)):
        if not block.runnable or block.marker not in markers:
            continue
        started = time.time()
        outcome = run_block(block, scratch, timeout, index)
        outcomes.append(outcome)
        if report:
            report(outcome)
        if outcome.returncode != 0:
            why = "timed out" if outcome.returncode is None else f"exited with {outcome.returncode}"
            raise AssertionError(f"{block.where()} ({block.lang} test={block.marker}) {why} after "
                                 f"{outcome.seconds:.0f} s in {scratch}\n----- block -----\n{block.code}"
                                 f"----- output -----\n{outcome.output[-4000:]}\n{_worker_logs(scratch, started)}")
    return outcomes


def main(argv: List[str]) -> int:
    slow, verbose = "--slow" in argv, "-v" in argv
    targets = [Path(a).resolve() for a in argv if not a.startswith("-")] or pages()
    for page in targets:
        run_page(page, ("quick", "slow") if slow else ("quick",),
                 report=lambda o: print(f"{o.block.where():32s} {o.block.lang:6s} test={o.block.marker:5s} "
                                        f"{o.seconds:6.1f} s" + (f"\n{o.output}" if verbose else ""), flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
