"""GPU check: measure on one GPU what emotune's time plan assumes, in one short run.

    python scripts/gpu_check.py --out "$OUT"         # on the GPU machine (about 4 min planned on an H100)
    python scripts/gpu_check.py --dry-run --gpu h100  # what it would run, and its planned time, on any machine
    python scripts/gpu_check.py --cpu-smoke           # the same path at tiny sizes on this CPU (the suite runs it)

What it runs, with emotune's own code:

1. builds the paper's widest encoder pair (XLS-R 300M, XLM-RoBERTa large) and the space's narrowest
   (WavLM Base+, BETO) as offline replicas: full size, random weights, the right shapes
   (emotune/features/replica.py);
2. fills the feature cache for synthetic clips of 3-8 s and Spanish transcripts with the real fill code
   (``encode_jobs``), with the hub defaults (every 3rd speech layer, int8) at the precision the fill loads the
   encoders in; reports clips per second and the TFLOP/s achieved, counted as the plan counts them (2 x parameters
   x frames or tokens);
3. trains the head on those features with the trial's own training step (``emotune.trial.train_step``) and
   evaluation (``emotune.trial.predict``), for the narrowest shape (narrow pair, fewest hidden layers) and the
   widest (wide pair, most hidden layers) of ``space=encoders``, and sets each epoch beside what the plan predicts
   at the measured TFLOP/s (``emotune.search.probe.flop_step_times``);
4. runs one head alone and then four at once on the GPU, as ``search.resources.gpu=0.25`` would, and measures how
   much each slows down: the plan assumes no slowdown at all.

It writes gpu.json and gpu.md into ``--out`` (copy them to benchmarks/), each part as soon as it is measured,
so a run cut short keeps what it measured. It needs only torch, torchaudio, transformers and numpy (with the
tokenizers, safetensors and pyyaml they bring): none of ray, mlflow, optuna, hydra or soundfile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Set before transformers is imported: the replicas are local folders, and nothing may try the hub.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

SAMPLE_RATE = 16_000
# What the dry run assumes of a GPU it has not measured: the plan's own figure for the paper's search
# (docs/plan.md), and a local disk for the replicas' writes and reads.
ASSUMED_TFLOPS, ASSUMED_DISK_GBPS = 100.0, 1.0
# Fixed costs the dry run adds, as measured on this project's 2-core CPU for the smoke and guessed for a GPU
# machine's 16 cores: imports and CUDA start, and a spawned worker's imports and cache load.
START_SECONDS, WORKER_START_SECONDS = 20.0, 15.0
# Random initialisation of a replica's weights on the GPU, per billion parameters (generous).
INIT_SECONDS_PER_BILLION = 5.0
# The fill's host side: hidden states copied back, quantised, CRC-summed and written (on this project's CPU the
# float16/int8 store runs at a few hundred MB/s of stored bytes).
STORE_BYTES_PER_SECOND = 0.2e9
GPUS = {"h100": "NVIDIA H100 (80 GB)", "h200": "NVIDIA H200 (141 GB)"}
WORKER_SLOWDOWN_THE_PLAN_ASSUMES = 1.0  # emotune/search/plan.py gives each fractional-GPU trial the whole device


@dataclass
class Sizes:
    """How big one run of the check is."""

    mode: str                                   # "gpu" or "cpu-smoke"
    clips: int
    seconds: tuple[float, float]                # clip lengths, uniform
    overrides: dict = field(default_factory=dict)  # architecture name -> config changes (the smoke shrinks them)
    epochs: int = 3                             # the first one warms up; the rest are timed
    workers: int = 4                            # heads sharing the device at once (gpu=0.25)
    worker_clips: int = 128                     # training clips each sharing worker loads
    worker_steps: int = 40                      # timed steps per worker


PAIRS = {"narrowest": ("wavlm-base-plus", "beto"), "widest": ("xlsr", "roberta-es")}
_TINY_SPEECH = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
                "conv_dim": [16] * 7, "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2}
_TINY_TEXT = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64,
              "vocab_size": 4000}
FULL = Sizes("gpu", clips=500, seconds=(3.0, 8.0))
SMOKE = Sizes("cpu-smoke", clips=24, seconds=(1.0, 2.0),
              overrides={"xlsr": _TINY_SPEECH, "wavlm-base-plus": {**_TINY_SPEECH, "num_buckets": 16},
                         "roberta-es": _TINY_TEXT, "beto": _TINY_TEXT},
              epochs=2, workers=4, worker_clips=8, worker_steps=3)


def log(*parts) -> None:
    print(*parts, flush=True)


# ---------------------------------------------------------------------------------------------------- settings


def _yaml(relative: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / relative).read_text()) or {}


def _plain(value, key: str):
    if isinstance(value, str) and "${" in value:
        raise SystemExit(f"gpu_check reads {key} from emotune's YAML without Hydra, and it is an interpolation "
                         f"({value}): give gpu_check its value")
    return value


def search_settings() -> dict:
    """The settings of ``space=encoders encoders=hub`` that the check needs, read from emotune's own YAML files
    without Hydra (the GPU machine has none): the trial's, the head's, the cache's and the space's depth range."""
    trial = _yaml("emotune/conf/trial/default.yaml") | _yaml("emotune/conf/encoders/hub.yaml").get("trial", {})
    features = _yaml("emotune/conf/features/cached.yaml") | _yaml("emotune/conf/encoders/hub.yaml")["features"]
    model = _yaml("emotune/conf/model/attention.yaml")
    depth = _yaml("search_spaces/space/encoders.yaml")["space"]["params"]["model.hidden_layers"]["int"]
    keys = {"batch_size": trial, "eval_batch_size": trial, "crop_seconds": trial, "lr": trial, "weight_decay": trial,
            "class_weights": trial}
    out = {k: _plain(source[k], f"trial.{k}") for k, source in keys.items()}
    out["features"] = {k: _plain(features[k], f"features.{k}") for k in
                       ("speech_layers", "text_layers", "storage", "batch_size", "max_text_tokens", "plan_tflops")}
    out["model"] = {k: _plain(model[k], f"model.{k}") for k in ("family", "width", "dropout")}
    out["model"]["fused_dim"] = None  # both pairs have equal widths (encoders.fused_dim: null in encoders=hub)
    out["hidden_layers"] = (int(depth[0]), int(depth[1]))
    return out


# ------------------------------------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    id: str
    audio: str
    text: str
    label: str
    n_samples: int


def synthetic_wave(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A voiced-sounding waveform: a gliding harmonic tone with syllable-rate loudness and a little noise."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    pitch = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    tone = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) ** 2
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def make_clips(folder: Path, sizes: Sizes, seed: int = 0) -> list[Clip]:
    """``sizes.clips`` WAV files (16-bit PCM, written without soundfile) with demo-style Spanish transcripts."""
    from emotune.data.audio import write_pcm16_wav
    from emotune.data.demo import CUES, emotional_sentence, neutral_sentence

    rng = np.random.default_rng(seed)
    labels = ["neutral", *CUES]
    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for i in range(sizes.clips):
        label = labels[i % len(labels)]
        wave = synthetic_wave(rng, rng.uniform(*sizes.seconds))
        path = folder / f"clip-{i:04d}.wav"
        if not path.is_file():
            write_pcm16_wav(path, wave)
        text = neutral_sentence(rng) if label == "neutral" else emotional_sentence(label, rng)
        clips.append(Clip(f"clip-{i:04d}", str(path), text, label, int(wave.size)))
    return clips


# ------------------------------------------------------------------------------------------------------ device


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def describe_device(device) -> dict:
    import torch

    info = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpus": os.cpu_count(), "date": datetime.date.today().isoformat()}
    import transformers

    info["transformers"] = transformers.__version__
    if str(device).startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gb": round(props.total_memory / 1e9, 1),
                 "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    else:
        info["gpu"] = None
    return info


# -------------------------------------------------------------------------------------------------------- fill


def build_replicas(work: Path, sizes: Sizes, texts: list[str], device) -> dict:
    """Every encoder of both pairs, built (or found) in ``work``; the seconds each build took."""
    from emotune.features.replica import build_replica

    folders, seconds = {}, {}
    for pair in PAIRS.values():
        for name in pair:
            started = time.perf_counter()
            text = name in (PAIRS["narrowest"][1], PAIRS["widest"][1])
            folders[name] = build_replica(name, work / "replicas" / name, texts if text else None,
                                          overrides=sizes.overrides.get(name), device=str(device))
            seconds[name] = time.perf_counter() - started
            log(f"replica {name}: ready in {seconds[name]:.1f} s")
    return {"folders": folders, "seconds": seconds}


def encoder_recipe(name: str, folder: Path, modality: str, settings: dict):
    from emotune.features.catalog import resolve_encoder
    from emotune.features.recipe import make_recipe

    features = settings["features"]
    layers = features["speech_layers"] if modality == "speech" else features["text_layers"]
    return make_recipe(resolve_encoder(str(folder), modality), folder, layers, batch_size=features["batch_size"],
                       max_tokens=features["max_text_tokens"],
                       storage=features["storage"] if modality == "speech" else "float16")


def fill_one(recipe, clips: list[Clip], store, norm, device, parameters: int) -> dict:
    """Encode every clip (or transcript) with the real fill code; what it took and what the plan would say."""
    import torch

    from emotune.features.cache import SpeechJob, TextJob, encode_jobs
    from emotune.features.encode import open_encoder

    speech = recipe.modality == "speech"
    jobs = [SpeechJob(f"{recipe.key}-{c.id}", c.audio, 0, 0, c.n_samples) if speech
            else TextJob(f"{recipe.key}-{c.id}", c.text) for c in clips]
    started = time.perf_counter()
    encoder = open_encoder(recipe, str(device))
    load_seconds = time.perf_counter() - started
    encode_jobs(encoder, jobs[:2], store, norm)  # warm-up: kernels chosen, memory pools grown
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    started = time.perf_counter()
    _, written = encode_jobs(encoder, jobs, store, norm)
    sync(device)
    seconds = time.perf_counter() - started
    steps = sum(store.frames(job.key) for job in jobs)
    flops = 2.0 * parameters * steps  # as emotune/features/plan.py counts an encoder's work
    out = {"encoder": recipe.spec.name if not Path(recipe.spec.name).is_absolute() else Path(recipe.spec.name).name,
           "modality": recipe.modality, "parameters": parameters, "dtype": str(next(encoder.model.parameters()).dtype)
           if hasattr(encoder, "model") else "float32", "layers_stored": len(recipe.layers), "storage": recipe.storage,
           "items": len(jobs), "steps": steps, "seconds": seconds, "load_seconds": load_seconds,
           "items_per_second": len(jobs) / seconds, "tflops": flops / seconds / 1e12, "bytes_written": written,
           "one_at_a_time": recipe.one_at_a_time}
    if speech:
        out["audio_seconds_per_second"] = sum(c.n_samples for c in clips) / SAMPLE_RATE / seconds
    if str(device).startswith("cuda"):
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    del encoder
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def fill_cache(work: Path, clips: list[Clip], replicas: dict, settings: dict, device) -> dict:
    """The fill of every encoder; returns the figures and, per pair, the feature index the heads train on."""
    from emotune.data.audio import AudioInfo, NormStats, load_audio
    from emotune.features.cache import FeatureIndex, FeatureStore
    from emotune.features.replica import replica_parameters

    store = FeatureStore(work / "cache")
    norm = NormStats.from_infos(AudioInfo.of(load_audio(c.audio)) for c in clips)
    figures, indexes = {}, {}
    for pair_name, pair in PAIRS.items():
        index = FeatureIndex(cache_dir=str(store.root))
        for name, modality in zip(pair, ("speech", "text")):
            folder = replicas["folders"][name]
            recipe = encoder_recipe(name, folder, modality, settings)
            figures[name] = fill_one(recipe, clips, store, norm, device, replica_parameters(folder))
            figures[name]["encoder"] = name
            log(f"fill {name}: {figures[name]['items_per_second']:.1f} {modality} items/s, "
                f"{figures[name]['tflops']:.2f} TFLOP/s as the plan counts")
            index.encoders[modality] = recipe.describe()
            for c in clips:
                if modality == "speech":
                    index.speech[c.id] = [f"{recipe.key}-{c.id}"]
                else:
                    index.text[c.id] = f"{recipe.key}-{c.id}"
        indexes[pair_name] = index
    return {"figures": figures, "indexes": indexes}


# ------------------------------------------------------------------------------------------------------- heads


def utterances(clips: list[Clip]):
    from emotune.data.corpus import Utterance

    return [Utterance(c.id, Path(c.audio), c.text, c.label, "gpu-check", i) for i, c in enumerate(clips)]


def split(clips: list[Clip]) -> tuple[list, list]:
    """Train and dev: every fifth clip is dev, as a 20% dev split."""
    rows = utterances(clips)
    return [u for i, u in enumerate(rows) if i % 5], [u for i, u in enumerate(rows) if not i % 5]


def head(index, settings: dict, hidden_layers: int, labels: list[str], train, device):
    """The model, loss and optimiser a trial builds for this shape."""
    import torch

    from emotune.model import build_model
    from emotune.trial import class_weights

    dims = {m: (e["layers"], e["width"]) for m, e in index.encoders.items()}
    norms = {m: e["norm"] for m, e in index.encoders.items()}
    model_cfg = {**settings["model"], "hidden_layers": hidden_layers}
    model = build_model(model_cfg, dims, len(labels), norms).to(device)
    weights = class_weights(train, labels, settings["class_weights"])
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device) if weights is not None else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    return model, loss_fn, optimizer, model_cfg, dims


def train_epochs(index, settings: dict, hidden_layers: int, clips: list[Clip], sizes: Sizes, device) -> dict:
    """Epochs of the real training step and dev evaluation on the cached features; seconds of each."""
    from emotune.features.source import CachedFeatures
    from emotune.trial import predict, seed_everything, train_step

    seed_everything(0)
    labels = sorted({c.label for c in clips})
    train, dev = split(clips)
    source = CachedFeatures(index, ("speech", "text"), labels, 0.0, settings["crop_seconds"])
    model, loss_fn, optimizer, model_cfg, dims = head(index, settings, hidden_layers, labels, train, device)
    lengths = {c.id: c.n_samples for c in clips}
    rng = np.random.default_rng(0)
    batch = settings["batch_size"]
    epochs = []
    for _ in range(sizes.epochs):
        model.train()
        order = rng.permutation(len(train))
        sync(device)
        started = time.perf_counter()
        for start in range(0, len(order), batch):
            train_step([model], [loss_fn], optimizer, source, [[train[i] for i in order[start:start + batch]]],
                       rng, device)
        sync(device)
        trained = time.perf_counter()
        predict(model, source, dev, lengths, settings["eval_batch_size"], device)
        epochs.append({"train_seconds": trained - started, "eval_seconds": time.perf_counter() - trained})
    timed = epochs[1:] or epochs  # the first epoch warms up
    return {"hidden_layers": hidden_layers, "model": model_cfg, "dims": dims, "train_clips": len(train),
            "dev_clips": len(dev), "epochs": epochs,
            "train_seconds": float(np.median([e["train_seconds"] for e in timed])),
            "eval_seconds": float(np.median([e["eval_seconds"] for e in timed])),
            "head_parameters": sum(p.numel() for p in model.parameters())}


def probe_shape(label: str, run: dict, index, clips: list[Clip], settings: dict):
    """The plan's description of this shape (emotune/search/probe.py), from the clips actually used."""
    from emotune.features.cache import FeatureStore
    from emotune.search.probe import Shape

    store = FeatureStore(index.cache_dir)
    frames = {"speech": [store.frames(index.speech[c.id][0]) for c in clips],
              "text": [store.frames(index.text[c.id]) for c in clips]}
    crop = max(1, int(round(settings["crop_seconds"] * index.encoders["speech"]["frame_rate"])))
    train_steps = {"speech": float(crop), "text": float(np.mean(frames["text"]))}  # shorter clips are repeated
    per_step = {m: e["layers"] * e["width"] * (1 if e["storage"] == "int8" else 2) for m, e in index.encoders.items()}
    return Shape(label, run["model"], run["dims"], train_steps, {m: float(np.mean(v)) for m, v in frames.items()},
                 per_step)


def planned_epoch(shape, run: dict, settings: dict, tflops: float, n_classes: int) -> dict:
    """The plan's epoch for this shape at ``tflops``: its training steps and dev batches (bookkeeping left out:
    the check runs none of it)."""
    from emotune.search.plan import HOST_TO_DEVICE_BYTES_PER_SECOND
    from emotune.search.probe import count_step_flops, flop_step_times

    batch, eval_batch = settings["batch_size"], settings["eval_batch_size"]
    times = flop_step_times(shape, batch, eval_batch, n_classes, tflops, HOST_TO_DEVICE_BYTES_PER_SECOND)
    train_flops, eval_flops = count_step_flops(shape, batch, eval_batch, n_classes)
    train_batches = math.ceil(run["train_clips"] / batch)
    dev_batches = math.ceil(run["dev_clips"] / eval_batch)
    return {"tflops": tflops, "train_seconds": train_batches * times.train,
            "eval_seconds": dev_batches * times.evaluate, "train_step_flops": train_flops,
            "eval_batch_flops": eval_flops, "train_batches": train_batches, "dev_batches": dev_batches}


def heads_on_device(fill: dict, clips: list[Clip], settings: dict, sizes: Sizes, device, tflops: float) -> dict:
    low, high = settings["hidden_layers"]
    out = {}
    for label, depth in (("narrowest", low), ("widest", high)):
        index = fill["indexes"][label]
        run = train_epochs(index, settings, depth, clips, sizes, device)
        shape = probe_shape(f"{' + '.join(PAIRS[label])}, {depth} hidden", run, index, clips, settings)
        plan = planned_epoch(shape, run, settings, tflops, len({c.label for c in clips}))
        measured = run["train_seconds"] + run["eval_seconds"]
        planned = plan["train_seconds"] + plan["eval_seconds"]
        achieved = plan["train_step_flops"] * plan["train_batches"] / run["train_seconds"] / 1e12
        out[label] = {"shape": shape.label, **run, "planned": plan, "epoch_seconds": measured,
                      "planned_epoch_seconds": planned, "measured_over_planned": measured / planned,
                      "head_tflops": achieved}
        log(f"head {label} ({shape.label}): epoch {measured:.2f} s measured, {planned:.2f} s planned at "
            f"{tflops:.1f} TFLOP/s (x{measured / planned:.2f}); the step achieves {achieved:.3f} TFLOP/s")
    return out


# -------------------------------------------------------------------------------------------------- concurrency


def _sharing_worker(job: dict, ready, start, results) -> None:
    """One head of the widest shape training alone in its process, as one fractional-GPU trial would."""
    import torch

    from emotune.features.cache import FeatureIndex
    from emotune.features.source import CachedFeatures
    from emotune.trial import seed_everything, train_step

    seed_everything(job["seed"])
    if job["device"] == "cpu":
        torch.set_num_threads(1)  # the smoke's workers share two cores
    settings, clips = job["settings"], [Clip(**c) for c in job["clips"]]
    index = FeatureIndex(**job["index"])
    labels = sorted({c.label for c in clips})
    train = utterances(clips)
    device = torch.device(job["device"])
    source = CachedFeatures(index, ("speech", "text"), labels, 0.0, settings["crop_seconds"])
    model, loss_fn, optimizer, _, _ = head(index, settings, job["hidden_layers"], labels, train, device)
    rng = np.random.default_rng(job["seed"])
    batch = settings["batch_size"]

    def step() -> None:
        picked = [train[i] for i in rng.integers(len(train), size=batch)]
        train_step([model], [loss_fn], optimizer, source, [picked], rng, device)

    model.train()
    for _ in range(3):  # warm-up
        step()
    sync(device)
    ready.put(job["seed"])
    start.wait()
    started = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    sync(device)
    results.put((job["seed"], (time.perf_counter() - started) / job["steps"]))


def run_sharing(workers: int, fill: dict, clips: list[Clip], settings: dict, sizes: Sizes, device) -> list[float]:
    """Seconds per training step of each of ``workers`` processes that step at the same time."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ready, results, start = context.Queue(), context.Queue(), context.Event()
    train, _ = split(clips)
    picked = [c for c in clips if c.id in {u.id for u in train}][: sizes.worker_clips]
    index = fill["indexes"]["widest"]
    subset = {"cache_dir": index.cache_dir, "encoders": index.encoders,
              "speech": {c.id: index.speech[c.id] for c in picked}, "text": {c.id: index.text[c.id] for c in picked}}
    jobs = [{"seed": i, "settings": settings, "clips": [asdict(c) for c in picked], "index": subset,
             "device": str(device), "hidden_layers": settings["hidden_layers"][1], "steps": sizes.worker_steps}
            for i in range(workers)]
    processes = [context.Process(target=_sharing_worker, args=(job, ready, start, results)) for job in jobs]
    for p in processes:
        p.start()
    for _ in processes:
        ready.get(timeout=300)
    start.set()
    seconds = [results.get(timeout=300)[1] for _ in processes]
    for p in processes:
        p.join(timeout=60)
    return seconds


def sharing(fill: dict, clips: list[Clip], settings: dict, sizes: Sizes, device) -> dict:
    alone = run_sharing(1, fill, clips, settings, sizes, device)[0]
    together = run_sharing(sizes.workers, fill, clips, settings, sizes, device)
    slowdown = float(np.mean(together)) / alone
    out = {"workers": sizes.workers, "as": f"search.resources.gpu={1 / sizes.workers:g}",
           "step_seconds_alone": alone, "step_seconds_together": together, "slowdown": slowdown,
           "throughput_gain": sizes.workers / slowdown, "plan_assumes_slowdown": WORKER_SLOWDOWN_THE_PLAN_ASSUMES,
           "holds_the_plan": slowdown <= 1.1 * WORKER_SLOWDOWN_THE_PLAN_ASSUMES}
    log(f"sharing: one head {alone * 1e3:.1f} ms per step alone, {np.mean(together) * 1e3:.1f} ms with "
        f"{sizes.workers} at once (x{slowdown:.2f}; the plan assumes x1.00): {sizes.workers / slowdown:.2f}x the "
        "throughput of one")
    return out


# ------------------------------------------------------------------------------------------------------- report


def fill_rows(figures: dict, plan_tflops: float) -> list[str]:
    rows = ["| encoder | parameters | items | items/s | audio s per s | TFLOP/s achieved | planned s at "
            f"{plan_tflops:g} TFLOP/s (features.plan_tflops) | at {ASSUMED_TFLOPS:g} | measured s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, f in figures.items():
        flops = f["tflops"] * f["seconds"] * 1e12
        audio = f"{f['audio_seconds_per_second']:.0f}" if "audio_seconds_per_second" in f else "-"
        rows.append(f"| {name}{' (one clip at a time: group-norm front end)' if f['one_at_a_time'] else ''} | "
                    f"{f['parameters'] / 1e6:.1f} M | {f['items']} | {f['items_per_second']:.1f} | {audio} | "
                    f"{f['tflops']:.2f} | {flops / plan_tflops / 1e12:.1f} | {flops / ASSUMED_TFLOPS / 1e12:.1f} | "
                    f"{f['seconds']:.1f} |")
    return rows


def markdown(data: dict) -> list[str]:
    env = data["environment"]
    where = env.get("gpu") or f"CPU ({env['cpus']} cores)"
    lines = [f"# GPU check: {data['sizes']['mode']} on {where}, {env['date']}", "",
             f"`{data['command']}`: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}."
             f" {data['sizes']['clips']} synthetic clips of {data['sizes']['seconds'][0]:g}-"
             f"{data['sizes']['seconds'][1]:g} s. Every figure below was measured by this run, unless it says "
             "planned.", ""]
    if data["sizes"]["mode"] == "cpu-smoke":
        lines += ["**A CPU smoke run at tiny sizes: it checks the path, and its figures say nothing about a GPU.**", ""]
    if "fill" in data:
        lines += ["## The cache fill (encode_jobs, hub defaults: every 3rd speech layer, int8)", "",
                  *fill_rows(data["fill"], data["settings"]["features"]["plan_tflops"]), "",
                  "TFLOP/s are counted as the plan counts them: 2 x parameters x frames (or tokens).", ""]
    if "heads" in data:
        lines += ["## The head's epoch (trial.train_step and trial.predict on the cached features)", "",
                  f"Planned at the fill's measured {data['plan_device_tflops']:.2f} TFLOP/s (the widest speech "
                  "encoder's), as `emotune plan --device-tflops` would plan it.", "",
                  "| shape | train clips | dev clips | epoch measured | epoch planned | measured / planned | "
                  "the step's TFLOP/s |", "|---|---|---|---|---|---|---|"]
        for h in data["heads"].values():
            lines.append(f"| {h['shape']} | {h['train_clips']} | {h['dev_clips']} | {h['epoch_seconds']:.2f} s | "
                         f"{h['planned_epoch_seconds']:.2f} s | {h['measured_over_planned']:.2f} | "
                         f"{h['head_tflops']:.3f} |")
        lines.append("")
    if "sharing" in data:
        s = data["sharing"]
        lines += ["## Heads sharing one device", "",
                  f"{s['workers']} processes training the widest head at once ({s['as']}): "
                  f"{np.mean(s['step_seconds_together']) * 1e3:.1f} ms per step against "
                  f"{s['step_seconds_alone'] * 1e3:.1f} ms alone, a slowdown of x{s['slowdown']:.2f}; together they "
                  f"do {s['throughput_gain']:.2f}x the work of one. The plan assumes no slowdown (x1.00): "
                  f"{'that holds (within 10%)' if s['holds_the_plan'] else 'that does not hold'}.", ""]
    lines += [f"Whole run: {data.get('seconds', 0):.0f} s. Plan with these figures: "
              "`emotune plan ... --device-tflops benchmarks/gpu.json`."]
    return lines


def save(out: Path, data: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text("\n".join(markdown(data)) + "\n")


# ---------------------------------------------------------------------------------------------------- dry run


def _stored_layers(config: dict, settings: dict, modality: str) -> int:
    from emotune.features.recipe import resolve_layers

    chosen = settings["features"]["speech_layers" if modality == "speech" else "text_layers"]
    return len(resolve_layers(chosen, config["num_hidden_layers"]))


def planned_shape(label: str, pair: tuple[str, str], depth: int, settings: dict):
    """The plan's description of a shape from the catalog's architectures alone (nothing built)."""
    from emotune.features.replica import architecture
    from emotune.search.probe import Shape

    dims = {}
    for name, modality in zip(pair, ("speech", "text")):
        _, config = architecture(name)
        dims[modality] = (_stored_layers(config, settings, modality), config["hidden_size"])
    mean_frames = 50.0 * sum(FULL.seconds) / 2
    tokens = 32.0  # a demo transcript's tokens, about
    per_step = {"speech": dims["speech"][0] * dims["speech"][1], "text": dims["text"][0] * dims["text"][1] * 2}
    return Shape(label, {**settings["model"], "hidden_layers": depth}, dims,
                 {"speech": 50.0 * settings["crop_seconds"], "text": tokens},
                 {"speech": mean_frames, "text": tokens}, per_step)


def dry_run(gpu: str, settings: dict) -> float:
    """Print what the check would run on ``gpu`` and its planned time; returns the planned seconds."""
    from emotune.features.replica import architecture
    from emotune.search.probe import count_step_flops

    sizes, lines, total = FULL, [], START_SECONDS
    train_clips, dev_clips = sizes.clips - sizes.clips // 5, sizes.clips // 5
    audio = sizes.clips * sum(sizes.seconds) / 2
    lines.append(f"start: imports, CUDA, {sizes.clips} synthetic clips of {sizes.seconds[0]:g}-{sizes.seconds[1]:g} "
                 f"s ({audio / 60:.0f} min of audio): {START_SECONDS:.0f} s allowed")
    for pair in PAIRS.values():
        for name, modality in zip(pair, ("speech", "text")):
            _, config = architecture(name)
            params = _parameters(name)
            gb = params * 4 / 1e9
            build = params / 1e9 * INIT_SECONDS_PER_BILLION + 3 * gb / ASSUMED_DISK_GBPS  # write, hash, read back
            steps = audio * 50 if modality == "speech" else sizes.clips * 32
            stored = steps * _stored_layers(config, settings, modality) * config["hidden_size"] * (
                1 if modality == "speech" and settings["features"]["storage"] == "int8" else 2)
            encode = 2 * params * steps / (ASSUMED_TFLOPS * 1e12) + stored / STORE_BYTES_PER_SECOND
            total += build + encode
            lines.append(f"{name}: build the replica ({params / 1e6:.0f} M parameters, {gb:.1f} GB float32) "
                         f"{build:.0f} s; encode {sizes.clips} {'clips' if modality == 'speech' else 'transcripts'} "
                         f"and store {stored / 1e9:.2f} GB: {encode:.1f} s")
    low, high = settings["hidden_layers"]
    for label, depth in (("narrowest", low), ("widest", high)):
        shape = planned_shape(label, PAIRS[label], depth, settings)
        train, evaluate = count_step_flops(shape, settings["batch_size"], settings["eval_batch_size"], 6)
        epoch = (math.ceil(train_clips / settings["batch_size"]) * train
                 + math.ceil(dev_clips / settings["eval_batch_size"]) * evaluate) / (ASSUMED_TFLOPS * 1e12)
        epoch = max(epoch, 0.5)  # a small head is bound by its batches' assembly and launches, not FLOPs
        total += sizes.epochs * epoch + 10  # the cache's load into memory
        lines.append(f"head {label} ({' + '.join(PAIRS[label])}, {depth} hidden): {sizes.epochs} epochs of "
                     f"{train_clips} clips, about {epoch:.1f} s each, plus 10 s to load its cache")
    sharing = 2 * WORKER_START_SECONDS + (1 + sizes.workers) * sizes.worker_steps * 0.05
    total += sharing
    lines.append(f"sharing: one head alone, then {sizes.workers} at once ({sizes.worker_steps} timed steps each, "
                 f"spawned processes): {sharing:.0f} s")
    log(f"gpu_check on {GPUS[gpu]} (dry run: nothing is built or measured)")
    for line in lines:
        log(f"  {line}")
    log(f"planned: {total / 60:.1f} min in all (encoders' FLOPs at an assumed {ASSUMED_TFLOPS:g} TFLOP/s, the "
        f"store at {STORE_BYTES_PER_SECOND / 1e9:g} GB/s, disk at {ASSUMED_DISK_GBPS:g} GB/s, the stated "
        "allowances); the device allows 10 min per command")
    return total


def _parameters(name: str) -> int:
    import torch
    import transformers

    from emotune.features.replica import FAMILIES, architecture

    family, config = architecture(name)
    config_name, model_name, _ = FAMILIES[family]
    with torch.device("meta"):
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------------- main


def measure(args, sizes: Sizes, settings: dict, device) -> dict:
    started = time.perf_counter()
    data = {"command": "python scripts/gpu_check.py " + " ".join(sys.argv[1:]), "sizes": asdict(sizes),
            "settings": settings, "environment": describe_device(device)}
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    clips = make_clips(work / "clips", sizes)
    replicas = build_replicas(work, sizes, [c.text for c in clips], device)
    data["replica_seconds"] = replicas["seconds"]
    fill = fill_cache(work, clips, replicas, settings, device)
    data["fill"] = fill["figures"]
    data["plan_device_tflops"] = fill["figures"][PAIRS["widest"][0]]["tflops"]
    data["seconds"] = time.perf_counter() - started
    save(out, data)
    data["heads"] = heads_on_device(fill, clips, settings, sizes, device, data["plan_device_tflops"])
    data["seconds"] = time.perf_counter() - started
    save(out, data)
    data["sharing"] = sharing(fill, clips, settings, sizes, device)
    data["seconds"] = time.perf_counter() - started
    save(out, data)
    log(f"\nwritten: {out / 'gpu.json'} and {out / 'gpu.md'} ({data['seconds']:.0f} s)")
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cpu-smoke", action="store_true", help="the same path at tiny sizes on this CPU")
    parser.add_argument("--dry-run", action="store_true", help="print what would run and its planned time")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="the GPU the dry run plans for")
    parser.add_argument("--out", help="where gpu.json and gpu.md go (default: benchmarks/ on a GPU, "
                        "runs/gpu-check-smoke/ for --cpu-smoke, so a smoke never replaces GPU figures)")
    parser.add_argument("--work", help="where replicas, clips and the cache go (default: runs/gpu-check[-smoke])")
    args = parser.parse_args(argv)
    settings = search_settings()
    if args.dry_run:
        dry_run(args.gpu, settings)
        return 0
    import torch

    sizes = SMOKE if args.cpu_smoke else FULL
    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run it on a GPU machine, or try --cpu-smoke (tiny sizes on this CPU) or "
                     "--dry-run")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    suffix = "-smoke" if args.cpu_smoke else ""
    args.out = args.out or str(ROOT / ("runs/gpu-check-smoke" if args.cpu_smoke else "benchmarks"))
    args.work = args.work or str(ROOT / f"runs/gpu-check{suffix}")
    if args.cpu_smoke:
        torch.set_num_threads(1)  # several processes share two cores in the sharing part
    measure(args, sizes, settings, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
