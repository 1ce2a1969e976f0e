"""A wheel of cfgen, installed into a fresh venv, runs the demo, ``cfgen run`` and the README snippet anywhere.

The venv reaches this interpreter's site-packages (torch, pyvene, transformers, the
embedded model's package) through a ``.pth`` line, so nothing is downloaded; cfgen
itself comes only from the wheel. Every command runs from an empty temporary folder
without ``PYTHONPATH``, so the source tree cannot be imported by accident.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "_build", "__pycache__",
                                ".pytest_cache", ".hypothesis", ".ruff_cache", "out", "*.so", "cfgen_report.html")


def _run(cmd, *, cwd, env, timeout=600):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)  # a copy: the build writes build/ and *.egg-info next to setup.cfg
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                  tmp / "wheels", src], cwd=tmp, env=env)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp / "wheels").glob("cfgen-*.whl")

    venv = tmp / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp,
                     env=env).stdout.strip())
    # torch & co. from this interpreter's site-packages, appended after the venv's own (a path line in a .pth
    # file is not a site dir: the editable cfgen finder installed there is not run)
    (site / "_cfgen_test_host.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
               cwd=tmp, env=env)
    assert pip.returncode == 0, pip.stderr[-3000:]
    work = tmp / "elsewhere"
    work.mkdir()
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return {"wheel": wheel, "venv": venv, "python": python, "site": site, "work": work, "env": env}


def test_wheel_holds_the_catalogue_and_its_data_licence(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    package = ROOT / "cfgen"
    shipped = {p.relative_to(package.parent).as_posix() for p in (package / "catalogue_data").rglob("*")
               if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "cfgen/catalogue_data/data/ravel_city/LICENSE" in names and "cfgen/_native.c" in names
    assert not any(n.startswith(("interventions/", "tests/")) for n in names)


def test_installed_cfgen_comes_from_the_venv_and_finds_its_catalogue(installed):
    code = ("import cfgen; print(cfgen.__file__); print(cfgen.catalogue.path('steering_dark')); "
            "print(cfgen.catalogue.names())")
    out = _run([installed["python"], "-c", code], cwd=installed["work"], env=installed["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    where, folder, names = out.stdout.strip().splitlines()[-3:]
    assert Path(where).is_relative_to(installed["site"]), where
    assert Path(folder).is_relative_to(installed["site"]) and (Path(folder) / "cfgen_intervention.json").is_file()
    assert names == "['patch_landmark_city', 'ravel_country_das', 'ravel_country_mdas', 'steering_dark']"


def test_demo_runs_from_another_folder(installed):
    work, env = installed["work"], installed["env"]
    out = _run(["cfgen", "demo", "--max-new-tokens", "6", "--num-samples", "1", "--out", "report.html"],
               cwd=work, env=env)
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    for heading in ("== 1. Activation patch", "== 2. Steering vector", "== 3. Hindsight"):
        assert heading in out.stdout
    assert out.stdout.count("interventional (fresh noise)") == 3
    assert "Traceback" not in out.stderr
    page = (work / "report.html").read_text(encoding="utf-8")
    assert page.count("interventional (fresh noise)") == 3 and "</html>" in page


def test_cfgen_run_takes_catalogue_names_and_refuses_unknown_ones_in_one_line(installed):
    work, env = installed["work"], installed["env"]
    out = _run(["cfgen", "run", "--intervention", "steering_dark", "--prompt", "Once upon a time",
                "--max-new-tokens", "4", "--out", "r.jsonl", "--quiet"], cwd=work, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "r.jsonl").read_text().count("\n") == 1
    bad = _run(["cfgen", "run", "--intervention", "steering_drak", "--prompt", "hi"], cwd=work, env=env)
    err = [line for line in bad.stderr.splitlines() if "steering_drak" in line]
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert len(err) == 1 and "steering_dark" in err[0] and "build.py" not in err[0]


def test_readme_snippet_runs_from_another_folder(installed):
    readme = (ROOT / "README.md").read_text()
    snippet = re.search(r"## In a notebook\s+```python\n(.*?)```", readme, re.S).group(1)
    script = installed["work"] / "snippet.py"
    script.write_text(snippet + "\nprint('SNIPPET-OK', cfgen.__file__)\n")
    out = _run([installed["python"], script], cwd=installed["work"], env=installed["env"])
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("SNIPPET-OK"))
    assert Path(line.split(" ", 1)[1]).is_relative_to(installed["site"])
