"""Rewrite the generated blocks of README.md: ``python -m fastadapt.readme [bench_table.md]``.

The support matrix comes from :func:`fastadapt.cli.support_matrix`; the benchmark block, when a
results Markdown file is given, is copied from it verbatim.
"""
from __future__ import annotations

import pathlib
import sys

from .cli import support_matrix


def replace_block(text: str, tag: str, body: str) -> str:
    start, end = f"<!-- {tag}:start -->\n", f"<!-- {tag}:end -->"
    i, j = text.index(start) + len(start), text.index(end)
    return text[:i] + body.strip() + "\n" + text[j:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    readme = pathlib.Path.cwd() / "README.md"
    text = replace_block(readme.read_text(), "matrix", support_matrix(markdown=True))
    if argv:  # the results file's own title becomes a sub-heading of the README's section
        table = pathlib.Path(argv[0]).read_text().replace("# fastadapt benchmark", "#### fastadapt benchmark", 1)
        text = replace_block(text, "bench", table)
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
