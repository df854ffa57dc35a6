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


def _extras() -> dict:
    """setup.py's extras_require, read from its source (no install needed)."""
    import ast
    tree = ast.parse((README.parent / "setup.py").read_text())
    env = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
           if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return {k.value: [env.get(getattr(v, "id", None), getattr(v, "value", None)) for v in value.elts]
                    for k, value in zip(node.value.keys, node.value.values)}
    raise AssertionError("setup.py has no extras_require")


def _main_job_command() -> str:
    text = README.read_text()
    section = text[text.index("## Two commands"):text.index("## What is fast today")]
    return next(line for line in section.splitlines() if line.startswith("python3 -m venv") and "fastadapt bench" in line)


def test_readme_main_job_runs_the_quick_benchmark_and_draws_it():
    command = _main_job_command()
    assert "fastadapt bench --quick" in command and "fastadapt plot" in command


def test_readme_install_brings_matplotlib_for_fastadapt_plot():
    import re
    extras = _extras()
    installed = re.findall(r'pip install -e "\.\[([a-z,]+)\]"', _main_job_command())
    assert installed, "the main job installs the package with an extra"
    assert any("matplotlib" in extras[name] for name in installed[0].split(","))
