"""The command line: one entry point, --help on every subcommand, errors as sentences."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from MicroCTSynthLib.cli import COMMANDS, build_parser, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: microctsynth " + command)
    assert COMMANDS[command].help.split(":")[0] in " ".join(out.split())


def test_console_script_and_module_are_the_same_entry_point():
    by_module = subprocess.run([sys.executable, "-m", "MicroCTSynthLib", "--help"], capture_output=True, text=True, check=True)
    script = shutil.which("microctsynth") or str(__import__("pathlib").Path(sys.executable).with_name("microctsynth"))
    by_script = subprocess.run([script, "--help"], capture_output=True, text=True, check=True)
    assert by_module.stdout == by_script.stdout
    assert all(name in by_module.stdout for name in COMMANDS)


def test_every_command_runs_its_engine_function():
    """Each command names the engine's ``command_<name>`` as ``"module:function"`` (imported only
    when the command runs) and that function takes the parsed arguments."""
    import inspect

    for name, command in COMMANDS.items():
        module, _, function = command.entry.partition(":")
        assert function == "command_" + name.replace("-", "_"), name
        engine_function = command.function()
        assert engine_function.__module__ == f"MicroCTSynthLib.{module}", name
        assert list(inspect.signature(engine_function).parameters) == ["args"], name


def test_the_parser_imports_no_engine_step():
    """``--help`` answers at once: building the parser imports neither torch nor numpy."""
    code = ("import sys; from MicroCTSynthLib.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'numpy', 'SimpleITK') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_error_is_a_json_event_with_progress_json(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "MicroCTSynthLib", "prepare", "--data", str(tmp_path), "--progress", "json"],
        capture_output=True, text=True,
    )
    assert run.returncode == 2
    events = [json.loads(line) for line in run.stdout.splitlines()]
    assert events[-1]["event"] == "error"
    assert "cases.json" in events[-1]["message"]
    assert "Traceback" not in run.stderr


def test_unknown_preset_is_a_sentence():
    from MicroCTSynthLib.presets import load_preset

    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        load_preset("huge")
    assert load_preset("tiny")["lr"] == load_preset("paper")["lr"]
    assert build_parser().parse_args(["phantom", "--out", "x"]).preset == "quick"


def test_a_preset_file_can_start_from_another_preset(tmp_path):
    from MicroCTSynthLib.presets import load_preset

    (tmp_path / "mine.json").write_text(json.dumps({"base": "quick", "patch_size": 32}))
    mine, quick = load_preset(tmp_path / "mine.json"), load_preset("quick")
    assert mine == {**quick, "patch_size": 32}
    (tmp_path / "yours.json").write_text(json.dumps({"base": "mine.json", "lr": 0.01}))
    assert load_preset(tmp_path / "yours.json") == {**mine, "lr": 0.01}
    (tmp_path / "loop.json").write_text(json.dumps({"base": "loop.json"}))
    with pytest.raises(ValueError, match="is its own base"):
        load_preset(tmp_path / "loop.json")
    (tmp_path / "typo.json").write_text(json.dumps({"base": "quick", "patchsize": 32}))
    with pytest.raises(ValueError, match="unknown key.*patchsize"):
        load_preset(tmp_path / "typo.json")


def test_negative_roi_centre_is_a_value():
    base = ["synthesize", "--model", "m.pt", "--ct", "ct.nrrd", "--out-microct", "s.nrrd", "--out-tissue", "t.nrrd"]
    args = build_parser().parse_args(base + ["--roi-center=-12.3,4,-5", "--roi-size", "6"])
    assert (args.roi_center, args.roi_size) == ("-12.3,4,-5", "6")


def test_the_older_roi_form_still_works_with_a_note(tmp_path, capsys):
    """``--roi CENTER SIZE`` (before --roi-center and --roi-size) is read as the new form for one more
    release, a negative centre included, with a sentence saying what to write instead."""
    from MicroCTSynthLib.cli import _rewrite_deprecated_roi

    base = ["synthesize", "--model", "m.pt", "--ct", "ct.nrrd", "--out-tissue", "t.nrrd"]
    assert _rewrite_deprecated_roi(base + ["--roi", "-12.3,4,-5", "6", "--samples", "2"]) == (
        base + ["--roi-center=-12.3,4,-5", "--roi-size=6", "--samples", "2"], True)
    assert _rewrite_deprecated_roi(base + ["--roi-center=1,2,3", "--roi-size", "6"])[1] is False
    missing = ["synthesize", "--model", str(tmp_path / "missing.pt"), *base[3:]]
    assert main(missing + ["--roi", "-1,2,3", "6", "--progress", "none"]) == 2
    err = capsys.readouterr().err
    assert "--roi CENTER SIZE is deprecated" in err and "--roi-center=X,Y,Z" in err and "does not exist" in err


def test_json_progress_comes_at_a_sane_rate(monkeypatch, capsys):
    """JSON progress lines: the first and the last step, forced ones, and otherwise at most one
    per ``min_interval`` seconds, however fast the steps come."""
    import json

    from MicroCTSynthLib import progress as progress_module

    clock = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    bar = progress_module.Progress(total=1000, task="train", mode="json")
    for step in range(1, 1001):
        clock[0] += 0.01  # 100 steps a second
        if step == 500:
            bar.update(1, force=True, epoch=1)
        else:
            bar.update(1)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    steps = [line["step"] for line in lines]
    assert steps[0] == 1 and steps[-1] == 1000 and 500 in steps
    assert 40 <= len(lines) <= 45  # 10 s of work at 4 lines a second, plus the forced and last ones
    assert all(b - a <= 26 for a, b in zip(steps, steps[1:]))
    assert not progress_module.Progress(total=3, mode="none").due()
