"""The run folder is the engine's: a run refuses a folder of the user's own files, holds a lock so
that a second run into it is refused (naming the first), and never deletes what it did not write.

The command-line cases run ``run_cycle.main`` in this process (the code path a shell reaches, without
~5 s of imports per case): each must print one ``error:`` line and return 2.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

import run_cycle
from cxr_noisy_student.datasets.errors import ConfigError
from cxr_noisy_student.loops.stages import FolderBusy, hold_lock
from cxr_noisy_student.teacher_student.cycle.data_stage import prepare
from cxr_noisy_student.teacher_student.cycle.runner import run_cycles
from cxr_noisy_student.teacher_student.layout import RUN_LOCK, RUN_MARKER
from test_bad_input import engine_config, make_root


@pytest.fixture
def data_root(tmp_path, cxr_dir) -> Path:
    return make_root(tmp_path, cxr_dir)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_folder_of_the_users_files_is_refused_and_left_as_it_was(data_root, tmp_path, capsys):
    mine = tmp_path / "my_project"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "notes.txt").write_text("mine")
    (mine / "final").mkdir()
    (mine / "final" / "thesis.tex").write_text("mine too")
    before = sorted(p.relative_to(mine) for p in mine.rglob("*"))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  format: generic\n  root: {data_root}\n  images_csv: images.csv\n"
                      "  study_label_column: label\npreprocess:\n  size: 32\nfolds:\n  k: 2\n")
    assert run_cycle.main(["--config", str(config), "--out", str(mine), "--cycles", "0"]) == 2
    line = one_error_line(capsys)
    assert f"run.out {mine}: the folder is not empty and is not a run of this engine (no {RUN_MARKER})" in line
    assert sorted(p.relative_to(mine) for p in mine.rglob("*")) == before
    assert (mine / "data" / "notes.txt").read_text() == "mine"
    (tmp_path / "a_file").write_text("x")
    assert run_cycle.main(["--config", str(config), "--out", str(tmp_path / "a_file")]) == 2
    assert f"run.out {tmp_path / 'a_file'}: is a file, not a folder" in one_error_line(capsys)


def test_a_run_folder_is_claimed_once_and_keeps_what_it_did_not_write(data_root, tmp_path):
    out = tmp_path / "run"
    prepare(engine_config(data_root, out))
    assert (out / RUN_MARKER).is_file() and (out / "data" / "table.json").is_file()
    (out / "my_notes.txt").write_text("kept")
    (out / ".data.abc123.tmp").mkdir()  # a leftover of this folder's own killed run: its name is the engine's
    again = prepare(engine_config(data_root, out, "quarantine"))
    assert again.records[0]["skipped"] and (out / "my_notes.txt").read_text() == "kept"
    old = tmp_path / "old_run"  # a run made before the marker existed is still a run
    prepare(engine_config(data_root, old))
    (old / RUN_MARKER).unlink()
    prepare(engine_config(data_root, old))
    assert (old / RUN_MARKER).is_file()


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(data_root, tmp_path, capsys):
    out = tmp_path / "run"
    prepare(engine_config(data_root, out))
    leftover = out / ".gen0.x1y2z3.tmp"
    leftover.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"f = open({str(out / RUN_LOCK)!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on testhost'); f.flush()\n"
        "print('locked', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderBusy) as info:
            run_cycles(engine_config(data_root, out))
        assert str(info.value) == (f"run.out {out}: another run (pid {holder.pid} on testhost) is writing into this "
                                   "folder; wait for it to end or choose another folder")
        assert leftover.is_dir()  # the refused run touched nothing, the other run's work in progress included
    finally:
        holder.kill()
        holder.wait()
    deadline = time.time() + 10
    while time.time() < deadline:  # the kernel drops a dead process's lock
        try:
            with hold_lock(out / RUN_LOCK, what="run.out"):
                break
        except FolderBusy:
            time.sleep(0.1)
    else:
        pytest.fail("the lock of a killed process was not released")


def test_the_lock_is_held_for_the_whole_run_and_refuses_in_process_too(data_root, tmp_path):
    out = tmp_path / "run"
    prepare(engine_config(data_root, out))
    with hold_lock(out / RUN_LOCK, what=f"run.out {out}"):
        with pytest.raises(FolderBusy, match=r"another run \(pid \d+ on .*\) is writing into this folder"):
            run_cycles(engine_config(data_root, out))
    assert isinstance(FolderBusy("x"), ConfigError)  # the command line prints it as one line, exit code 2


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "run.device 'tpu': not a device; use auto, cpu, cuda or cuda:N"),
    (["--cycles", "-1"], "run.cycles: -1 is out of range: must be >= 0"),
    (["--set", "folds.k=1"], "folds.k: 1 is out of range: must be >= 2"),
    (["--set", "pseudo.confidence=2"], "pseudo.confidence: 2.0 is out of range: must be <= 1"),
    (["--set", "detector.kind=effdet", "--set", "detector.img_size=96"], "detector.img_size 96: effdet needs a multiple of 128"),
])
def test_command_line_config_errors_are_one_line_and_exit_code_2(args, message, capsys, tmp_path):
    assert run_cycle.main([*args, "--out", str(tmp_path / "run")]) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_command_line_config_files_that_cannot_be_read(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  cycles: [1,\n")
    for config, message in ((tmp_path, "is a folder, not a YAML config file"), (bad, "bad.yaml: not valid YAML"),
                            (tmp_path / "absent.yaml", "absent.yaml: config file not found")):
        assert run_cycle.main(["--config", str(config)]) == 2
        assert message in one_error_line(capsys)
