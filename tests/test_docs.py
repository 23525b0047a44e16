"""The README and docs/ cannot rot: every block marked runnable (```bash runnable, ```python runnable) runs, in order,
in a sandbox with the repository's configs, where configs/demo.yaml trains a tiny model; and every relative link
points at a file that exists.

Rules of the sandbox: `pip install ...` and `python3 -m venv ...` commands are not run (the suite runs in the
installed package, in its environment), nor is `python -m pytest` (this is the suite). `liteclip` and `python` are
the interpreter running the tests, however it was installed. Blocks without the marker are not run: commands that
need the network, GPUs or data you download, and placeholders like photo.jpg.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
RUNNABLE_BLOCK = re.compile(r"^```(bash|python) runnable\n(.*?)^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)#\s]+)(?:#[^)]*)?\)")
NOT_RUN = re.compile(r"^\s*(pip install\b|python -m pytest\b)")
NEW_ENVIRONMENT = re.compile(r"^\s*python3? -m venv\b")  # the line, activation included: the suite's own is used
# the demo, small enough for a test: 64 images at 32 px, timm's test network, 2 epochs
TINY_DEMO = {"model": {"image": {"name": "test_convnext3", "image_size": 32, "model_kwargs": {}},
                       "text": {"max_length": 16}, "projection": {"dim": 32}},
             "data": {"demo_num_images": 64, "demo_image_size": 32, "batch_size": 16},
             "optim": {"warmup_steps": 2}, "train": {"epochs": 2}}


def runnable_blocks(document: Path) -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in RUNNABLE_BLOCK.finditer(document.read_text())]


def merged(base: dict, changes: dict) -> dict:
    for key, value in changes.items():
        base[key] = merged(base.get(key) or {}, value) if isinstance(value, dict) and value else value  # {} clears
    return base


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A working directory laid out like the repository, with the tiny demo trained once."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(REPO / "configs", root / "configs")
    shutil.copy(REPO / "train.py", root / "train.py")
    demo = root / "configs" / "demo.yaml"
    demo.write_text(yaml.safe_dump(merged(yaml.safe_load(demo.read_text()), TINY_DEMO)))
    tools = root / ".bin"
    tools.mkdir()
    # a script, not a link: a venv's interpreter started through a link outside the venv misses its pyvenv.cfg
    (tools / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tools / "python").chmod(0o755)
    (tools / "liteclip").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m liteclip "$@"\n')
    (tools / "liteclip").chmod(0o755)
    environment = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO),
                   "TOKENIZERS_PARALLELISM": "false"}
    run(root, environment, "bash", "python train.py --config configs/demo.yaml --no-progress")
    return root, environment


def run(root: Path, environment: dict[str, str], language: str, code: str) -> None:
    if language == "bash":
        # a `pip install ... && next` line keeps what follows the &&
        lines = [line.split("&&", 1)[1] if NOT_RUN.match(line) and "&&" in line else line
                 for line in code.splitlines() if not NEW_ENVIRONMENT.match(line)]
        code = "\n".join(line for line in lines if not NOT_RUN.match(line))
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    result = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, f"{code}\n--- exit {result.returncode}:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_runnable_block_runs(document, sandbox):
    root, environment = sandbox
    for language, code in runnable_blocks(document):
        run(root, environment, language, code)


def test_the_readme_and_every_topic_have_runnable_blocks():
    """The marker is spelled one way: a typo would quietly turn a block into one that is never run."""
    for document in DOCUMENTS:
        text = document.read_text()
        fences = re.findall(r"^```(\w+)[ \t]+(\S+)", text, re.MULTILINE)
        assert all(word == "runnable" for _, word in fences), (document, fences)
    with_blocks = {document.name for document in DOCUMENTS if runnable_blocks(document)}
    assert {"README.md", "training.md", "data.md", "inference.md", "export.md"} <= with_blocks


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_point_at_files_that_exist(document):
    targets = [target for target in LINK.findall(document.read_text()) if "://" not in target]
    missing = [target for target in targets if not (document.parent / target).exists()]
    assert not missing, f"{document.name} links to {missing}"


def test_the_readme_reaches_its_first_section_within_thirty_lines():
    lines = (REPO / "README.md").read_text().splitlines()
    first_section = next(number for number, line in enumerate(lines, 1) if line.startswith("## "))
    assert first_section <= 30


def test_every_test_the_docs_name_as_proof_exists():
    """docs/guarantees.md (and any page) proves each promise by naming tests: a renamed or deleted test must not
    leave a promise standing on nothing."""
    named = {(path, name) for document in DOCUMENTS
             for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)", document.read_text())}
    assert len(named) > 40
    missing = [f"{path}::{name}" for path, name in sorted(named)
               if not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.MULTILINE)]
    assert not missing, f"the docs name tests that do not exist: {missing}"
