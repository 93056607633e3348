"""Tiny random-initialised encoders for emotune's embedded offline default.

emotune normally uses frozen pretrained encoders from the model hub (wav2vec2/XLSR, WavLM, HuBERT for
speech; BERT/RoBERTa for text). This machine-independent default must run without the network, so this
module builds *tiny* encoders of the same families from configs instead: the weights are random (seeded),
the text tokenizers are trained on the corpus text with the ``tokenizers`` library, and everything is
written with ``save_pretrained``. Downstream code then loads them through exactly the same
``AutoModel`` / ``AutoTokenizer`` / ``AutoFeatureExtractor`` ``from_pretrained(folder,
local_files_only=True)`` path as a real hub checkpoint, so the offline default exercises the real code.

A build folder contains the usual Hugging Face files (``config.json``, ``model.safetensors`` and either
``preprocessor_config.json`` or ``tokenizer.json`` + ``tokenizer_config.json``) plus the marker
:data:`TINY_MARKER`, written last. A folder is only ever made visible under its final name by a rename
once complete, so the marker's presence means the build is whole; if its recorded parameters match the
request, :func:`build_tiny_encoder` returns at once. Builds are deterministic: the same arguments give
byte-identical weight and tokenizer files, which keeps the feature cache keyed on them valid.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Iterable

from emotune.errors import EmotuneError
from emotune.names import SAMPLE_RATE

TINY_MARKER = "emotune_tiny.json"
# Bumped when the build recipe changes so that folders built by an older recipe are rebuilt.
TINY_FORMAT = 1

TEXT_MAX_LEN = 256
TEXT_VOCAB_TARGET = 2000

# Shared by every speech preset: a tiny transformer on top of a narrow convolutional front end that keeps
# the real kernels and strides, hence the real 320x downsampling (about 50 frames per second at 16 kHz),
# so frame counts, masks and pooling behave exactly as with the full-size models.
_SPEECH_COMMON: dict[str, Any] = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": (16,) * 7,
    "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_stride": (5, 2, 2, 2, 2, 2, 2),
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
    # Pretraining-only randomness: spec-augment masking would also add a masked_spec_embed parameter
    # and make train-mode outputs random; frozen encoders never need either.
    "apply_spec_augment": False,
    "mask_time_prob": 0.0,
    "mask_feature_prob": 0.0,
    "layerdrop": 0.0,
    "hidden_dropout": 0.0,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.0,
}
# XLSR / large checkpoints: per-frame layer norm in the front end and pre-norm transformer layers; these
# honour an attention mask, so padded batches give the same features as single clips.
_LAYER_NORM_STYLE: dict[str, Any] = {"feat_extract_norm": "layer", "do_stable_layer_norm": True, "conv_bias": True}
# Base checkpoints: group norm over time in the first conv layer, post-norm layers; padding leaks into the
# statistics, which is why the real base models are meant to be run on unpadded clips.
_GROUP_NORM_STYLE: dict[str, Any] = {"feat_extract_norm": "group", "do_stable_layer_norm": False, "conv_bias": False}

# Text is wider than speech: a random encoder keeps a bag of words only if random token embeddings stay
# nearly orthogonal, and at width 32 they do not (measured on the demo corpus with a logistic-regression
# probe on mean+std pooled features, dev macro-F1: width 32 0.31, 128 0.47, 256 0.59; TF-IDF 0.66).
_TEXT_COMMON: dict[str, Any] = {
    "hidden_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 512,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
}

TINY_PRESETS: dict[str, dict[str, Any]] = {
    "tiny-wav2vec2": {
        "modality": "speech",
        "family": "wav2vec2",
        "config": {**_SPEECH_COMMON, **_LAYER_NORM_STYLE},
    },
    "tiny-wav2vec2-base": {
        "modality": "speech",
        "family": "wav2vec2",
        "config": {**_SPEECH_COMMON, **_GROUP_NORM_STYLE},
    },
    "tiny-wavlm": {
        "modality": "speech",
        "family": "wavlm",
        "config": {**_SPEECH_COMMON, **_LAYER_NORM_STYLE, "num_buckets": 16, "max_bucket_distance": 32},
    },
    "tiny-hubert": {
        "modality": "speech",
        "family": "hubert",
        "config": {**_SPEECH_COMMON, **_LAYER_NORM_STYLE},
    },
    "tiny-bert": {
        "modality": "text",
        "family": "bert",
        "config": {**_TEXT_COMMON, "max_position_embeddings": TEXT_MAX_LEN, "type_vocab_size": 2, "pad_token_id": 0},
    },
    "tiny-roberta": {
        "modality": "text",
        "family": "roberta",
        # RoBERTa numbers positions from pad_token_id + 1, so two extra slots are needed for max_len tokens.
        "config": {
            **_TEXT_COMMON,
            "max_position_embeddings": TEXT_MAX_LEN + 2,
            "type_vocab_size": 1,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
    },
}

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, [PAD] = 0 as in BERT
_ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # ids 0..4, <pad> = 1 as in RoBERTa


def _unique_sorted(texts: Iterable[str]) -> list[str]:
    # Sorting and deduplicating makes the tokenizer and the hash independent of corpus order and repeats.
    return sorted({t for t in texts if isinstance(t, str) and t.strip()})


def tiny_text_hash(texts: Iterable[str]) -> str:
    """Stable sha256 (hex) of the sorted unique non-blank ``texts``; order and repeats do not matter."""
    digest = hashlib.sha256()
    for text in _unique_sorted(texts):
        data = text.encode("utf-8")
        # Length prefix so that no two different lists can serialise to the same byte stream.
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()


def _heads_for(hidden: int) -> int:
    """About one head per 64 channels (at least 2), lowered until it divides ``hidden``."""
    heads = max(2, hidden // 64)
    while heads > 1 and hidden % heads:
        heads -= 1
    return heads


def _resolved_config(preset: str, hidden_size: int | None, num_layers: int | None) -> dict[str, Any]:
    kwargs = copy.deepcopy(TINY_PRESETS[preset]["config"])
    if hidden_size is not None:
        if not isinstance(hidden_size, int) or isinstance(hidden_size, bool) or hidden_size < 2:
            raise EmotuneError(f"hidden_size must be an integer of at least 2, got {hidden_size!r}.")
        kwargs["hidden_size"] = hidden_size
        kwargs["intermediate_size"] = 2 * hidden_size
        kwargs["num_attention_heads"] = _heads_for(hidden_size)
        if "num_conv_pos_embedding_groups" in kwargs and hidden_size % kwargs["num_conv_pos_embedding_groups"]:
            # The grouped positional convolution needs the groups to divide the width.
            kwargs["num_conv_pos_embedding_groups"] = 1
    if num_layers is not None:
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
            raise EmotuneError(f"num_layers must be a positive integer, got {num_layers!r}.")
        kwargs["num_hidden_layers"] = num_layers
    return kwargs


def _expected_record(preset: str, seed: int, config: dict[str, Any], text_hash: str | None) -> dict[str, Any]:
    """The parameters that decide the build; a folder is reused only if its marker records the same."""
    return {
        "format": TINY_FORMAT,
        "preset": preset,
        "modality": TINY_PRESETS[preset]["modality"],
        "family": TINY_PRESETS[preset]["family"],
        "seed": seed,
        "hidden_size": config["hidden_size"],
        "num_layers": config["num_hidden_layers"],
        "texts_sha256": text_hash,
    }


def read_tiny_marker(folder: str | Path) -> dict[str, Any] | None:
    """The marker of a complete tiny build in ``folder``, or ``None`` if there is none (or it is unreadable)."""
    try:
        data = json.loads((Path(folder) / TINY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_matches(folder: Path, expected: dict[str, Any]) -> bool:
    data = read_tiny_marker(folder)
    return data is not None and data.get("params") == expected


# ---------------------------------------------------------------------------------------------- speech


def _build_speech(family: str, config_kwargs: dict[str, Any], seed: int, out: Path) -> dict[str, Any]:
    import torch
    from transformers import (
        HubertConfig,
        HubertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
        WavLMConfig,
        WavLMModel,
    )

    classes = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "wavlm": (WavLMConfig, WavLMModel),
        "hubert": (HubertConfig, HubertModel),
    }
    config_cls, model_cls = classes[family]
    config = config_cls(**config_kwargs)
    model = _seeded_model(model_cls, config, seed, torch)
    model.save_pretrained(out)

    # do_normalize=False: emotune normalises waveforms itself with corpus-wide statistics, and a
    # per-utterance normalisation here would silently undo that.
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=False,
        return_attention_mask=True,
    )
    extractor.save_pretrained(out)
    return config.to_dict()


def _seeded_model(model_cls: Any, config: Any, seed: int, torch: Any) -> Any:
    # fork_rng restores the global RNG afterwards: building a default encoder must not change the random
    # stream of whatever the caller does next (e.g. a trial's own seeding).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            model = model_cls(config)
    return model.to(torch.float32).eval()


# ------------------------------------------------------------------------------------------------ text


def _train_tokenizer(family: str, texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if family == "bert":
        # NFC first so that decomposed accents (e + combining acute) become the same symbol as "é";
        # strip_accents=False keeps Spanish accents, which carry meaning (e.g. "qué" vs "que").
        normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.BertNormalizer(lowercase=True, strip_accents=False)]
        )
        pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        vocab = _learn_wordpiece_vocab(texts, normalizer, pre_tokenizer)
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.WordPiece(prefix="##")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
    else:
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        # Byte-level BPE never produces an unknown token, whatever the script or accents.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TEXT_VOCAB_TARGET,
            special_tokens=list(_ROBERTA_SPECIALS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        # RobertaProcessing takes (sep, cls) positionally as (token, id) tuples.
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False
        )
    return tok


def _learn_wordpiece_vocab(texts: list[str], normalizer: Any, pre_tokenizer: Any) -> dict[str, int]:
    """A WordPiece vocabulary learnt with the ``tokenizers`` BPE trainer, reproducibly.

    ``WordPieceTrainer`` is BPE with a "##" prefix on word-internal symbols, but it numbers those "##x"
    symbols in hash-map order, which changes from process to process; merge ties are broken by id, so
    even the learnt vocabulary differs between runs. Here each word-internal character is instead
    spelt as its own private-use code point, so every symbol is an ordinary alphabet character (which
    the trainer numbers in code point order), the plain BPE trainer learns the same merges WordPiece
    would, deterministically, and the pieces are spelt back with "##" afterwards.
    """
    from tokenizers import Tokenizer, models, trainers

    words: list[str] = []
    for text in texts:
        words.extend(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    used = {ch for word in words for ch in word}
    inner_chars = sorted({ch for word in words for ch in word[1:]})
    # Supplementary private-use plane; skipping anything the corpus itself uses keeps the code unambiguous.
    free = (chr(cp) for cp in range(0xF0000, 0x10FFFE) if chr(cp) not in used)
    encode = {ch: next(free) for ch in inner_chars}
    decode = {code: ch for ch, code in encode.items()}

    bpe = Tokenizer(models.BPE())  # no pre-tokenizer: every training "sentence" below is one word
    trainer = trainers.BpeTrainer(
        vocab_size=TEXT_VOCAB_TARGET, special_tokens=list(_BERT_SPECIALS), show_progress=False
    )
    encoded = [word[0] + "".join(encode[ch] for ch in word[1:]) for word in words]
    bpe.train_from_iterator(encoded, trainer=trainer, length=len(encoded))

    vocab: dict[str, int] = {}
    for piece, idx in sorted(bpe.get_vocab().items(), key=lambda item: item[1]):
        if piece in _BERT_SPECIALS:
            vocab[piece] = idx
        elif piece[0] in decode:  # starts inside a word: a continuation piece
            vocab["##" + "".join(decode[ch] for ch in piece)] = idx
        else:
            vocab[piece[0] + "".join(decode[ch] for ch in piece[1:])] = idx
    if len(vocab) != bpe.get_vocab_size() or sorted(vocab.values()) != list(range(len(vocab))):
        raise EmotuneError("Internal error: the tiny WordPiece vocabulary has clashing or missing pieces.")
    return vocab


def _wrap_tokenizer(family: str, tok: Any) -> Any:
    from transformers import AddedToken, PreTrainedTokenizerFast

    special = {
        "bert": {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                 "mask_token": "[MASK]"},
        # As in RoBERTa: "<mask>" swallows the space before it, so "a <mask>" masks the word " x".
        "roberta": {"bos_token": "<s>", "eos_token": "</s>", "cls_token": "<s>", "sep_token": "</s>",
                    "unk_token": "<unk>", "pad_token": "<pad>",
                    "mask_token": AddedToken("<mask>", lstrip=True, rstrip=False)},
    }["bert" if family == "bert" else "roberta"]
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=TEXT_MAX_LEN, padding_side="right",
                                   **special)


def _build_text(family: str, config_kwargs: dict[str, Any], seed: int, texts: list[str], out: Path) -> dict[str, Any]:
    import torch
    from transformers import BertConfig, BertModel, RobertaConfig, RobertaModel

    tok = _train_tokenizer(family, texts)
    specials = _BERT_SPECIALS if family == "bert" else _ROBERTA_SPECIALS
    # The config's pad/bos/eos ids assume the specials occupy ids 0..4 in this order.
    for expected_id, token in enumerate(specials):
        if tok.token_to_id(token) != expected_id:
            raise EmotuneError(f"Internal error: tokenizer gave {token} id {tok.token_to_id(token)}, "
                               f"not {expected_id}.")
    _wrap_tokenizer(family, tok).save_pretrained(out)

    config_cls, model_cls = (BertConfig, BertModel) if family == "bert" else (RobertaConfig, RobertaModel)
    config = config_cls(vocab_size=tok.get_vocab_size(), **config_kwargs)
    model = _seeded_model(model_cls, config, seed, torch)
    model.save_pretrained(out)
    return {**config.to_dict(), "vocab_size": tok.get_vocab_size()}


# ----------------------------------------------------------------------------------------------- build


def _install(tmp: Path, out_dir: Path, expected: dict[str, Any]) -> None:
    """Move the finished ``tmp`` folder to ``out_dir``, replacing only an older tiny build or an empty folder."""
    if out_dir.exists():
        if _marker_matches(out_dir, expected):
            return  # another process finished the same build meanwhile; keep theirs
        if not out_dir.is_dir():
            raise EmotuneError(f"Cannot build a tiny encoder at {out_dir}: a file with that name exists.")
        if read_tiny_marker(out_dir) is None and any(out_dir.iterdir()):
            # Refuse to delete something that is not ours (e.g. a mistyped path pointing at user data).
            raise EmotuneError(
                f"Cannot build a tiny encoder at {out_dir}: the folder exists, is not empty and is not an "
                f"emotune tiny encoder (no {TINY_MARKER}). Choose another folder or empty this one."
            )
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            out_dir.rename(trash)
        except FileNotFoundError:
            trash = None  # removed concurrently; nothing to set aside
        try:
            tmp.rename(out_dir)
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        tmp.rename(out_dir)
    except OSError:
        # Lost a race with another process building into the same folder.
        if not _marker_matches(out_dir, expected):
            raise


def build_tiny_encoder(
    preset: str,
    out_dir: str | Path,
    texts: list[str] | None = None,
    seed: int = 0,
    hidden_size: int | None = None,
    num_layers: int | None = None,
) -> Path:
    """Build the tiny encoder ``preset`` into ``out_dir`` and return the folder's absolute path.

    Text presets need ``texts`` (the corpus transcripts) to train their tokenizer; speech presets ignore
    them. ``hidden_size`` / ``num_layers`` override the preset's size (intermediate size becomes twice the
    width, heads about one per 64 channels). A folder already holding a complete build with the same
    parameters is returned untouched.
    """
    if preset not in TINY_PRESETS:
        raise EmotuneError(f"Unknown tiny encoder preset {preset!r}. Known presets: {', '.join(sorted(TINY_PRESETS))}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise EmotuneError(f"seed must be an integer, got {seed!r}.")
    spec = TINY_PRESETS[preset]
    config_kwargs = _resolved_config(preset, hidden_size, num_layers)

    unique_texts: list[str] = []
    text_hash: str | None = None
    if spec["modality"] == "text":
        unique_texts = _unique_sorted(texts or [])
        if not unique_texts:
            raise EmotuneError(
                f"The text preset {preset!r} needs the corpus texts to train its tokenizer, but none were given "
                "(or all were blank). Pass texts=[...] with the transcripts, or use a real text model."
            )
        text_hash = tiny_text_hash(unique_texts)

    out_dir = Path(out_dir).expanduser().resolve()
    expected = _expected_record(preset, seed, config_kwargs, text_hash)
    if _marker_matches(out_dir, expected):
        return out_dir

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A hidden sibling on the same filesystem, so the final rename is atomic and a crash mid-build leaves
    # only a dot-folder that never carries the final name.
    tmp = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        if spec["modality"] == "speech":
            full_config = _build_speech(spec["family"], config_kwargs, seed, tmp)
        else:
            full_config = _build_text(spec["family"], config_kwargs, seed, unique_texts, tmp)
        import tokenizers
        import torch
        import transformers

        marker = {
            "params": expected,
            "vocab_size": full_config.get("vocab_size") if spec["modality"] == "text" else None,
            "num_attention_heads": config_kwargs["num_attention_heads"],
            "intermediate_size": config_kwargs["intermediate_size"],
            "versions": {
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
                "torch": torch.__version__,
            },
        }
        # Written last: its presence is what tells a later call that the folder is complete.
        (tmp / TINY_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _install(tmp, out_dir, expected)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


__all__ = [
    "TINY_MARKER",
    "TINY_PRESETS",
    "build_tiny_encoder",
    "read_tiny_marker",
    "tiny_text_hash",
]
