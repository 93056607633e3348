"""scripts/gpu_check.py: its CPU smoke in a venv with only what the GPU machines have, its dry run, and what the
plan reads from it; the offline replicas it builds; WAV decoding without soundfile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
# What the GPU machines lack (issue 33): the check and emotune's lower layers must run without them.
ABSENT = ("ray", "mlflow", "optuna", "hydra", "omegaconf", "soundfile", "_soundfile", "psycopg2", "matplotlib")


def _gpu_machine_venv(folder: Path) -> Path:
    """A real venv that sees this interpreter's packages except those the GPU machines lack (and emotune itself,
    which the script takes from the checkout, as it does there). Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    target = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip())
    source = Path(sysconfig.get_paths()["purelib"])
    for entry in source.iterdir():
        name = entry.name.lower()
        if (entry.suffix == ".pth" or name.startswith(("emotune", "__editable__", "_emotune"))
                or any(name == a or name.startswith((f"{a}-", f"{a}.", f"{a}_")) for a in ABSENT)):
            continue
        (target / entry.name).symlink_to(entry)
    return python


@pytest.mark.slow
def test_the_cpu_smoke_runs_the_whole_check_where_ray_mlflow_and_optuna_are_absent(tmp_path):
    python = _gpu_machine_venv(tmp_path / "venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    for module in ("ray", "mlflow", "optuna", "hydra", "soundfile"):
        absent = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True, text=True, env=env)
        assert absent.returncode != 0 and "ModuleNotFoundError" in absent.stderr, module
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([str(python), str(SCRIPT), "--cpu-smoke", "--out", str(out), "--work", str(work)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    data = json.loads((out / "gpu.json").read_text())
    assert data["sizes"]["mode"] == "cpu-smoke" and data["environment"]["gpu"] is None
    assert set(data["fill"]) == {"xlsr", "roberta-es", "wavlm-base-plus", "beto"}
    for name, fill in data["fill"].items():
        assert fill["items"] == data["sizes"]["clips"] and fill["steps"] > 0 and fill["tflops"] > 0, name
    assert data["fill"]["xlsr"]["storage"] == "int8" and data["fill"]["xlsr"]["layers_stored"] == 1  # every_3 of 3
    assert data["fill"]["wavlm-base-plus"]["one_at_a_time"]  # a group-norm front end, as the real Base+
    assert len(list((work / "cache").rglob("*.safetensors"))) == 4 * data["sizes"]["clips"]  # one array per item
    heads = data["heads"]
    assert [heads[k]["hidden_layers"] for k in ("narrowest", "widest")] == [0, 3]  # space=encoders' depth range
    for shape in heads.values():
        assert shape["epoch_seconds"] > 0 and shape["planned_epoch_seconds"] > 0
        assert shape["measured_over_planned"] == pytest.approx(shape["epoch_seconds"] / shape["planned_epoch_seconds"])
    assert heads["widest"]["head_parameters"] > heads["narrowest"]["head_parameters"]
    sharing = data["sharing"]
    assert sharing["workers"] == 4 and len(sharing["step_seconds_together"]) == 4 and sharing["slowdown"] > 0
    text = (out / "gpu.md").read_text()
    assert "CPU smoke" in text and "say nothing about a GPU" in text and "xlsr + roberta-es" in text


def test_the_dry_run_prints_every_step_and_its_planned_time_without_building_anything(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--gpu", "h200"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("xlsr", "roberta-es", "wavlm-base-plus", "beto", "H200", "sharing", "head widest"):
        assert name in done.stdout
    minutes = float(done.stdout.split("planned: ")[1].split(" min")[0])
    assert 0 < minutes < 8  # the limit for one H100, start-up included
    assert not any(tmp_path.iterdir())


def test_a_run_without_a_gpu_is_refused_with_the_ways_out(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert done.returncode == 2 and "--cpu-smoke" in done.stderr and "--dry-run" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "gpu.json").exists()


def test_the_replicas_have_the_parameters_of_the_checkpoints_they_stand_for():
    import torch
    import transformers

    from emotune.features.catalog import ARCHITECTURES, HUB_SPEECH, HUB_TEXT
    from emotune.features.replica import FAMILIES, architecture

    for name in ARCHITECTURES:
        family, config = architecture(name)
        config_name, model_name, _ = FAMILIES[family]
        with torch.device("meta"):
            model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        count = sum(p.numel() for p in model.parameters()) / 1e6
        assert count == pytest.approx({**HUB_SPEECH, **HUB_TEXT}[name].params_m, rel=1e-3), name


def test_a_built_replica_is_found_again_and_rebuilt_when_the_request_changes(tmp_path):
    from emotune.features.replica import build_replica, replica_parameters

    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
             "vocab_size": 3000}
    texts = ["hola qué tal", "¡qué alegría verte!", "no me lo puedo creer"]
    folder = build_replica("beto", tmp_path / "beto", texts, overrides=small)
    first = (folder / "model.safetensors").stat().st_mtime_ns
    assert build_replica("beto", tmp_path / "beto", texts, overrides=small) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == first
    build_replica("beto", tmp_path / "beto", texts, overrides={**small, "num_hidden_layers": 2})
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == 2
    assert replica_parameters(folder) > 0 and not list(tmp_path.glob(".*building*"))


def test_the_plan_takes_the_device_speed_a_gpu_check_measured(tmp_path):
    from emotune.errors import EmotuneError
    from emotune.search.plan import device_tflops

    measured = tmp_path / "gpu.json"
    measured.write_text(json.dumps({"plan_device_tflops": 37.5,
                                    "environment": {"gpu": "NVIDIA H100 80GB HBM3", "date": "2027-01-02"}}))
    figure, source = device_tflops(str(measured))
    assert figure == 37.5 and "NVIDIA H100" in source and "2027-01-02" in source
    assert device_tflops("100") == (100.0, "as given (--device-tflops)")
    smoke = tmp_path / "smoke.json"
    smoke.write_text(json.dumps({"plan_device_tflops": 0.01, "environment": {"gpu": None}}))
    with pytest.raises(EmotuneError, match="CPU run"):
        device_tflops(str(smoke))
    with pytest.raises(EmotuneError, match="neither a number nor an existing file"):
        device_tflops(str(tmp_path / "missing.json"))


def test_pcm_wav_files_decode_the_same_with_and_without_soundfile(tmp_path):
    import soundfile as sf

    from emotune.data.audio import _decode_pcm16_wav, load_audio, write_pcm16_wav

    wave = (0.4 * np.sin(np.arange(8000) / 7.0)).astype(np.float32)
    path = tmp_path / "clip.wav"
    write_pcm16_wav(path, wave)
    ours, rate = _decode_pcm16_wav(path)
    theirs, their_rate = sf.read(str(path), dtype="float32", always_2d=True)
    assert rate == their_rate == 16000 and np.array_equal(ours, theirs)
    assert np.abs(load_audio(path) - wave).max() < 1e-4
