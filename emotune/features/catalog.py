"""Encoder names to sources and shapes: the paper's hub models, tiny offline presets, classic features, folders.

A name in a config (``encoders.speech=xlsr``, ``encoders.text=tiny-bert``) resolves to an
:class:`EncoderSpec`. Besides the catalog names, any Hugging Face hub id (``org/model``) or local folder in
the Hugging Face format works as an encoder.

The catalog also keeps what can be known about a hub model before it is downloaded (layers, width,
parameters, and whether it was pre-trained on per-utterance normalised waveforms), so that ``emotune plan``
can size the feature cache and estimate the encoding time without fetching anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from emotune.errors import EmotuneError

MODALITIES = ("speech", "text")


@dataclass(frozen=True)
class HubModel:
    """A hub checkpoint and its shape, from its model card and config (checked against the BSC-UPC paper)."""

    source: str          # hub id
    layers: int          # transformer layers (the embedding output is not counted, nor stored)
    width: int           # hidden size
    params_m: float      # parameters of the bare encoder (AutoModel), in millions
    normalize: bool = False  # pre-trained on waveforms z-normalised per utterance (speech only)


# The encoders the BSC-UPC paper compared, by the names emotune uses for them. Per-utterance normalisation
# follows how each checkpoint was pre-trained (torchaudio's bundles of the same models agree: XLS-R 300M,
# WavLM Large and HuBERT Large normalise, WavLM Base+ does not).
HUB_SPEECH = {
    # XLS-R 300M: 436 k hours in 128 languages (paper, section 4); NOT wav2vec2-large-xlsr-53 (56 k h, 53 languages)
    "xlsr": HubModel("facebook/wav2vec2-xls-r-300m", 24, 1024, 315.4, normalize=True),
    "wavlm-large": HubModel("microsoft/wavlm-large", 24, 1024, 315.5, normalize=True),
    "wavlm-base-plus": HubModel("microsoft/wavlm-base-plus", 12, 768, 94.4, normalize=False),
    "hubert-large": HubModel("facebook/hubert-large-ll60k", 24, 1024, 315.4, normalize=True),
}
HUB_TEXT = {
    "roberta-es": HubModel("llange/xlm-roberta-large-spanish", 24, 1024, 559.9),  # XLM-RoBERTa large, Spanish MLM
    "bert-large-uncased": HubModel("bert-large-uncased", 24, 1024, 335.1),
    "beto": HubModel("dccuchile/bert-base-spanish-wwm-uncased", 12, 768, 109.9),
    "beto-emo": HubModel("ignacio-ave/beto-sentiment-analysis-spanish", 12, 768, 109.9),
}
# Random-initialised miniatures of the same families, built offline (see features/tiny.py).
TINY_SPEECH = ("tiny-wav2vec2", "tiny-wav2vec2-base", "tiny-wavlm", "tiny-hubert")
TINY_TEXT = ("tiny-bert", "tiny-roberta")
# Hand-crafted speech features; the CogniCIC system used MFCC statistics.
CLASSIC_SPEECH = ("fbank", "mfcc")
CLASSIC_WIDTH = {"fbank": 80, "mfcc": 40}

# The exact architectures of the winning pair and of the space's narrowest pair, to build random-initialised
# replicas offline (same shapes, no download; emotune/features/replica.py): what the scale benchmark, the GPU
# check and the real-scale tests run. Values from the checkpoints' config.json.
ARCHITECTURES = {
    "xlsr": ("wav2vec2", {
        "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "layer", "do_stable_layer_norm": True,
        "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": True, "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16, "apply_spec_augment": False, "layerdrop": 0.0,
    }),
    "roberta-es": ("xlm-roberta", {
        "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
        "intermediate_size": 4096, "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
        "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    }),
    # The narrowest pair of the paper's space: what the GPU check trains as the smallest shape.
    "wavlm-base-plus": ("wavlm", {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "group", "do_stable_layer_norm": False,
        "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
        "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "num_conv_pos_embeddings": 128,
        "num_conv_pos_embedding_groups": 16, "num_buckets": 320, "max_bucket_distance": 800,
        "apply_spec_augment": False, "layerdrop": 0.0,
    }),
    "beto": ("bert", {
        "vocab_size": 31002, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    }),
}


@dataclass(frozen=True)
class EncoderSpec:
    """What an encoder name means: its modality, how it is built ("hf", "tiny", "classic") and its source."""

    name: str
    modality: str
    kind: str
    source: str


def known_names(modality: str) -> list[str]:
    if modality == "speech":
        return [*HUB_SPEECH, *TINY_SPEECH, *CLASSIC_SPEECH]
    return [*HUB_TEXT, *TINY_TEXT]


def resolve_encoder(name: str, modality: str) -> EncoderSpec:
    """The spec for ``name`` used as a ``modality`` encoder; a clear error lists the names that exist."""
    if modality not in MODALITIES:
        raise EmotuneError(f"unknown modality '{modality}'; use one of {', '.join(MODALITIES)}")
    name = str(name).strip()
    other = "text" if modality == "speech" else "speech"
    hub = HUB_SPEECH if modality == "speech" else HUB_TEXT
    if name in hub:
        return EncoderSpec(name, modality, "hf", hub[name].source)
    if name in (TINY_SPEECH if modality == "speech" else TINY_TEXT):
        return EncoderSpec(name, modality, "tiny", name)
    if modality == "speech" and name in CLASSIC_SPEECH:
        return EncoderSpec(name, modality, "classic", name)
    if name in known_names(other):
        raise EmotuneError(
            f"'{name}' is a {other} encoder, not a {modality} encoder. "
            f"{modality.capitalize()} encoders: {', '.join(known_names(modality))}."
        )
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise EmotuneError(
                f"the folder {folder.resolve()} given as {modality} encoder has no config.json; "
                "pass a folder saved with `save_pretrained` (Hugging Face format)."
            )
        return EncoderSpec(name, modality, "hf", str(folder.resolve()))
    if "/" in name and not name.startswith((".", "/", "~")):
        return EncoderSpec(name, modality, "hf", name)  # a hub id such as org/model
    raise EmotuneError(
        f"unknown {modality} encoder '{name}'. Known {modality} encoders: {', '.join(known_names(modality))}; "
        "or give a Hugging Face hub id (org/model) or a local folder in the Hugging Face format."
    )


def hub_entry(spec: EncoderSpec) -> HubModel | None:
    """The catalog entry of a hub encoder named by its catalog name, else None (folders, other hub ids)."""
    return (HUB_SPEECH if spec.modality == "speech" else HUB_TEXT).get(spec.name) if spec.kind == "hf" else None


def pretrained_with_utterance_norm(spec: EncoderSpec, folder: Path | None) -> bool:
    """Whether ``spec``'s encoder expects waveforms z-normalised per utterance.

    The catalog decides for its names; a folder or other hub id says so in its ``preprocessor_config.json``
    (``do_normalize``), which is only a hint: override with ``features.waveform_norm``. Tiny presets and
    classic features never do.
    """
    if spec.modality != "speech" or spec.kind != "hf":
        return False
    entry = hub_entry(spec)
    if entry is not None:
        return entry.normalize
    if folder is None:
        return False
    try:
        return bool(json.loads((Path(folder) / "preprocessor_config.json").read_text()).get("do_normalize", False))
    except (OSError, ValueError):
        return False
