"""The command line: real processes, readable errors (exit status 2, no traceback), summaries printed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import write_csv


def emotune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emotune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def folder_args(root, runs) -> list[str]:
    return ["data=folder", f"data.root={root}", f"paths.runs_dir={runs}"]


def test_help_lists_the_commands():
    result = emotune("--help")
    assert result.returncode == 0
    assert "demo-corpus" in result.stdout and "check-corpus" in result.stdout


def test_demo_corpus_command_prints_its_summary(tmp_path):
    result = emotune("demo-corpus", str(tmp_path / "demo"), "--clips", "60", "--seed", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "demo corpus: 60 clips, seed 1" in out
    assert "fear" in out and "duration (s)" in out and "voices" in out
    assert (tmp_path / "demo" / "train.csv").is_file()


def test_check_corpus_summarises_and_saves_statistics(tiny_corpus, tmp_path):
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "dev" in result.stdout and "No rows skipped." in result.stdout
    stats = json.loads((tmp_path / "runs" / "corpus-check" / "corpus" / "corpus_stats.json").read_text())
    assert sum(stats["counts"]["train"].values()) + sum(stats["counts"]["dev"].values()) == 24
    assert stats["norm"]["n_files"] == sum(stats["counts"]["train"].values())


def remove_clip(root) -> None:
    (root / "audio" / "clip002.wav").unlink()


def write_latin1_csv(root) -> None:
    rows = [["clip001.wav", "joy", "año"]]
    write_csv(root / "train.csv", ["id", "label", "transcription"], rows, encoding="latin-1")


@pytest.mark.parametrize("damage", [remove_clip, write_latin1_csv], ids=["missing-audio", "csv-not-utf8"])
def test_bad_corpus_exits_with_status_2_not_a_traceback(tiny_corpus, tmp_path, damage):
    """The exit status only: the messages are checked in test_corpus.py."""
    damage(tiny_corpus)
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path / "runs"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr


def test_skip_policy_exits_0_and_lists_the_skipped_rows(tiny_corpus, tmp_path):
    remove_clip(tiny_corpus)
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path / "runs"), "data.on_error=skip")
    assert result.returncode == 0, result.stderr
    skipped = tmp_path / "runs" / "corpus-check" / "corpus" / "skipped_rows.csv"
    assert "clip002.wav" in skipped.read_text()


def test_config_errors_list_what_exists(tiny_corpus, tmp_path):
    wrong_key = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path), "data.dev_fractoin=0.2")
    assert wrong_key.returncode == 2 and "Traceback" not in wrong_key.stderr
    assert "dev_fraction" in wrong_key.stderr and "under 'data'" in wrong_key.stderr
    wrong_group = emotune("check-corpus", "data=meacorpus")
    assert wrong_group.returncode == 2 and "demo" in wrong_group.stderr and "folder" in wrong_group.stderr
    missing = emotune("check-corpus", "data=folder", f"paths.runs_dir={tmp_path}")
    assert missing.returncode == 2 and "data.root" in missing.stderr


def test_non_utf8_csv_through_the_cli(tiny_corpus, tmp_path):
    write_csv(tiny_corpus / "train.csv", ["id", "label", "transcription"], [["clip001.wav", "joy", "año"]],
              encoding="latin-1")
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path))
    assert result.returncode == 2 and "not valid UTF-8" in result.stderr and "row 2" in result.stderr


def _session_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])


def _processes_in_session(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[3]) == sid and stat[0] != "Z":
                found.append(int(entry.name))
    return found


# SIGINT (Ctrl-C) goes to the same handler as these two (one line installs it for all three); these are the
# two whose default action would end the UI at once and leave its server running, so they can tell a missing
# handler apart, and each start of the UI costs about 20 s of the suite.
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_ui_stops_every_process_it_started_on_each_signal(smoke_search, tmp_path, stop):
    import socket
    import urllib.request

    runs, _ = smoke_search
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ui = subprocess.Popen([sys.executable, "-m", "emotune", "ui", f"paths.runs_dir={runs}", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(ui.stdout), daemon=True)
    reader.start()
    # the UI is up for its user once it has printed the address of the search's runs, which it does once the
    # server answers: the signal comes after that line, not merely after the server's first answer
    deadline = time.time() + 120
    while time.time() < deadline and ui.poll() is None and not any("viewStateShareKey=" in line for line in lines):
        time.sleep(0.2)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert response.status == 200
    servers = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent_of(int(p.name)) == ui.pid]
    sessions = {_session_of(pid) for pid in servers}
    assert servers and sessions and all(_processes_in_session(s) for s in sessions)
    ui.send_signal(stop)
    ui.wait(timeout=60)
    reader.join(timeout=10)
    output = "".join(lines)
    assert ui.returncode == 0, output[-2000:]
    assert "viewStateShareKey=" in output  # it printed the address of the search's runs
    assert all(not _processes_in_session(s) for s in sessions)  # not one of the server's processes is left
    with socket.socket() as again:
        # the port is free: no process listens there (SO_REUSEADDR lets the bind pass over the closed connections
        # that linger in TIME_WAIT, not over a listener, so the check still fails if a server is left)
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def _parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1
