"""Hub downloads take only what loading needs, the offline look-up finds what such a download leaves, and a
checkpoint that ships only pytorch_model.bin loads with the torch the project requires.

No test reaches the hub (it is not reachable from the test machines): the choice of files is a pure function,
checked on the file listings of the paper's checkpoints, and the cache is laid out on disk as huggingface_hub
lays it out.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tone
from packaging.requirements import Requirement
from safetensors.torch import load_file

from emotune.errors import EmotuneError
from emotune.features.catalog import HUB_SPEECH, HUB_TEXT, EncoderSpec, resolve_encoder
from emotune.features.encode import open_encoder
from emotune.features.locate import hub_load_files, locate_hf_folder
from emotune.features.recipe import make_recipe
from emotune.features.tiny import build_tiny_encoder

HUB_FILES = [".gitattributes", "README.md"]  # in every hub repository, needed by no loader

# Top-level files of the paper's checkpoints on their main branch, as far as public sources show them (the
# report of this change lists the source of each fact). Where a file is not confirmed, the comment says so.
LISTINGS = {
    # config.json, preprocessor_config.json and pytorch_model.bin: the three files public setup scripts fetch
    # from resolve/main; whether main also holds model.safetensors is unknown
    "xlsr": [*HUB_FILES, "config.json", "preprocessor_config.json", "pytorch_model.bin"],
    "wavlm-large": [*HUB_FILES, "config.json", "preprocessor_config.json", "pytorch_model.bin"],
    # pytorch_model.bin and no model.safetensors, per the hub's file list (siblings) quoted in a public fix
    "wavlm-base-plus": [*HUB_FILES, "config.json", "preprocessor_config.json", "pytorch_model.bin"],
    # config.json and preprocessor_config.json are documented in a cached snapshot; the weights file name is
    # the one every 2021 transformers upload has, not confirmed
    "hubert-large": [*HUB_FILES, "config.json", "preprocessor_config.json", "pytorch_model.bin"],
    # model.safetensors, pytorch_model.bin, config.json, tokenizer.json and vocab.txt are fetched from
    # resolve/main by public code; the TensorFlow, Flax and Rust copies are those the canonical BERT
    # repositories carry (the files the choice must leave behind), not each confirmed
    "bert-large-uncased": [*HUB_FILES, "LICENSE", "config.json", "flax_model.msgpack", "model.safetensors",
                           "pytorch_model.bin", "rust_model.ot", "tf_model.h5", "tokenizer.json",
                           "tokenizer_config.json", "vocab.txt"],
    # the five files a public setup script fetches from resolve/main; model.safetensors unknown
    "beto": [*HUB_FILES, "config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer_config.json",
             "vocab.txt"],
}


@pytest.mark.parametrize("name", ["xlsr", "wavlm-large", "wavlm-base-plus", "hubert-large"])
def test_speech_checkpoints_fetch_their_weights_and_feature_extractor_settings(name):
    files = hub_load_files(HUB_SPEECH[name].source, LISTINGS[name])
    assert files == ["config.json", "preprocessor_config.json", "pytorch_model.bin"]


def test_bert_large_fetches_safetensors_and_no_other_copy_of_the_weights():
    files = hub_load_files(HUB_TEXT["bert-large-uncased"].source, LISTINGS["bert-large-uncased"])
    assert files == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt"]


def test_beto_fetches_its_weights_and_wordpiece_tokenizer():
    files = hub_load_files(HUB_TEXT["beto"].source, LISTINGS["beto"])
    assert files == ["config.json", "pytorch_model.bin", "special_tokens_map.json", "tokenizer_config.json",
                     "vocab.txt"]


def test_xlm_roberta_layout_keeps_the_sentencepiece_model_and_skips_exports():
    # The XLM-RoBERTa family's layout (roberta-es is an XLM-R large); that repository's own listing is unknown.
    listing = [*HUB_FILES, "config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
               "flax_model.msgpack", "sentencepiece.bpe.model", "tokenizer.json", "onnx/config.json",
               "onnx/model.onnx", "onnx/model.onnx_data", "onnx/sentencepiece.bpe.model"]
    assert hub_load_files(HUB_TEXT["roberta-es"].source, listing) == [
        "config.json", "model.safetensors", "sentencepiece.bpe.model", "tokenizer.json"]


def test_a_trainer_pushed_repository_leaves_its_training_state_behind():
    # The layout Trainer.push_to_hub gives a fine-tuned classifier such as beto-emo (its own listing is unknown).
    listing = [*HUB_FILES, "config.json", "model.safetensors", "training_args.bin", "optimizer.pt", "scheduler.pt",
               "rng_state.pth", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
               "model.fp16.safetensors"]
    files = hub_load_files(HUB_TEXT["beto-emo"].source, listing)
    assert files == ["config.json", "model.safetensors", "special_tokens_map.json", "tokenizer.json",
                     "tokenizer_config.json", "vocab.txt"]


def test_sharded_checkpoints_fetch_the_index_and_every_shard_of_one_format():
    shards = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    bins = ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json"]
    assert hub_load_files("org/both", ["config.json", *shards, *bins]) == ["config.json", *shards]
    assert hub_load_files("org/bin-only", ["config.json", *bins]) == ["config.json", *bins]


def test_a_repository_without_pytorch_weights_is_refused_before_any_download():
    listing = [*HUB_FILES, "config.json", "tf_model.h5", "flax_model.msgpack", "onnx/model.safetensors"]
    with pytest.raises(EmotuneError, match=r"org/tf-only has no PyTorch weights .*tf_model\.h5.*save_pretrained"):
        hub_load_files("org/tf-only", listing)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own, with the hub switched off.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE once, at import: the variables are set for anything
    started from here, and the values it took from them are set for this process.
    """
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
    """``repo_id``'s main branch in ``cache`` as huggingface_hub leaves it: refs/main naming a snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        (snapshot / name).write_bytes(content)
    return snapshot


def test_offline_a_model_not_in_the_cache_names_the_model_and_how_to_fetch_it(hub_cache):
    spec = resolve_encoder("xlsr", "speech")
    assert locate_hf_folder(spec, download=False) is None
    with pytest.raises(EmotuneError) as caught:
        locate_hf_folder(spec)
    message = str(caught.value)
    assert "'xlsr' (facebook/wav2vec2-xls-r-300m)" in message and "HF_HUB_OFFLINE" in message
    assert "download_hub_model('facebook/wav2vec2-xls-r-300m')" in message
    assert "encoders.speech=/path/to/folder" in message


def test_offline_a_snapshot_of_only_the_needed_files_is_found(hub_cache):
    files = {"config.json": b"{}", "preprocessor_config.json": b"{}", "pytorch_model.bin": b"weights"}
    snapshot = cache_snapshot(hub_cache, "microsoft/wavlm-large", files)
    spec = resolve_encoder("wavlm-large", "speech")
    assert locate_hf_folder(spec, download=False) == snapshot
    assert locate_hf_folder(spec) == snapshot


def test_offline_the_look_up_survives_the_listing_huggingface_hub_keeps_of_the_whole_repository(hub_cache):
    # Recent huggingface_hub releases keep the repository's full listing next to a snapshot and refuse a
    # snapshot_download(local_files_only=True) of a folder missing any listed file: exactly what a download of
    # only the needed files leaves. Older releases keep no listing, and have nothing to check here.
    tree_cache = pytest.importorskip("huggingface_hub._tree_cache")
    from huggingface_hub import snapshot_download

    listing = LISTINGS["bert-large-uncased"]
    source = HUB_TEXT["bert-large-uncased"].source
    needed = hub_load_files(source, listing)
    snapshot = cache_snapshot(hub_cache, source, {name: b"x" for name in needed}, commit="b" * 40)
    entries = {name: tree_cache.TreeCacheEntry(size=1, blob_id=f"{i:040x}") for i, name in enumerate(listing)}
    tree_cache.write_tree_cache(str(snapshot.parents[1]), "b" * 40, entries)
    with pytest.raises(Exception, match="incomplete"):
        snapshot_download(source, local_files_only=True)
    assert locate_hf_folder(resolve_encoder("bert-large-uncased", "text")) == snapshot


def test_offline_a_snapshot_without_weights_is_not_taken_for_the_model(hub_cache):
    # what a config fetched alone (AutoConfig) leaves: loading it would fail later, far from the cause
    cache_snapshot(hub_cache, "dccuchile/bert-base-spanish-wwm-uncased", {"config.json": b"{}"})
    spec = resolve_encoder("beto", "text")
    assert locate_hf_folder(spec, download=False) is None
    with pytest.raises(EmotuneError, match="not in the local Hugging Face cache with its weights"):
        locate_hf_folder(spec)


def test_the_torch_floor_lets_transformers_read_pytorch_model_bin():
    """Several of the paper's checkpoints ship only pytorch_model.bin, which transformers reads with torch.load
    only on torch 2.6 or newer (CVE-2025-32434): the declared floor must exclude every older torch."""
    from transformers.utils.import_utils import check_torch_load_is_safe

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    requirements = {Requirement(line).name: Requirement(line) for line in pyproject["project"]["dependencies"]}
    torch_range = requirements["torch"].specifier
    assert not torch_range.contains("2.5.1") and torch_range.contains("2.6.0")
    check_torch_load_is_safe()  # the torch installed from that range passes transformers' own check


@pytest.mark.parametrize("preset", ["tiny-wav2vec2", "tiny-wavlm", "tiny-hubert"])
def test_a_speech_checkpoint_shipped_as_pytorch_model_bin_loads_whole(preset, tmp_path, monkeypatch):
    """The .bin-only speech checkpoints were saved in 2021 with the positional convolution's weight norm as
    weight_g / weight_v; loaded from such a file, a tiny model of the same family gives the same features as
    from safetensors, so no weight was left at its random initial value."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reference = build_tiny_encoder(preset, tmp_path / "safetensors")
    legacy = tmp_path / "bin"
    legacy.mkdir()
    for name in ("config.json", "preprocessor_config.json"):
        (legacy / name).write_bytes((reference / name).read_bytes())
    renamed = {key.replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): value
               for key, value in load_file(reference / "model.safetensors").items()}
    assert any(key.endswith("weight_g") for key in renamed)
    torch.save(renamed, legacy / "pytorch_model.bin")

    clip = tone(1.2, seed=3)
    outputs = []
    for folder in (reference, legacy):
        spec = EncoderSpec(preset, "speech", "hf", str(folder))
        outputs.append(open_encoder(make_recipe(spec, folder, layers="all"), device="cpu").encode([clip])[0])
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
