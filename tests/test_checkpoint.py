"""The model folder a trial leaves: the card and weights round trip, and bad or future cards are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch

from emotune.errors import EmotuneError
from emotune.model.checkpoint import CARD_FORMAT, ModelCard, load_model, save_model

CARD = ModelCard(labels=["anger", "joy", "neutral"], dims={"speech": (2, 16), "text": (1, 24)},
                 norms={"speech": "global", "text": "layer"},
                 model={"family": "attention", "width": 32, "hidden_layers": 1, "dropout": 0.1, "fused_dim": None},
                 encoders={"speech": {"name": "fbank", "key": "fbank-L0", "layer_indices": [0, 1], "storage": "int8",
                                      "waveform_norm": "utterance", "max_tokens": 256},
                           "text": {"name": "tiny-bert", "key": "tiny-bert-L1", "layer_indices": [1],
                                    "storage": "float16", "waveform_norm": "global", "max_tokens": 64}},
                 best_epoch=7, best_val_f1=0.625, trial_seed=3)


def _batch():
    torch.manual_seed(1)
    return {"speech": torch.randn(2, 2, 9, 16), "speech_mask": torch.ones(2, 9, dtype=torch.bool),
            "text": torch.randn(2, 1, 4, 24), "text_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)}


def test_a_saved_model_loads_with_the_same_card_and_outputs(tmp_path):
    torch.manual_seed(0)
    model = CARD.build_model()
    model.adapters["speech"].set_statistics(torch.randn(16), torch.rand(16) + 0.5)
    files = save_model(model, CARD, tmp_path / "best")
    assert sorted(f.name for f in files) == ["model.safetensors", "model_card.json"]
    loaded, card = load_model(tmp_path / "best")
    assert card == CARD and card.format == CARD_FORMAT
    assert json.loads((tmp_path / "best" / "model_card.json").read_text())["format"] == CARD_FORMAT
    with torch.no_grad():
        torch.testing.assert_close(loaded(_batch()), model.eval()(_batch()), atol=0, rtol=0)


def test_a_card_from_before_formats_gets_the_settings_of_its_time(tmp_path):
    data = CARD.to_dict()
    del data["format"]
    data["features"] = {"max_text_tokens": 128}
    for description in data["encoders"].values():
        for key in ("storage", "waveform_norm", "max_tokens", "layer_indices"):
            del description[key]
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    card = ModelCard.load(tmp_path)
    for description in card.encoders.values():
        assert (description["storage"], description["waveform_norm"], description["layer_indices"],
                description["max_tokens"]) == ("float16", "global", "all", 128)
    assert card.dims == CARD.dims
    # a CogniCIC trial of a search that sampled the family wrote no branch width: it used 256, and loads so
    data["model"] = {"family": "cognicic", "modalities": ["speech", "text"], "dropout": 0.3}
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    model = ModelCard.load(tmp_path).build_model()
    assert model.branches["speech"].out_features == 256


def test_bad_cards_are_refused_with_the_file_and_the_fix(tmp_path):
    with pytest.raises(EmotuneError, match=r"is incomplete: model.safetensors, model_card.json missing in "):
        load_model(tmp_path)
    data = CARD.to_dict() | {"format": CARD_FORMAT + 1}
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    with pytest.raises(EmotuneError, match=rf"model_card.json has format {CARD_FORMAT + 1}.*upgrade emotune"):
        ModelCard.load(tmp_path)
    del data["dims"]
    (tmp_path / "model_card.json").write_text(json.dumps(data))
    with pytest.raises(EmotuneError, match=r"model_card.json lacks dims"):
        ModelCard.load(tmp_path)
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(EmotuneError, match=r"cannot read the model card .*model_card.json"):
        ModelCard.load(tmp_path)
