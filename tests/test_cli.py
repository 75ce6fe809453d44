"""The command line explains itself and fails in one line, never with a traceback."""

import subprocess
import sys

import pytest

COMMANDS = ["synth", "train", "label"]


def run(*args):
    return subprocess.run([sys.executable, "-m", "rnnimg.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_runs(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


def test_every_option_of_every_command_has_help():
    from rnnimg.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(COMMANDS) <= set(subparsers)
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help and len(action.help) > 10, f"rnnimg {name} {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "/nonexistent/manifest.parquet", "--out", "/tmp/x"], "no manifest at /nonexistent/manifest.parquet"),
        (["train", "m.parquet", "--out", "/tmp/x", "--epochs", "0"], "expected an integer >= 1, got 0"),
        (["train", "m.parquet"], "--out"),
        (["label", "/nonexistent/videos", "--model", "/nonexistent/model", "--out", "/tmp/x"], "no exported model at /nonexistent/model"),
        (["label", "ftp://host/videos", "--model", "ftp://m", "--out", "/tmp/x"], "unsupported location"),
        (["synth", "/tmp/x", "--videos", "-3"], "expected an integer >= 1, got -3"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_fail_in_one_line(args, needle):
    result = run(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]


def test_label_refuses_an_empty_folder(tmp_path, untrained_model):
    (tmp_path / "empty").mkdir()
    result = run("label", str(tmp_path / "empty"), "--model", untrained_model, "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "no videos found" in result.stderr and "Traceback" not in result.stderr


def test_a_quiet_label_run_shows_only_its_progress_lines_nothing_of_its_coordinators(tmp_path, untrained_model):
    """The pipeline runs in coordinator actors whose output Ray forwards to the driver's console: a quiet
    run (the default) must show none of Ray's notices from them, only rnnimg's progress and the summary."""
    import json

    made = run("synth", str(tmp_path / "archive"), "--videos", "4", "--unlabelled", "0", "--seconds", "1", "--fps", "4")
    assert made.returncode == 0, made.stderr
    result = run("label", str(tmp_path / "archive" / "videos"), "--model", untrained_model, "--out", str(tmp_path / "out"),
                 "--videos-per-shard", "2", "--actors", "2", "--coordinators", "2")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] == 4
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("label shard ") for line in lines), result.stderr


def test_progress_goes_to_stderr_as_plain_lines_and_stdout_stays_json(tmp_path):
    """Off a terminal (a pipe here): synth writes one plain progress line on stderr, the JSON summary alone on stdout."""
    import json

    result = run("synth", str(tmp_path / "archive"), "--videos", "8", "--unlabelled", "0", "--seconds", "1", "--fps", "4")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["videos"] == 8
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("synth 8/8 videos in "), result.stderr
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr  # no bar drawn into a pipe


def test_verbose_is_accepted_before_and_after_the_command():
    from rnnimg.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["-v", "synth", "x"]).verbose and parser.parse_args(["synth", "x", "-v"]).verbose
    assert not parser.parse_args(["synth", "x"]).verbose


def test_a_ray_the_command_started_is_stopped_before_the_summary_so_stdout_ends_with_it(monkeypatch, capsys):
    """Ray's log thread may print a raylet line on stdout at any time until Ray stops (the multi-node test met
    one after the summary): the CLI stops a Ray it started first, and leaves one it found running alone."""
    import json
    import types

    import rnnimg.cli as cli

    state = {"running": False, "events": []}
    fake = types.SimpleNamespace(is_initialized=lambda: state["running"],
                                 shutdown=lambda: (state.update(running=False), print("(raylet) a late line"), state["events"].append("shutdown")))
    monkeypatch.setitem(sys.modules, "ray", fake)

    def run(args):
        state["running"] = True  # as ensure_ray does
        return {"videos": 1}

    monkeypatch.setattr(cli, "_run", run)
    assert cli.main(["synth", "/tmp/unused"]) == 0
    out = capsys.readouterr().out
    assert state["events"] == ["shutdown"] and out.index("(raylet) a late line") < out.index("{")
    assert json.loads(out[out.index("{"):]) == {"videos": 1}

    state.update(running=True, events=[])  # a Ray the caller had started (a notebook, a test's fixture) is theirs
    assert cli.main(["synth", "/tmp/unused"]) == 0
    assert state["events"] == [] and state["running"] and json.loads(capsys.readouterr().out) == {"videos": 1}
