"""Random-initialised replicas of the paper's hub encoders, built offline from their exact architectures.

A replica has the real model's shapes (layers, widths, front end, vocabulary) and random, seeded weights, in the
Hugging Face format, so everything whose cost follows the shapes (the cache fill, the cache's size, a head's
training step) runs as it would on the real checkpoint while nothing is downloaded. The scale benchmark
(scripts/bench_scale.py) and the GPU check (scripts/gpu_check.py) build them; the architectures are the catalog's
(:data:`emotune.features.catalog.ARCHITECTURES`).

Text replicas cannot have their real tokenizer offline (no sentencepiece model, no WordPiece vocabulary): a
tokenizer learnt on the given transcripts stands in, of the same family, inside the real vocabulary size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from emotune.errors import EmotuneError
from emotune.names import SAMPLE_RATE

REPLICA_MARKER = "emotune_replica.json"  # written last: a folder that holds it is complete
# model family -> (transformers config and model class names, the stand-in tokenizer's family)
FAMILIES = {
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2Model", None),
    "wavlm": ("WavLMConfig", "WavLMModel", None),
    "hubert": ("HubertConfig", "HubertModel", None),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "roberta"),
    "roberta": ("RobertaConfig", "RobertaModel", "roberta"),
    "bert": ("BertConfig", "BertModel", "bert"),
}


def architecture(name: str, overrides: dict | None = None) -> tuple[str, dict]:
    """The family and config of the catalog architecture ``name``, with ``overrides`` (a smaller size, say)."""
    from emotune.features.catalog import ARCHITECTURES

    if name not in ARCHITECTURES:
        raise EmotuneError(f"no replica architecture '{name}'; known: {', '.join(sorted(ARCHITECTURES))}")
    family, config = ARCHITECTURES[name]
    return family, {**config, **(overrides or {})}


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / REPLICA_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _save_input_side(family: str, config: dict, texts: Sequence[str] | None, out: Path) -> dict:
    """The preprocessor (speech) or stand-in tokenizer (text) beside the weights; what the marker records of it."""
    import transformers

    from emotune.features.tiny import _train_tokenizer, _wrap_tokenizer

    tokenizer_family = FAMILIES[family][2]
    if tokenizer_family is None:
        # do_normalize as the real checkpoint: layer-norm front ends (XLS-R, large models) were pre-trained on
        # waveforms z-normalised per clip, group-norm (base) ones were not; make_recipe reads it from here
        transformers.Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
            do_normalize=config.get("feat_extract_norm") == "layer", return_attention_mask=True).save_pretrained(out)
        return {}
    unique = sorted({t for t in texts or [] if t.strip()})
    if not unique:
        raise EmotuneError(f"the {family} replica needs transcripts to learn its stand-in tokenizer; none were given")
    tok = _train_tokenizer(tokenizer_family, unique)
    if tok.get_vocab_size() > config["vocab_size"]:
        raise EmotuneError(f"the stand-in tokenizer has {tok.get_vocab_size()} tokens, more than the model's "
                           f"{config['vocab_size']}: give fewer distinct transcripts or a larger vocab_size")
    _wrap_tokenizer(tokenizer_family, tok).save_pretrained(out)
    return {"tokenizer_vocab": tok.get_vocab_size()}


def build_replica(name: str, folder: str | Path, texts: Sequence[str] | None = None, seed: int = 0,
                  overrides: dict | None = None, device: str = "cpu") -> Path:
    """Build the replica of ``name`` into ``folder`` (returned untouched when a complete build of the same request
    is there). ``overrides`` change the config (the GPU check's CPU smoke shrinks it); ``device`` is where the
    weights are initialised (a GPU does it much faster), not where they are used."""
    import torch
    import transformers

    family, config = architecture(name, overrides)
    folder = Path(folder).expanduser().resolve()
    request = {"architecture": name, "family": family, "seed": seed, "config": config,
               "texts": len(set(texts or [])), "transformers": transformers.__version__}
    if (_marker(folder) or {}).get("request") == request:
        return folder
    tmp = folder.with_name(f".{folder.name}.building-{os.getpid()}")  # renamed when whole: never half-used
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config_name, model_name, _ = FAMILIES[family]
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        model.eval().save_pretrained(tmp)
        extra = _save_input_side(family, config, texts, tmp)
        parameters = sum(p.numel() for p in model.parameters())
        del model
        (tmp / REPLICA_MARKER).write_text(json.dumps({"request": request, "parameters": parameters, **extra},
                                                     indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def replica_parameters(folder: str | Path) -> int:
    """The parameter count a built replica recorded."""
    marker = _marker(Path(folder))
    if marker is None:
        raise EmotuneError(f"{folder} holds no complete replica ({REPLICA_MARKER} missing): build it again")
    return int(marker["parameters"])
