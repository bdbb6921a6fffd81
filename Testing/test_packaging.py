"""What reaches a user outside this folder: the wheel with its package data, and Python 3.9.

3D Slicer 5.8 runs Python 3.9 (5.10 and later 3.12), and a ``pip install`` inside Slicer or on
a server gets the wheel, not this source folder.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Everything Slicer imports or runs: the module and the whole engine.
SLICER_CODE = [ROOT / "MicroCTSynth", ROOT / "MicroCTSynthLib"]


def _clean_env() -> dict:
    """The environment of a user's shell: no PYTHONPATH leading to this source folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return env


def _run(cmd, cwd, timeout=180) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_in_a_fresh_environment_has_its_presets_and_runs(tmp_path):
    """Build the wheel from the files a source distribution holds, install it alone into a new
    virtual environment, and run the command line from there (no source folder on the path)."""
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel needs setuptools>=77 (test extras)")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "MicroCTSynthLib", source / "MicroCTSynthLib", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", source],
         cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("microctsynth-*.whl")

    # A fresh environment with only the wheel installed; the heavy dependencies (torch, ...) are
    # borrowed from this interpreter's site-packages through a .pth line, after the wheel's own.
    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).stdout.strip())
    borrowed = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "borrowed_dependencies.pth").write_text("\n".join(borrowed) + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], cwd=tmp_path)

    # The presets are files of the installed package, listed in its RECORD.
    probe = ("import json, MicroCTSynthLib, importlib.metadata as m\n"
             "from MicroCTSynthLib.package_data import preset_file\n"
             "files = [str(f) for f in m.files('microctsynth')]\n"
             "print(json.dumps({'package': MicroCTSynthLib.__file__, 'files': files,\n"
             "                  'tiny': preset_file('tiny').is_file()}))\n")
    found = json.loads(_run([python, "-c", probe], cwd=tmp_path).stdout.strip().splitlines()[-1])
    assert Path(found["package"]).resolve().is_relative_to(site.resolve()), found["package"]
    assert {"MicroCTSynthLib/Resources/presets/paper.json", "MicroCTSynthLib/Resources/presets/quick.json",
            "MicroCTSynthLib/Resources/presets/tiny.json"} <= set(found["files"])
    assert found["tiny"]

    # The command line of the installed wheel, as a user runs it.
    script = env_dir / ("Scripts/microctsynth.exe" if os.name == "nt" else "bin/microctsynth")
    data = tmp_path / "phantom"
    _run([script, "phantom", "--preset", "tiny", "--out", data, "--progress", "none"], cwd=tmp_path)
    _run([script, "prepare", "--data", data, "--progress", "none"], cwd=tmp_path)
    out = _run([script, "train", "--data", data, "--group", "A", "--preset", "tiny", "--out", tmp_path / "run",
                "--epochs-constant", "1", "--epochs-decay", "0", "--device", "cpu", "--progress", "json"], cwd=tmp_path)
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "result" and Path(events[-1]["outputs"]["best"]).is_file()


@pytest.mark.slow
def test_slicer_code_runs_on_python_3_9():
    """``vermin`` finds no language feature or standard-library call newer than Python 3.9 in
    the module and the engine (annotations are strings there: ``from __future__ import annotations``)."""
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).is_file():
        pytest.skip("vermin is not installed (pip install '.[test]')")
    out = subprocess.run([vermin, "--target=3.9-", "--no-tips", "--violations", "--backport", "typing_extensions",
                          *map(str, SLICER_CODE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"code that Python 3.9 cannot run:\n{out.stdout}\n{out.stderr}"


def _annotations(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs + [node.args.vararg, node.args.kwarg]
            yield from (a.annotation for a in arguments if a is not None and a.annotation is not None)
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, ast.AnnAssign):
            yield node.annotation


def test_union_annotations_are_strings_on_python_3_9():
    """``X | None`` in an annotation runs on 3.9 only as a string: the file needs
    ``from __future__ import annotations``, and the parameter node class (which Slicer's
    ``parameterNodeWrapper`` evaluates) must not use it at all. vermin cannot tell these apart."""
    offenders = []
    for path in (p for folder in SLICER_CODE for p in sorted(folder.rglob("*.py"))):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        future = any(isinstance(n, ast.ImportFrom) and n.module == "__future__" and any(a.name == "annotations" for a in n.names)
                     for n in tree.body)
        evaluated = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                     and any(ast.unparse(d).endswith("parameterNodeWrapper") for d in n.decorator_list)]
        for annotation in _annotations(tree):
            union = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation))
            in_wrapper = any(annotation in list(ast.walk(c)) for c in evaluated)
            if union and (not future or in_wrapper):
                offenders.append(f"{path.relative_to(ROOT)}:{annotation.lineno} {ast.unparse(annotation)}")
    assert not offenders, "annotations Python 3.9 would evaluate and fail on:\n" + "\n".join(offenders)


def _python39() -> str | None:
    candidates = sorted(str(p) for p in Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))
    candidates.append(shutil.which("python3.9"))
    for candidate in filter(None, candidates):
        try:  # a pyenv shim answers with an error when no 3.9 is selected
            out = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.returncode == 0 and out.stdout.startswith("Python 3.9"):
            return candidate
    return None


def test_slicer_code_compiles_with_python_3_9(tmp_path):
    """Where a Python 3.9 is at hand, it compiles every file (the syntax vermin reasons about)."""
    python39 = _python39()
    if python39 is None:
        pytest.skip("no python3.9 on this machine")
    files = [str(p) for folder in SLICER_CODE for p in sorted(folder.rglob("*.py"))]
    code = ("import sys\nfor f in sys.argv[1:]:\n"
            "    compile(open(f, encoding='utf-8').read(), f, 'exec')\n")
    out = subprocess.run([python39, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]


def test_the_engine_core_runs_on_python_3_9(tmp_path):
    """Where a Python 3.9 is at hand, the engine's standard-library parts run on it: presets read
    through importlib.resources, the command line's parser, a background job and its progress."""
    python39 = _python39()
    if python39 is None:
        pytest.skip("no python3.9 on this machine")
    script = tmp_path / "core39.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        from MicroCTSynthLib.cli import build_parser
        from MicroCTSynthLib.package_data import shipped_models
        from MicroCTSynthLib.presets import load_preset
        from MicroCTSynthLib.process import Job, JobState
        assert sys.version_info[:2] == (3, 9)
        assert load_preset("tiny")["name"] == "tiny" and isinstance(shipped_models(), dict)
        assert load_preset({str(ROOT / "benchmarks" / "presets" / "quick-context48.json")!r})["patch_size"] == 48
        args = build_parser().parse_args(["synthesize", "--model", "m", "--ct", "c", "--out-microct", "a",
                                          "--out-tissue", "b", "--roi-center=-1,2,3", "--roi-size", "2"])
        assert (args.roi_center, args.roi_size) == ("-1,2,3", "2")
        child = "from MicroCTSynthLib.progress import Progress\\nwith Progress(3, 'x', mode='json') as p:\\n" \\
                "    [p.update() for _ in range(3)]\\nimport json; print(json.dumps({{'event': 'result', 'outputs': {{}}}}))"
        job = Job([sys.executable, "-c", child]).start()
        assert job.wait(timeout=60) == JobState.DONE and job.progress["step"] == 3, (job.state, job.error)
        print("ok")
    """))
    env = {**_clean_env(), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([python39, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
