"""The embedded demo corpus: synthetic Spanish emotional speech with transcripts, built offline with espeak-ng.

It has the real corpus's layout (``train.csv`` with ``id,label,transcription`` plus a ``speaker`` column,
``test.csv`` with ``id,transcription``, ``test_labels.csv`` with ``id,label``, MP3 files in ``audio/``), so the
same reader loads both. Its design makes the search meaningful:

- the six challenge classes with an imbalance shaped like the real one (fear scarce, yet in every split);
- several voices, each with its own pitch, rate and loudness and its own expressiveness;
- emotion carried by prosody (pitch level and range, speaking rate, loudness) with overlapping classes;
- background noise at a random SNR;
- a third of the emotional clips carry the emotion only in the words (neutral voice), a third only in the
  voice (lexically neutral sentence) and the rest in both, so that neither modality alone suffices.

Everything is drawn from one seed: the same seed gives byte-identical CSV and audio files.

Command: ``emotune demo-corpus OUT_DIR [--clips 900] [--seed 0]``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from emotune.data.corpus import CHALLENGE_LABELS
from emotune.errors import EmotuneError

DEMO_VERSION = 1
MANIFEST = "demo_manifest.json"
_BUILDING = ".building"
OUTPUT_SAMPLE_RATE = 22_050  # espeak-ng's own rate; the reader resamples to 16 kHz like any corpus

# Class shares of the challenge's training split (neutral 1166, disgust 705, anger 399, sadness 345,
# joy 362, fear 23 of 3000), with fear raised to 3% so that a 900-clip corpus still has fear in every split.
REAL_COUNTS = {"neutral": 1166, "disgust": 705, "anger": 399, "sadness": 345, "joy": 362, "fear": 23}
FEAR_SHARE = 0.03
TEST_SHARE = 0.2  # the challenge had 3000 training and 750 test clips

# Prosody shift of each emotion: espeak pitch (0-99), pitch range (0-99), rate (wpm), loudness (dB).
PROSODY = {
    "neutral": (0, 0, 0, 0.0),
    "disgust": (-10, 14, -45, 3.0),
    "anger": (10, 25, 60, 10.0),
    "sadness": (-20, -30, -75, -9.0),
    "joy": (24, 35, 40, 5.0),
    "fear": (32, -15, 80, -4.0),
}
# Clip-to-clip spread of the same four values: large enough that neighbouring classes overlap.
JITTER = (5.0, 8.0, 14.0, 1.5)

# Voices: espeak variant, base pitch, base range, base rate, loudness offset (dB), expressiveness.
SPEAKERS = (
    ("es+m1", 40, 45, 160, 0.0, 1.0),
    ("es+f3", 60, 55, 175, -1.0, 1.2),
    ("es+m3", 35, 40, 185, 1.5, 0.7),
    ("es+f2", 66, 50, 165, 0.5, 0.9),
    ("es+m7", 45, 50, 150, -2.0, 1.1),
    ("es+f4", 55, 60, 190, 1.0, 0.8),
    ("es", 48, 45, 170, -0.5, 1.0),
    ("es+f1", 70, 45, 180, 2.0, 1.3),
)

MODE_SHARES = {"text": 1 / 3, "voice": 1 / 3, "both": 1 / 3}

# --- Spanish text -----------------------------------------------------------------------------------------
SUBJECTS = (
    "el autobús de la línea tres", "la reunión de vecinos", "mi hermana pequeña", "el informe trimestral",
    "la tienda de la esquina", "el partido del domingo", "el médico de cabecera", "la clase de inglés",
    "el tren de las ocho", "la factura de la luz", "mi jefe", "el perro de los vecinos", "la película nueva",
    "el examen de conducir", "la farmacia del barrio", "mi abuelo", "el vuelo a Sevilla", "la biblioteca",
    "el paquete de correos", "la profesora de matemáticas", "el coche de mi padre", "la obra de la calle",
    "el concierto de la plaza", "mi compañero de piso", "la cena de empresa", "el ayuntamiento",
    "la piscina municipal", "el técnico de la caldera", "la boda de mi prima", "el mercado central",
)
PREDICATES = (
    "llega a las nueve y cuarto", "empieza el martes por la mañana", "ha cambiado de horario",
    "está en la segunda planta", "se ha retrasado media hora", "cierra a las ocho de la tarde",
    "sale mañana temprano", "ha subido este mes", "vuelve la semana que viene", "tiene tres páginas más",
    "está cerrado por obras", "pasa por aquí todos los jueves", "dura unas dos horas",
    "se ha trasladado al otro edificio", "cuesta lo mismo que el año pasado", "termina a mediodía",
    "ha llamado esta mañana", "necesita la firma del director", "sigue igual que ayer",
    "se celebra en el salón de actos", "viene con el manual de instrucciones", "abre también los sábados",
    "ha enviado un correo a todos", "queda a diez minutos andando", "se decide en la próxima reunión",
)
NEUTRAL_OPENERS = ("", "", "", "Bueno, ", "Pues ", "Mira, ", "Oye, ", "Al parecer ", "Me han dicho que ",
                   "Creo que ", "Resulta que ", "Por lo visto ", "Te cuento que ")
NEUTRAL_CLOSERS = (".", ".", ".", ", ¿vale?", ", según el aviso.", ", nada más.", ", eso es todo.",
                   ", como siempre.")
# Cue phrases: a trailing "que" or ":" joins the clause; others stand as their own sentence.
CUES = {
    "joy": ("¡Qué alegría!", "¡Estoy feliz!", "¡Me encanta que", "¡Qué maravilla!", "Por fin una buena noticia:",
            "¡Qué ilusión que", "¡Estoy contentísima!", "¡Genial, qué bien!", "¡Qué suerte tenemos!",
            "¡Cómo me alegro de que"),
    "anger": ("¡Estoy harto!", "¡Qué rabia!", "Es indignante que", "¡Ya basta!", "Me pone furioso que",
              "¡Esto es inaceptable!", "No aguanto más:", "¡Maldita sea!", "¡Es una vergüenza que",
              "¡Me tienen hasta las narices!"),
    "sadness": ("Qué pena,", "Me siento muy triste porque", "Lo echo tanto de menos...", "No puedo parar de llorar,",
                "Qué desgracia,", "Estoy destrozada,", "Es una lástima que", "Me duele en el alma que",
                "Estoy tan sola...", "Qué tristeza que"),
    "fear": ("Tengo mucho miedo,", "¡Qué susto!", "Me aterra pensar que", "Estoy temblando,", "¡Socorro!",
             "Me da pánico que", "Tengo un mal presentimiento:", "No quiero ni mirar,", "Me asusta que",
             "¡Tengo el corazón en un puño!"),
    "disgust": ("¡Qué asco!", "Me repugna que", "Es asqueroso,", "¡Puaj!", "Me da náuseas que",
                "Qué repugnante,", "¡Qué porquería!", "Me da grima que", "¡Huele fatal!", "Es nauseabundo que"),
}
# Exclamations that fit several emotions: they make words alone an imperfect guide.
AMBIGUOUS_CUES = ("¡No me lo puedo creer!", "¡Dios mío!", "¿En serio?", "¡Madre mía!", "¡Increíble!", "¡Vaya!")


def class_counts(n_clips: int) -> dict[str, int]:
    """Clips per class for a corpus of ``n_clips``, shaped like the challenge's training split."""
    rest = {k: v for k, v in REAL_COUNTS.items() if k != "fear"}
    total_rest = sum(rest.values())
    shares = {k: (1 - FEAR_SHARE) * v / total_rest for k, v in rest.items()} | {"fear": FEAR_SHARE}
    counts = {k: int(np.floor(shares[k] * n_clips)) for k in CHALLENGE_LABELS}
    remainder = sorted(CHALLENGE_LABELS, key=lambda k: shares[k] * n_clips - counts[k], reverse=True)
    for k in remainder[: n_clips - sum(counts.values())]:
        counts[k] += 1
    return counts


def _clause(rng: np.random.Generator) -> str:
    return f"{SUBJECTS[rng.integers(len(SUBJECTS))]} {PREDICATES[rng.integers(len(PREDICATES))]}"


def _sentence_case(text: str) -> str:
    return text[0].upper() + text[1:]


def neutral_sentence(rng: np.random.Generator) -> str:
    opener = NEUTRAL_OPENERS[rng.integers(len(NEUTRAL_OPENERS))]
    closer = NEUTRAL_CLOSERS[rng.integers(len(NEUTRAL_CLOSERS))]
    return _sentence_case(f"{opener}{_clause(rng)}{closer}")


def emotional_sentence(label: str, rng: np.random.Generator) -> str:
    """A sentence whose words carry ``label``: a cue phrase with a neutral clause, sometimes an ambiguous one."""
    cue = CUES[label][rng.integers(len(CUES[label]))]
    clause = _clause(rng)
    if cue.endswith(("que", "porque", ":")):
        text = f"{cue} {clause}{'!' if cue.startswith('¡') else '.'}"
    elif cue.endswith((",", "...")):
        text = f"{cue} {clause}."
    elif rng.random() < 0.5:
        text = f"{cue} {_sentence_case(clause)}."
    else:
        text = f"{_sentence_case(clause)}. {cue}"
    if rng.random() < 0.25:
        text = f"{AMBIGUOUS_CUES[rng.integers(len(AMBIGUOUS_CUES))]} {text}"
    return text


@dataclass(frozen=True)
class ClipSpec:
    """Everything needed to synthesize one clip; planned up front so the worker order does not matter."""

    index: int
    id: str
    split: str
    label: str
    speaker: str
    voice: str
    mode: str
    text: str
    pitch: int
    pitch_range: int
    rate: int
    gain_db: float
    snr_db: float
    pad_start: float
    pad_end: float


def plan_corpus(n_clips: int, seed: int) -> list[ClipSpec]:
    """Decide every clip's class, split, speaker, text and prosody from ``seed``."""
    if n_clips < 60:
        raise EmotuneError(f"a demo corpus needs at least 60 clips to keep every class in every split, got {n_clips}.")
    rng = np.random.default_rng(seed)
    counts = class_counts(n_clips)
    labels = [label for label in CHALLENGE_LABELS for _ in range(counts[label])]
    order = rng.permutation(len(labels))
    labels = [labels[i] for i in order]
    # Test share per class, at least one test clip per class (fear included) and at least two left to train on.
    split = ["train"] * len(labels)
    for label in CHALLENGE_LABELS:
        idx = [i for i, lab in enumerate(labels) if lab == label]
        n_test = min(max(1, int(round(TEST_SHARE * len(idx)))), len(idx) - 2)
        for i in rng.permutation(idx)[:n_test]:
            split[int(i)] = "test"
    modes, weights = list(MODE_SHARES), np.array(list(MODE_SHARES.values()))
    used_ids: set[str] = set()
    specs = []
    for index, label in enumerate(labels):
        s = int(rng.integers(len(SPEAKERS)))
        voice, base_pitch, base_range, base_rate, base_gain, expressive = SPEAKERS[s]
        mode = "neutral" if label == "neutral" else str(rng.choice(modes, p=weights / weights.sum()))
        text = emotional_sentence(label, rng) if mode in ("text", "both") else neutral_sentence(rng)
        shift = PROSODY[label] if mode in ("voice", "both") else PROSODY["neutral"]
        noise = rng.standard_normal(4) * np.array(JITTER)
        while True:
            utt_id = f"{int(rng.integers(16**8)):08x}-{int(rng.integers(10**8)):08d}.mp3"
            if utt_id not in used_ids:
                used_ids.add(utt_id)
                break
        specs.append(ClipSpec(
            index=index, id=utt_id, split=split[index], label=label, speaker=f"spk{s + 1}", voice=voice,
            mode=mode, text=text,
            pitch=int(round(base_pitch + expressive * shift[0] + noise[0])),
            pitch_range=int(round(base_range + expressive * shift[1] + noise[1])),
            rate=int(round(base_rate + expressive * shift[2] + noise[2])),
            gain_db=float(base_gain + expressive * shift[3] + noise[3]),
            snr_db=float(rng.uniform(8.0, 30.0)),
            pad_start=float(rng.uniform(0.1, 0.6)), pad_end=float(rng.uniform(0.1, 0.6)),
        ))
    return specs


def render_clip(spec: ClipSpec, audio_dir: str, seed: int) -> float:
    """Synthesize, pad, set loudness, add noise and write one MP3; returns its duration in seconds."""
    import soundfile as sf

    from emotune.data import espeak
    from emotune.data.augment import synthetic_noise

    rng = np.random.default_rng([seed, spec.index])
    speech, sr = espeak.say(spec.text, seed=int(rng.integers(2**31)), voice=spec.voice, rate=spec.rate,
                            pitch=spec.pitch, pitch_range=spec.pitch_range)
    if speech.size == 0:
        raise EmotuneError(f"espeak-ng produced no audio for: {spec.text!r}")
    speech = speech / (np.abs(speech).max() + 1e-9) * 0.25 * 10 ** (spec.gain_db / 20)
    wave = np.concatenate([np.zeros(int(spec.pad_start * sr)), speech, np.zeros(int(spec.pad_end * sr))])
    speech_power = np.mean(speech**2)
    noise = synthetic_noise(wave.size, rng) * np.sqrt(speech_power / 10 ** (spec.snr_db / 10))
    wave = np.clip(wave + noise, -0.99, 0.99).astype(np.float32)
    sf.write(os.path.join(audio_dir, spec.id), wave, sr, format="MP3")
    return wave.size / sr


def _is_demo_folder(out: Path) -> bool:
    return (out / MANIFEST).is_file() or (out / _BUILDING).is_file()


def build_demo_corpus(out_dir: str | Path, n_clips: int = 900, seed: int = 0, workers: int | None = None,
                      progress: bool = True) -> dict:
    """Write the demo corpus to ``out_dir`` and return its manifest (also saved as ``demo_manifest.json``).

    ``out_dir`` must be empty, missing, or an earlier demo corpus (which is replaced).
    """
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()) and not _is_demo_folder(out):
        raise EmotuneError(f"{out} is not empty and is not an emotune demo corpus; choose an empty or new folder.")
    if out.exists():
        shutil.rmtree(out)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True)
    (out / _BUILDING).touch()
    start = time.perf_counter()
    specs = plan_corpus(n_clips, seed)
    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    durations: dict[int, float] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = pool.map(render_clip, specs, [str(audio_dir)] * len(specs), [seed] * len(specs), chunksize=16)
        if progress:
            from tqdm.auto import tqdm

            futures = tqdm(futures, total=len(specs), desc="synthesizing demo corpus", unit="clip")
        for duration, spec in zip(futures, specs):  # results first, so the progress bar sees the end
            durations[spec.index] = duration

    def write(name: str, header: list[str], rows) -> None:
        with (out / name).open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    train = [s for s in specs if s.split == "train"]
    test = [s for s in specs if s.split == "test"]
    write("train.csv", ["id", "label", "transcription", "speaker"], [(s.id, s.label, s.text, s.speaker) for s in train])
    write("test.csv", ["id", "transcription"], [(s.id, s.text) for s in test])
    write("test_labels.csv", ["id", "label"], [(s.id, s.label) for s in test])
    manifest = {
        "version": DEMO_VERSION,
        "seed": seed,
        "n_clips": n_clips,
        "sample_rate": OUTPUT_SAMPLE_RATE,
        "seconds_to_build": round(time.perf_counter() - start, 1),
        "counts": {split: dict(Counter(s.label for s in specs if s.split == split)) for split in ("train", "test")},
        "clips": [asdict(s) | {"duration": round(durations[s.index], 3)} for s in specs],
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    (out / _BUILDING).unlink()
    return manifest


def ensure_demo_corpus(out_dir: str | Path, n_clips: int = 900, seed: int = 0, progress: bool = True) -> Path:
    """Build the demo corpus in ``out_dir`` unless a complete one with the same size and seed is there."""
    out = Path(out_dir).expanduser().resolve()
    manifest_path = out / MANIFEST
    if manifest_path.is_file() and not (out / _BUILDING).exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError:
            manifest = {}
        if (manifest.get("version"), manifest.get("seed"), manifest.get("n_clips")) == (DEMO_VERSION, seed, n_clips):
            return out
    build_demo_corpus(out, n_clips=n_clips, seed=seed, progress=progress)
    return out
