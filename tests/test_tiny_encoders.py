"""Tiny offline encoders: they build, load back through the real from_pretrained path, and are deterministic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoFeatureExtractor, AutoModel, AutoTokenizer

from emotune.errors import EmotuneError
from emotune.features.tiny import TINY_MARKER, TINY_PRESETS, build_tiny_encoder, tiny_text_hash


@pytest.fixture
def hub_offline(monkeypatch):
    """For tests that build and load models: they work from local folders only, so any attempt to reach the
    Hugging Face hub must fail at once instead of waiting on the network. Scoped to those tests: the rest of
    the session keeps the hub settings it was started with.

    huggingface_hub reads HF_HUB_OFFLINE once, at import: the variable reaches the subprocesses started here,
    and the flag it would have set is set for this process too.
    """
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


SPEECH = [name for name, spec in TINY_PRESETS.items() if spec["modality"] == "speech"]
TEXT = [name for name, spec in TINY_PRESETS.items() if spec["modality"] == "text"]
LAYER_NORM_SPEECH = ["tiny-wav2vec2", "tiny-wavlm", "tiny-hubert"]

TEXTS = [
    "¡Qué alegría, mañana vamos a la playa!",
    "Estoy muy triste porque se fue mi perro.",
    "No me gusta nada esto, qué asco da.",
    "Tengo miedo de caminar sola por la noche.",
    "¿Por qué siempre llegas tarde? Me enfada muchísimo.",
    "El informe está sobre la mesa, como cada lunes.",
]


def test_presets_cover_the_families() -> None:
    assert set(SPEECH) == {"tiny-wav2vec2", "tiny-wav2vec2-base", "tiny-wavlm", "tiny-hubert"}
    assert set(TEXT) == {"tiny-bert", "tiny-roberta"}


@pytest.mark.parametrize("preset", SPEECH)
@pytest.mark.usefixtures("hub_offline")
def test_speech_preset_loads_and_keeps_50_frames_per_second(preset: str, tmp_path: Path) -> None:
    folder = build_tiny_encoder(preset, tmp_path / preset)
    model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    # Every saved tensor must be used and none re-initialised, or the loaded model is not the built one.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == TINY_PRESETS[preset]["family"]
    extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
    assert extractor.sampling_rate == 16_000 and extractor.do_normalize is False

    wave = torch.Generator().manual_seed(1)
    audio = (0.1 * torch.randn(16_000, generator=wave)).numpy()
    inputs = extractor(audio, sampling_rate=16_000, return_tensors="pt")
    assert "attention_mask" in inputs
    kwargs = {"attention_mask": inputs["attention_mask"]} if model.config.feat_extract_norm == "layer" else {}
    model.eval()
    with torch.no_grad():
        out = model(inputs["input_values"], output_hidden_states=True, **kwargs)
    n_frames = int(model._get_feat_extract_output_lengths(16_000))
    assert 45 <= n_frames <= 50
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 == 3
    for h in out.hidden_states:
        assert h.shape == (1, n_frames, 32)
        assert torch.isfinite(h).all()


@pytest.mark.parametrize("preset", LAYER_NORM_SPEECH)
@pytest.mark.usefixtures("hub_offline")
def test_layer_norm_presets_are_padding_invariant(preset: str, tmp_path: Path) -> None:
    folder = build_tiny_encoder(preset, tmp_path / preset)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
    gen = torch.Generator().manual_seed(2)
    short = (0.1 * torch.randn(8_000, generator=gen)).numpy()
    long = (0.1 * torch.randn(14_000, generator=gen)).numpy()

    with torch.no_grad():
        batch = extractor([short, long], sampling_rate=16_000, padding=True, return_tensors="pt")
        assert batch["attention_mask"][0].sum() == 8_000
        batched = model(batch["input_values"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        alone_in = extractor(short, sampling_rate=16_000, return_tensors="pt")
        alone = model(alone_in["input_values"], attention_mask=alone_in["attention_mask"], output_hidden_states=True)

    valid = int(model._get_feat_extract_output_lengths(8_000))
    assert alone.hidden_states[-1].shape[1] == valid
    assert batched.hidden_states[-1].shape[1] > valid  # the padding really is there
    for h_batch, h_alone in zip(batched.hidden_states, alone.hidden_states):
        torch.testing.assert_close(h_batch[0, :valid], h_alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", TEXT)
@pytest.mark.usefixtures("hub_offline")
def test_text_preset_tokenizes_spanish_and_encodes(preset: str, tmp_path: Path) -> None:
    folder = build_tiny_encoder(preset, tmp_path / preset, texts=TEXTS)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model, info = AutoModel.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.model_type == TINY_PRESETS[preset]["family"]
    assert tokenizer.model_max_length == 256
    assert model.config.pad_token_id == tokenizer.pad_token_id == (0 if preset == "tiny-bert" else 1)

    enc = tokenizer(["¡Qué alegría, mañana vamos!", "Hola."], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert int(mask[0].sum()) > 2 + 2  # more than the two special tokens plus a couple of pieces
    assert int(mask[1].sum()) < ids.shape[1]  # the shorter sentence is padded ...
    assert (ids[1][mask[1] == 0] == tokenizer.pad_token_id).all()  # ... with the pad id
    assert 0 <= int(ids.min()) and int(ids.max()) < model.config.vocab_size
    assert ids[0, 0] == tokenizer.cls_token_id and ids[0, int(mask[0].sum()) - 1] == tokenizer.sep_token_id
    # Accents survive: a word seen in training comes back whole, not as unknown pieces.
    assert tokenizer.unk_token_id not in ids[0].tolist()
    assert "alegría" in tokenizer.decode(ids[0], skip_special_tokens=True).lower()

    long = tokenizer(" ".join(TEXTS * 20), truncation=True, return_tensors="pt")
    assert long["input_ids"].shape[1] == 256
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
        model(**long)  # the longest allowed input fits the position table
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 == 3
    assert all(h.shape == (2, ids.shape[1], 256) for h in out.hidden_states)


@pytest.mark.parametrize("preset", ["tiny-wavlm", "tiny-roberta"])
@pytest.mark.usefixtures("hub_offline")
def test_builds_are_byte_identical(preset: str, tmp_path: Path) -> None:
    # Shuffled and repeated texts must not change anything: the tokenizer trains on the sorted unique set.
    a = build_tiny_encoder(preset, tmp_path / "a", texts=TEXTS, seed=3)
    b = build_tiny_encoder(preset, tmp_path / "b", texts=list(reversed(TEXTS)) + TEXTS[:2], seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    if TINY_PRESETS[preset]["modality"] == "text":
        assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # ... while another seed gives other weights.
    c = build_tiny_encoder(preset, tmp_path / "c", texts=TEXTS, seed=4)
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


@pytest.mark.usefixtures("hub_offline")
def test_builds_are_identical_across_processes(tmp_path: Path) -> None:
    # The tokenizers library hashes with a per-process random seed; a tokenizer that is stable within one
    # process can still differ in the next one (tokenizers' own WordPieceTrainer does), which would
    # silently invalidate cached features keyed on the folder.
    here = build_tiny_encoder("tiny-bert", tmp_path / "here", texts=TEXTS)
    script = (
        "import sys; from emotune.features.tiny import build_tiny_encoder; "
        "build_tiny_encoder('tiny-bert', sys.argv[1], texts=sys.argv[2:])"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "there"), *TEXTS],
        check=True, cwd=Path(__file__).resolve().parents[1], timeout=120,
    )
    for name in ("tokenizer.json", "model.safetensors", "config.json"):
        assert (here / name).read_bytes() == (tmp_path / "there" / name).read_bytes(), name


@pytest.mark.usefixtures("hub_offline")
def test_building_does_not_disturb_the_global_rng(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_encoder("tiny-hubert", tmp_path / "h")
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.usefixtures("hub_offline")
def test_second_call_reuses_the_build(tmp_path: Path) -> None:
    folder = build_tiny_encoder("tiny-bert", tmp_path / "bert", texts=TEXTS)
    marker = folder / TINY_MARKER
    record = json.loads(marker.read_text())
    assert record["params"]["preset"] == "tiny-bert"
    assert record["params"]["texts_sha256"] == tiny_text_hash(TEXTS)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    inode = folder.stat().st_ino

    again = build_tiny_encoder("tiny-bert", tmp_path / "bert", texts=list(reversed(TEXTS)))
    assert again == folder and folder.stat().st_ino == inode
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # No stray temporary folders next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]

    # Other texts mean another tokenizer: the folder is rebuilt in place, not reused.
    rebuilt = build_tiny_encoder("tiny-bert", tmp_path / "bert", texts=TEXTS + ["Una frase nueva y distinta."])
    assert json.loads((rebuilt / TINY_MARKER).read_text())["params"]["texts_sha256"] != record["params"]["texts_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert"]


@pytest.mark.usefixtures("hub_offline")
def test_size_override(tmp_path: Path) -> None:
    folder = build_tiny_encoder("tiny-wav2vec2", tmp_path / "big", hidden_size=128, num_layers=3)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (128, 3)
    assert model.config.intermediate_size == 256 and 128 % model.config.num_attention_heads == 0
    with torch.no_grad():
        out = model(torch.zeros(1, 16_000), output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1].shape[-1] == 128


def test_incomplete_folder_is_not_mistaken_for_a_build(tmp_path: Path) -> None:
    # A folder without the marker (e.g. someone else's files) is neither reused nor deleted.
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "config.json").write_text("{}")
    with pytest.raises(EmotuneError, match="not empty"):
        build_tiny_encoder("tiny-hubert", target)
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_errors_are_explained(tmp_path: Path) -> None:
    with pytest.raises(EmotuneError, match="tiny-wav2vec2") as err:
        build_tiny_encoder("tiny-gpt", tmp_path / "x")
    assert "tiny-gpt" in str(err.value) and "tiny-bert" in str(err.value)
    for texts in (None, [], ["   ", ""]):
        with pytest.raises(EmotuneError, match="texts"):
            build_tiny_encoder("tiny-roberta", tmp_path / "r", texts=texts)
    assert not any(tmp_path.iterdir())
