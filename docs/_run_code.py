"""Runs the Python code blocks of the documentation and checks their printed output.

Every fenced ``python`` block of a page runs, in page order, in one fresh
process per page (so a page reads like a notebook: later blocks see what earlier
ones defined), on 8 CPU devices, in a scratch working directory. A ``text``
block that directly follows a ``python`` block is that block's expected
standard output, compared as doctest does with ``ELLIPSIS`` and
``NORMALIZE_WHITESPACE`` (``...`` matches anything). Other blocks (``sh``,
``toml``) are not run.

    python docs/_run_code.py                 # every page
    python docs/_run_code.py docs/quickstart.md docs/guides/linen.md

Exit status 0 when every block ran and printed what its page shows.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent
TITLE = re.compile(r'title="([^"]+)"')
FENCE = re.compile(
    r"^(?P<indent> *)(?P<fence>`{3,})(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)(?P=fence)[ \t]*$",
    re.S | re.M,
)


@dataclass
class Block:
    """One ``python`` block: its source, where it starts, and the output its page shows."""

    source: str
    line: int
    expected: str | None = None
    write_to: str | None = None


def blocks(page: Path) -> list[Block]:
    """The page's ``python`` blocks, each with the ``text`` block that follows it, if any."""
    text = page.read_text()
    found: list[Block] = []
    previous_end = None
    for match in FENCE.finditer(text):
        language = match.group("info").strip().split(" ")[0].strip("{}.")
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in match.group("body").splitlines()) + "\n"
        line = text.count("\n", 0, match.start()) + 2
        between = text[previous_end : match.start()] if previous_end is not None else None
        if language == "python":
            title = TITLE.search(match.group("info"))
            found.append(Block(body, line, write_to=title.group(1) if title else None))
        elif language == "text" and found and between is not None and not between.strip():
            if found[-1].expected is None and found[-1].line < line:
                found[-1].expected = body
        previous_end = match.end()
    return found


DRIVER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
results = []
for block in blocks:
    out = io.StringIO()
    try:
        if block["write_to"]:
            with open(block["write_to"], "w") as f:
                f.write(block["source"])
        else:
            with contextlib.redirect_stdout(out):
                exec(compile(block["source"], block["name"], "exec"), namespace)
        error = None
    except BaseException:
        error = traceback.format_exc()
    results.append({"stdout": out.getvalue(), "error": error})
    if error:
        break
json.dump(results, open(sys.argv[2], "w"))
"""


def run_page(page: Path) -> list[str]:
    """Runs a page's blocks; returns the problems found (empty when all is well)."""
    import doctest

    page_blocks = blocks(page)
    if not page_blocks:
        return []
    name = page.relative_to(DOCS.parent)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(DOCS.parent), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        spec = Path(scratch, "blocks.json")
        result = Path(scratch, "results.json")
        work = Path(scratch, "work")
        work.mkdir()
        spec.write_text(
            json.dumps(
                [
                    {"source": b.source, "name": f"{name}:{b.line}", "write_to": b.write_to}
                    for b in page_blocks
                ]
            )
        )
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(spec), str(result)],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not result.exists():
            return [f"{name}: the page's process failed:\n{proc.stderr[-3000:]}"]
        results = json.loads(result.read_text())
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    problems = []
    for block, res in zip(page_blocks, results, strict=False):
        where = f"{name}:{block.line}"
        if res["error"]:
            problems.append(f"{where}: raised\n{res['error']}")
            break
        if block.expected is not None and not checker.check_output(
            block.expected, res["stdout"], flags
        ):
            problems.append(
                f"{where}: printed\n{res['stdout']}\nbut the page shows\n{block.expected}"
            )
    return problems


def pages(args: list[str]) -> list[Path]:
    """The pages named on the command line, or every page of the docs."""
    if args:
        return [Path(a).resolve() for a in args]
    return sorted(DOCS.rglob("*.md"))


def main(args: list[str]) -> int:
    """Runs the pages; prints each page's result; returns the exit status."""
    failed = 0
    for page in pages(args):
        problems = run_page(page)
        n = len(blocks(page))
        status = "ok" if not problems else "FAILED"
        print(f"{page.relative_to(DOCS.parent)}: {n} block(s) {status}", flush=True)
        for problem in problems:
            print(problem, flush=True)
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
