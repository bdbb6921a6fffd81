"""Static checks of the Slicer module, no Slicer needed: the Python, the .ui, CMake, the dependency rule."""

from __future__ import annotations

import ast
import importlib
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "MicroCTSynth"
MODULE_PY = MODULE_DIR / "MicroCTSynth.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MicroCTSynth.ui"
ENGINE = ROOT / "MicroCTSynthLib"


@pytest.fixture(scope="module")
def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


@pytest.fixture(scope="module")
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def parameter_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of the ``@parameterNodeWrapper`` class."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(d, ast.Name) and d.id == "parameterNodeWrapper") for d in node.decorator_list
        ):
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("MicroCTSynth.py has no @parameterNodeWrapper class")


def choice_values(tree: ast.Module, expression: str) -> list:
    """The values of a ``Choice(...)``: a literal list, or ``list(NAME)`` of a name the module imports
    from the engine (``from MicroCTSynthLib.x import NAME``), read from the engine itself."""
    engine = {a.asname or a.name: (n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom)
              and (n.module or "").startswith("MicroCTSynthLib") for a in n.names}
    names = {"list": list}
    for node in ast.walk(ast.parse(expression, mode="eval")):
        if isinstance(node, ast.Name) and node.id in engine:
            module, attribute = engine[node.id]
            names[node.id] = getattr(importlib.import_module(module), attribute)
    return eval(expression, {"__builtins__": {}}, names)  # noqa: S307 - the module's own annotation


def ui_widgets(root: ET.Element) -> dict[str, ET.Element]:
    return {w.get("name"): w for w in root.iter("widget")}


def string_property(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            s = prop.find("string")
            return None if s is None else s.text
    return None


def test_module_compiles():
    compile(MODULE_PY.read_text(), str(MODULE_PY), "exec")
    compile((MODULE_DIR / "MicroCTSynthTesting" / "scenario.py").read_text(), "scenario.py", "exec")


def test_module_has_the_template_structure(module_tree):
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in module_tree.body if isinstance(n, ast.ClassDef)}
    assert classes["MicroCTSynth"] == ["ScriptedLoadableModule"]
    assert "ScriptedLoadableModuleWidget" in classes["MicroCTSynthWidget"]
    assert classes["MicroCTSynthLogic"] == ["ScriptedLoadableModuleLogic", "MicroCTSynthSceneLogic"]
    assert classes["MicroCTSynthTest"] == ["ScriptedLoadableModuleTest"]
    text = MODULE_PY.read_text()
    assert '"Segmentation")' in text and "Sun" in text and "2021" in text  # category, thesis cited


def test_ui_is_valid_xml(ui_root):
    assert ui_root.tag == "ui"
    top = ui_root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "MicroCTSynth"
    names = [w.get("name") for w in ui_root.iter("widget")]
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_slicer_parameter_name_is_a_parameter_node_field(module_tree, ui_root):
    fields = parameter_fields(module_tree)
    bound = {name: string_property(w, "SlicerParameterName") for name, w in ui_widgets(ui_root).items()}
    bound = {k: v for k, v in bound.items() if v}
    assert bound, "no widget is bound to the parameter node"
    unknown = {widget: p for widget, p in bound.items() if p not in fields}
    assert not unknown, f"SlicerParameterName without a parameter node field: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"


#: Which widget may represent which kind of field (the connectors of slicer.parameterNodeWrapper).
WIDGET_TYPES = {
    "QCheckBox": lambda a: a == "bool",
    "QSpinBox": lambda a: re.fullmatch(r"(Annotated\[)?int\b.*", a) is not None,
    "ctkSliderWidget": lambda a: re.fullmatch(r"(Annotated\[)?float\b.*", a) is not None,
    "QLineEdit": lambda a: a == "str",
    "QComboBox": lambda a: a.startswith("Annotated[str, Choice("),
    "ctkPathLineEdit": lambda a: a == "pathlib.Path",
    "qMRMLNodeComboBox": lambda a: a.startswith("vtkMRML"),
}


def test_bound_widgets_can_represent_their_fields(module_tree, ui_root):
    fields = parameter_fields(module_tree)
    for name, widget in ui_widgets(ui_root).items():
        param = string_property(widget, "SlicerParameterName")
        if not param:
            continue
        cls, annotation = widget.get("class"), fields[param]
        assert cls in WIDGET_TYPES, f"{name}: no connector for {cls}"
        assert WIDGET_TYPES[cls](annotation), f"{name} ({cls}) cannot show {param}: {annotation}"
        if cls == "qMRMLNodeComboBox":
            types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert types == [annotation], f"{name} lists {types} for a {annotation}"
        if cls == "QComboBox":
            items = [i.find("property/string").text for i in widget.findall("item")]
            choices = choice_values(module_tree, re.search(r"Choice\((.*)\)\]$", annotation).group(1))
            assert items == choices, f"{name}: items {items} differ from the choices {choices}"


def test_every_ui_name_the_widget_uses_exists(module_tree, ui_root):
    used = {
        n.attr for n in ast.walk(module_tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute) and n.value.attr == "ui"
        and isinstance(n.value.value, ast.Name) and n.value.value.id == "self"
    }
    assert {"trainButton", "progressBar", "statusLabel"} <= used
    missing = used - set(ui_widgets(ui_root))
    assert not missing, f"self.ui names missing from the .ui: {sorted(missing)}"


def test_every_button_starts_disabled_until_its_inputs_exist(ui_root):
    buttons = [w for w in ui_root.iter("widget") if w.get("class") == "QPushButton"]
    assert len(buttons) >= 9
    for button in buttons:
        enabled = [p.find("bool").text for p in button.findall("property") if p.get("name") == "enabled"]
        assert enabled == ["false"], f"{button.get('name')} is enabled before its inputs exist"


def test_no_heavy_import_at_module_import(module_tree):
    """Dependencies are checked on first use, never at import: torch and scikit-image stay out."""
    top_level = set()
    for node in module_tree.body:
        if isinstance(node, ast.Import):
            top_level |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top_level.add(node.module.split(".")[0])
    assert not top_level & {"torch", "skimage", "scipy", "monai"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_one_direction_of_dependency():
    """Only mrml.py talks to Slicer, and never to Qt or the application."""
    for path in sorted(ENGINE.glob("*.py")):
        found = _imports(path) & {"slicer", "qt", "ctk", "vtk", "__main__"}
        if path.name == "mrml.py":
            assert found <= {"slicer", "vtk"}, f"mrml.py imports {found}"
            used = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "slicer"}
            assert not used & {"app", "util"}, "mrml.py must not reach for the Slicer application"
        else:
            assert not found, f"{path.name} imports {found}"


def test_cmake_lists_name_existing_files():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r'set\(EXTENSION_CATEGORY "Segmentation"\)', top)
    assert re.search(r'set\(EXTENSION_DEPENDS "PyTorch"\)', top)
    assert "add_subdirectory(MicroCTSynth)" in top
    module = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module and "slicer_add_python_unittest" in module
    block = re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s+(.*?)\)", module, re.S)
    files = [f.replace("${MODULE_NAME}", "MicroCTSynth") for b in block for f in b.split()]
    assert files
    for f in files:
        assert (MODULE_DIR / f).is_file(), f"MicroCTSynth/CMakeLists.txt names a missing file {f}"
    # The engine's package data is installed with its scripts: presets now, shipped models later.
    assert "MicroCTSynthLib/Resources/presets/*.json" in module and "MicroCTSynthLib/Resources/models/*" in module
    assert sorted(p.name for p in (ENGINE / "Resources" / "presets").glob("*.json")) == [
        "paper.json", "pretrained-calibrated.json", "pretrained-context48.json", "pretrained-harmonized.json",
        "pretrained-harmonized10.json", "pretrained-long.json",
        "pretrained-robust.json", "pretrained-robust40.json", "pretrained-wide.json", "pretrained.json",
        "quick.json", "tiny.json"]


def _always_true(test: ast.expr) -> bool:
    """A generator, a tuple, a comprehension, a lambda or a true literal: true whatever the code does."""
    if isinstance(test, ast.BoolOp):
        return any(_always_true(v) for v in test.values) if isinstance(test.op, ast.And) else False
    if isinstance(test, ast.Constant):
        return bool(test.value)
    return isinstance(test, (ast.GeneratorExp, ast.Tuple, ast.ListComp, ast.SetComp, ast.DictComp, ast.Lambda, ast.JoinedStr))


def test_every_assert_can_fail():
    """``assert (x > 0 for x in xs)`` passes whatever ``xs`` holds (a generator object is true): every
    assert of the tests and the self-test (and ``assertTrue``) tests a value, e.g. ``all(...)``."""
    vacuous = []
    for path in sorted([*(ROOT / "Testing").glob("*.py"), *MODULE_DIR.rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                test = node.test
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "assertTrue" and node.args:
                test = node.args[0]
            else:
                continue
            if _always_true(test):
                vacuous.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert vacuous == [], f"asserts that cannot fail: {vacuous}"
    assert _always_true(ast.parse("assert (x for x in [0])").body[0].test)
    assert not _always_true(ast.parse("assert all(x for x in [0])").body[0].test)


@pytest.mark.parametrize("icon", [MODULE_DIR / "Resources" / "Icons" / "MicroCTSynth.png", ROOT / "Resources" / "Icons" / "MicroCTSynth.png"])
def test_icons_are_128_pixel_pngs(icon):
    head = icon.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (128, 128)


def _engine_imports(module: str) -> tuple[set[str], set[str]]:
    """(engine modules, outside import names) a module of the engine imports, anywhere in it (cli.py
    imports each command's module by name when it runs: each step lists its own engine module)."""
    internal, external = set(), set()
    tree = ast.parse((ENGINE / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            internal |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            external.add(node.module)
        elif isinstance(node, ast.Import):
            external |= {a.name for a in node.names}
    return internal, external


#: The engine modules each step of the panel runs (in Slicer's process or as the job's command).
STEP_MODULES = {
    "register": ["cli", "registration"], "tissueMap": ["tissue"], "addCase": ["dataset", "registration", "tissue"],
    "train": ["cli", "train"], "synthesize": ["cli", "synthesize"], "atlas": ["cli", "atlas"], "compare": ["metrics"],
}
#: Import name -> the distribution the module installs (numpy, vtk, slicer come with Slicer).
DISTRIBUTIONS = {"torch.utils.tensorboard": "tensorboard", "torch": "torch", "SimpleITK": "SimpleITK", "skimage": "scikit-image",
                 "scipy": "scipy", "tqdm": "tqdm", "matplotlib": "matplotlib", "tensorboard": "tensorboard",
                 "monai": "monai"}


def test_each_step_asks_for_exactly_the_packages_its_engine_modules_import(module_tree):
    """STEP_PACKAGES of MicroCTSynth.py against the imports of the engine modules each step runs
    (followed through the engine): no step waits for a package it never uses, none lacks one."""
    declared = next(ast.literal_eval(n.value) for n in module_tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "STEP_PACKAGES")
    for step, modules in STEP_MODULES.items():
        seen, todo, needed = set(), list(modules), set()
        while todo:
            module = todo.pop()
            if module in seen or not (ENGINE / f"{module}.py").is_file():
                continue
            seen.add(module)
            internal, external = _engine_imports(module)
            todo += sorted(internal)
            for name in external:
                for prefix in sorted(DISTRIBUTIONS, key=len, reverse=True):
                    if name == prefix or name.startswith(prefix + "."):
                        needed.add(DISTRIBUTIONS[prefix])
                        break
        assert set(declared[step]) == needed, f"{step}: declared {sorted(declared[step])}, its modules import {sorted(needed)}"


def test_required_packages_are_the_projects_dependencies(module_tree):
    """REQUIRED_PACKAGES of MicroCTSynth.py names pyproject.toml's dependencies (less numpy, which
    Slicer ships): the extension has no pyproject.toml to read them from at run time."""
    declared = next(ast.literal_eval(n.value) for n in module_tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", "") == "REQUIRED_PACKAGES")
    block = re.search(r"^dependencies = \[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M).group(1)
    dependencies = {re.match(r"[A-Za-z0-9_.-]+", d).group(0) for d in re.findall(r'"([^"]+)"', block)}
    assert set(declared) == dependencies - {"numpy"}
    assert all(DISTRIBUTIONS.get(module, name) == name for name, module in declared.items())


REPOSITORY = "https://github.com/microctsynth/SlicerMicroCTSynth"
RAW_FILES = "https://raw.githubusercontent.com/microctsynth/SlicerMicroCTSynth/main/"


def test_extension_metadata_is_what_the_extensions_index_accepts():
    """Homepage, icon and screenshots are https addresses of this repository (the icon and the
    screenshots of files it holds); category, contributors and description are filled in."""
    top = (ROOT / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_[A-Z_]+) "([^"]*)"\)', top))
    assert meta["EXTENSION_HOMEPAGE"] == REPOSITORY
    assert meta["EXTENSION_CATEGORY"] and meta["EXTENSION_CONTRIBUTORS"] and len(meta["EXTENSION_DESCRIPTION"]) > 40
    screenshots = meta["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots
    for url in [meta["EXTENSION_ICONURL"], *screenshots]:
        assert url.startswith(RAW_FILES), f"{url} is not an https address of a file of this repository"
        path = ROOT / url[len(RAW_FILES):]
        assert path.is_file(), f"{url} names {path}, which does not exist"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "docs/images/module_panel.png" in meta["EXTENSION_SCREENSHOTURLS"]
    readme = (ROOT / "README.md").read_text()
    assert REPOSITORY in readme
