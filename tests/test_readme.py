"""The README's support matrix is the output of `fastadapt matrix`, never edited by hand."""
import pathlib

from fastadapt.cli import support_matrix

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_matrix_is_current():
    text = README.read_text()
    start, end = "<!-- matrix:start -->\n", "<!-- matrix:end -->"
    block = text[text.index(start) + len(start):text.index(end)].strip()
    assert block == support_matrix(markdown=True), "README matrix is stale: run `python -m fastadapt.readme`"


def test_readme_names_the_test_command_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = "python -m pytest -n 2 tests"
    assert command in README.read_text() and command in ci
