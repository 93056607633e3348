"""Encoder names to sources: the paper's hub models, tiny offline presets, classic features, any HF folder.

A name in a config (``encoders.speech=xlsr``, ``encoders.text=tiny-bert``) resolves to an
:class:`EncoderSpec`. Besides the catalog names, any Hugging Face hub id (``org/model``) or local folder in
the Hugging Face format works as an encoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from emotune.errors import EmotuneError

MODALITIES = ("speech", "text")

# The encoders the BSC-UPC paper compared, by the names emotune uses for them.
HUB_SPEECH = {
    "xlsr": "facebook/wav2vec2-large-xlsr-53",
    "wavlm-large": "microsoft/wavlm-large",
    "wavlm-base-plus": "microsoft/wavlm-base-plus",
    "hubert-large": "facebook/hubert-large-ll60k",
}
HUB_TEXT = {
    "roberta-es": "llange/xlm-roberta-large-spanish",
    "bert-large-uncased": "bert-large-uncased",
    "beto": "dccuchile/bert-base-spanish-wwm-uncased",
    "beto-emo": "ignacio-ave/beto-sentiment-analysis-spanish",
}
# Random-initialised miniatures of the same families, built offline (see features/tiny.py).
TINY_SPEECH = ("tiny-wav2vec2", "tiny-wav2vec2-base", "tiny-wavlm", "tiny-hubert")
TINY_TEXT = ("tiny-bert", "tiny-roberta")
# Hand-crafted speech features; the CogniCIC system used MFCC statistics.
CLASSIC_SPEECH = ("fbank", "mfcc")


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
        return EncoderSpec(name, modality, "hf", hub[name])
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
