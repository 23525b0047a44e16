"""What a non-editable install ships: the package builds into a wheel that holds the configs, and from that wheel,
outside the repository, the shipped configs load by name."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_ships_the_configs_and_they_load_by_name_from_anywhere(tmp_path):
    source = tmp_path / "source"  # only what the build needs, so nothing is written into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for folder in ("liteclip", "configs"):
        shutil.copytree(REPO / folder, source / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("liteclip-*.whl"))
    shipped = {Path(name).name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("liteclip/configs/")}
    assert {p.name for p in (REPO / "configs").glob("*.yaml")} == shipped

    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import liteclip\nfrom liteclip.config import load_config\n"
             "print(liteclip.__file__)\nprint(load_config('demo').model.image.name)\n"
             "print(load_config('liteclip.yaml').model.text.name)\n")
    result = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(installed), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    module_file, demo_tower, liteclip_text = result.stdout.split()
    assert Path(module_file).is_relative_to(installed)  # the wheel's copy, not the checkout
    assert demo_tower == "resnet10t" and liteclip_text == "google/bert_uncased_L-4_H-256_A-4"


# what each extra's feature imports: an extra that misses one fails here, in the environment CI built from the README
EXTRA_ENTRY_POINTS = {
    "lora": ["peft", "liteclip.weights.lora"],
    "export": ["onnx", "onnxruntime", "liteclip.export"],
    "shards": ["webdataset", "liteclip.data.shards"],
    "serve": ["fastapi", "uvicorn", "python_multipart", "fastapi.testclient", "liteclip.search.serve"],
    "clip-benchmark": ["clip_benchmark.cli", "liteclip.integrations.clip_benchmark"],  # the cli imports requests
}


def requirement_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_every_extra_installs_what_its_feature_imports_and_dev_holds_every_extra():
    import importlib
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras) - {"dev"} == set(EXTRA_ENTRY_POINTS), "name the modules a new extra's feature imports"
    dev = {requirement_name(requirement) for requirement in extras["dev"]}
    for extra, requirements in extras.items():
        missing = {requirement_name(requirement) for requirement in requirements} - dev
        assert not missing, f"dev lacks {missing} of the {extra} extra, so the suite would not test it"
    for extra, modules in EXTRA_ENTRY_POINTS.items():
        for module in modules:
            importlib.import_module(module)  # no skip: CI installs .[dev], which holds every extra
