"""A dataset folder: one sub-folder per case and ``cases.json`` with the leave-2-out groups.

Layout (written by ``microctsynth phantom``, completed by ``microctsynth prepare``)::

    DIR/cases.json
    DIR/S3_1/ct.nrrd                  clinical CT, native grid, HU
    DIR/S3_1/microct.nrrd             micro-CT (the registration's fixed image)
    DIR/S3_1/labels_true.nrrd         phantom only: the truth, 0 outside / 1 air / 2 soft tissue / 3 bone
    DIR/S3_1/ct_to_microct_true.tfm   phantom only: the true transform
    DIR/S3_1/ct_to_microct.tfm        prepare: the estimated transform (micro-CT point -> CT point)
    DIR/S3_1/ct_registered.nrrd       prepare: CT resampled onto the micro-CT grid
    DIR/S3_1/tissue.nrrd              prepare: the micro-CT's tissue map (the training target)
    DIR/S3_1/naive_tissue.nrrd        prepare: the same Otsu + closing on the registered CT

``cases.json``::

    {"cases": {"S3_1": {"ct": "S3_1/ct.nrrd", "microct": "S3_1/microct.nrrd", ...}, ...},
     "groups": {"A": {"train": [...], "val": [...], "test": [...]}, ...},
     "preset": "quick"}

Paths in ``cases.json`` are relative to the folder and must stay inside it: a dataset is a
sandbox, so an absolute path, a ``..`` or a symbolic link leading out of it is refused, and
``cases.json`` is checked against its schema (:func:`validate`) with one sentence per problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import MicroCTSynthError
from .volume import atomic_path

#: The thesis' study codes of the six temporal-bone specimens.
SPECIMENS = ("S3_1", "S3_2", "S3_7", "S3_8", "S3_11", "S3_12")

#: The thesis' leave-2-out groups (Table 1).
THESIS_GROUPS = {
    "A": {"test": ["S3_2", "S3_7"], "train": ["S3_1", "S3_11", "S3_12"], "val": ["S3_8"]},
    "B": {"test": ["S3_1", "S3_8"], "train": ["S3_2", "S3_11", "S3_12"], "val": ["S3_7"]},
    "C": {"test": ["S3_11", "S3_12"], "train": ["S3_2", "S3_7", "S3_8"], "val": ["S3_1"]},
}

#: File names inside a case folder, by role.
CASE_FILES = {
    "ct": "ct.nrrd",
    "microct": "microct.nrrd",
    "labels_true": "labels_true.nrrd",
    "true_transform": "ct_to_microct_true.tfm",
    "transform": "ct_to_microct.tfm",
    "ct_registered": "ct_registered.nrrd",
    "tissue": "tissue.nrrd",
    "naive_tissue": "naive_tissue.nrrd",
}

CASES_FILE = "cases.json"

#: The parts of a leave-k-out group, in the order ``cases.json`` lists them.
SPLITS = ("train", "val", "test")


def inside(root, rel, what: str = "A path") -> Path:
    """``root / rel``, refused unless it is relative and stays inside ``root`` (symbolic links followed)."""
    root = Path(root)
    if not isinstance(rel, (str, os.PathLike)) or not str(rel).strip():
        raise MicroCTSynthError(f"{what} must be a file name relative to the dataset folder, not {rel!r}.")
    rel_path = Path(rel)
    if rel_path.is_absolute() or rel_path.drive:
        raise MicroCTSynthError(f"{what} '{rel}' is an absolute path; paths in {CASES_FILE} are relative to "
                                f"the dataset folder '{root}'.")
    path = root / rel_path
    base = root.resolve()
    resolved = path.resolve()
    if resolved != base and base not in resolved.parents:
        raise MicroCTSynthError(f"{what} '{rel}' leads outside the dataset folder '{root}'; keep every file of a "
                                "dataset inside its folder.")
    return path


def _problems(data) -> list[str]:
    """What is wrong with the content of a ``cases.json`` (empty when nothing)."""
    if not isinstance(data, dict):
        return ["it must hold a JSON object"]
    cases = data.get("cases")
    if not isinstance(cases, dict):
        return ['it has no "cases" object']
    problems = _member_problems(
        cases, "case", "must be an object of file names, not {kind}", CASE_FILES,
        "names an unknown file role '{key}' (known: " + ", ".join(CASE_FILES) + ")",
        lambda rel: isinstance(rel, str) and bool(rel.strip()), "gives its {key} as {value!r}, not a file name",
        name_problem=lambda name: (f"the case name {name!r} is not a plain folder name"
                                   if not name or "/" in name or "\\" in name or name in (".", "..") else None))
    groups = data.get("groups", THESIS_GROUPS)
    if not isinstance(groups, dict):
        return problems + ['"groups" must be an object of groups']
    return problems + _member_problems(
        groups, "group", "must be an object with train, val and test lists", SPLITS,
        "has an unknown part '{key}' (train, val, test)",
        lambda names: isinstance(names, list) and all(isinstance(c, str) for c in names),
        "gives its {key} cases as {value!r}, not a list of case names")


def _member_problems(members: dict, noun: str, not_an_object: str, known, unknown_key: str, valid, invalid: str,
                     name_problem=lambda name: None) -> list[str]:
    """The problems of each case or group of ``cases.json``: its name (``name_problem``), not being
    an object, a key not in ``known``, a value ``valid`` refuses; each sentence begins with its
    ``noun`` and name, the rest from the templates (``{kind}``, ``{key}``, ``{value}``)."""
    problems = []
    for name, entry in members.items():
        said = name_problem(name)
        if said:
            problems.append(said)
        if not isinstance(entry, dict):
            problems.append(f"{noun} '{name}' " + not_an_object.format(kind=type(entry).__name__))
            continue
        for key, value in entry.items():
            if key not in known:
                problems.append(f"{noun} '{name}' " + unknown_key.format(key=key))
            elif not valid(value):
                problems.append(f"{noun} '{name}' " + invalid.format(key=key, value=value))
    return problems


def validate(data, path) -> None:
    """Raise one sentence for the first problem of a ``cases.json`` (and how many more there are)."""
    problems = _problems(data)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise MicroCTSynthError(f"'{path}' is not a valid dataset description: {problems[0]}{more}.")


def leave_k_out_groups(groups: dict | None = None, complete: bool = True) -> dict:
    """The groups of ``cases.json`` (default: the thesis' Table 1), checked for overlap; with
    ``complete`` each needs a training case (not while a group is being built case by case)."""
    groups = THESIS_GROUPS if groups is None else groups
    for name, g in groups.items():
        parts = [set(g.get(k, [])) for k in SPLITS]
        if parts[0] & parts[2] or parts[1] & parts[2] or parts[0] & parts[1]:
            raise MicroCTSynthError(f"Group {name} uses a specimen in more than one of train, val and test.")
        if complete and not parts[0]:
            raise MicroCTSynthError(f"Group {name} has no training case.")
    return groups


def refuse_existing_dataset(root, overwrite: bool = False) -> None:
    """Refuse to write a new dataset into a folder that holds one, unless ``overwrite``."""
    path = Path(root) / CASES_FILE
    if path.exists() and not overwrite:
        prepared = any((Path(root) / name).exists() for name in ("prepare.json", "runs"))
        raise MicroCTSynthError(
            f"'{root}' already holds a {'prepared ' if prepared else ''}dataset ({CASES_FILE}); choose another --out, "
            "or add --overwrite to replace its cases.json and images.")


class Dataset:
    """A dataset folder and its ``cases.json``."""

    def __init__(self, root, data: dict):
        self.root = Path(root)
        self.data = data

    @classmethod
    def load(cls, root, complete: bool = True) -> "Dataset":
        """The dataset in ``root``, its ``cases.json`` checked (schema, paths inside the folder,
        groups; see :func:`leave_k_out_groups` for ``complete``)."""
        root = Path(root)
        path = root / CASES_FILE
        if not path.is_file():
            raise MicroCTSynthError(
                f"'{root}' is not a dataset folder: it has no {CASES_FILE} (make one with 'microctsynth phantom --out {root}')."
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MicroCTSynthError(f"'{path}' is not valid JSON: {exc}.") from None
        validate(data, path)
        data.setdefault("groups", THESIS_GROUPS)
        leave_k_out_groups(data["groups"], complete)
        dataset = cls(root, data)
        for case, entry in data["cases"].items():
            for role in entry:
                dataset.path(case, role, must_exist=False)  # every path inside the folder, or a sentence now
        return dataset

    @classmethod
    def open(cls, root) -> "Dataset":
        """The dataset in ``root`` to add cases to, checked as :meth:`load` checks it except that a
        group may still lack its training case; a new one without groups if ``root`` holds none."""
        if (Path(root) / CASES_FILE).is_file():
            return cls.load(root, complete=False)
        return cls.create(root, groups={})

    @classmethod
    def create(cls, root, cases=(), groups=None, **extra) -> "Dataset":
        ds = cls(root, {"cases": {}, "groups": groups if groups is not None else THESIS_GROUPS, **extra})
        for name in cases:
            ds.add_case(name)
        return ds

    def save(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / CASES_FILE
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        return path

    # -- cases ----------------------------------------------------------------------------
    @property
    def cases(self) -> list[str]:
        return list(self.data["cases"])

    @property
    def groups(self) -> dict:
        return self.data["groups"]

    def add_case(self, name: str, **files) -> dict:
        """Register case ``name`` with the standard file names (or the ones given)."""
        entry = self.data["cases"].setdefault(name, {})
        for role, fname in CASE_FILES.items():
            entry.setdefault(role, f"{name}/{fname}")
        entry.update({k: os.fspath(v) for k, v in files.items()})
        return entry

    def path(self, case: str, role: str, must_exist: bool = True) -> Path:
        """Absolute path of ``role`` (a key of :data:`CASE_FILES`) for ``case``."""
        if case not in self.data["cases"]:
            raise MicroCTSynthError(f"Case '{case}' is not in {self.root / CASES_FILE}; it lists {', '.join(self.cases)}.")
        rel = self.data["cases"][case].get(role, f"{case}/{CASE_FILES[role]}")
        p = inside(self.root, rel, f"The {role.replace('_', ' ')} of case '{case}'")
        if must_exist and not p.exists():
            hint = " (run 'microctsynth prepare --data DIR' first)" if role in ("transform", "ct_registered", "tissue", "naive_tissue") else ""
            raise MicroCTSynthError(f"Case '{case}' lacks its {role.replace('_', ' ')} file '{p}'{hint}.")
        return p

    def group(self, name: str) -> dict:
        if name not in self.groups:
            raise MicroCTSynthError(f"Group '{name}' is not defined in {self.root / CASES_FILE}; it has {', '.join(self.groups)}.")
        g = self.groups[name]
        missing = [c for k in SPLITS for c in g.get(k, []) if c not in self.data["cases"]]
        if missing:
            raise MicroCTSynthError(f"Group '{name}' names case(s) {', '.join(missing)} that the dataset does not hold.")
        return {k: list(g.get(k, [])) for k in SPLITS}

    def assign(self, case: str, group: str, split: str) -> None:
        """Put ``case`` into the ``split`` (train, val or test) of ``group``, made if new, and out of
        the group's other parts."""
        if split not in SPLITS:
            raise MicroCTSynthError(f"A case goes to train, val or test, not '{split}'.")
        parts = self.groups.setdefault(group, {})
        for key in SPLITS:
            names = parts.setdefault(key, [])
            if case in names:
                names.remove(case)
        parts[split].append(case)
