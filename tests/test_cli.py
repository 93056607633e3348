"""The command line: real processes, readable errors (exit status 2, no traceback), summaries printed."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_bad_row_is_one_clear_message_not_a_traceback(tiny_corpus, tmp_path):
    (tiny_corpus / "audio" / "clip002.wav").unlink()
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path / "runs"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.csv, row 3, id 'clip002.wav'" in result.stderr and "not found" in result.stderr


def test_skip_policy_reports_what_it_skipped(tiny_corpus, tmp_path):
    (tiny_corpus / "audio" / "clip002.wav").unlink()
    result = emotune("check-corpus", *folder_args(tiny_corpus, tmp_path / "runs"), "data.on_error=skip")
    assert result.returncode == 0, result.stderr
    assert "Skipped 1 rows (1 missing audio)" in result.stdout
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
