"""Benchmark: the paper's real setting (XLS-R 300M + XLM-RoBERTa large) as far as a 2-core CPU allows.

Nothing is downloaded: the two encoders are random-initialised replicas built from the catalog's exact
architectures (emotune.features.catalog.ARCHITECTURES), so every shape-driven cost is the real one while
the weights are not. Five parts, each runnable alone (``--parts``):

- plan: the cache the paper's 4 x 4 encoder search needs on a MEACorpus-size corpus, from ``emotune plan``
  (the real CLI), with the hub defaults (every 3rd speech layer, int8) and with all layers in float16;
- speed: encoding seconds per clip / per second of audio / per transcript on this CPU, and the effective
  TFLOP/s they imply (to compare with the plan's ``features.plan_tflops``);
- bytes: cache bytes per second of audio for XLS-R, all 24 layers float16 vs the hub default, and the
  int8 rounding error;
- predict: peak RSS of ``emotune predict`` on 50 and 500 demo clips, chunked and unchunked, with a
  one-member ensemble on the XLS-R replica (all 24 layers, float16), each run in its own child process;
- f1: the dev macro-F1 cost of the hub default (every_3 + int8) against all layers in float16, paired
  seeds, on a 24-layer tiny wav2vec2 preset (speech only).

    python scripts/bench_scale.py                                   # everything (about 40 minutes on 2 cores)
    python scripts/bench_scale.py --crop-seconds 2                  # as benchmarks/scale.md was made
    python scripts/bench_scale.py --parts speed,bytes --clips 4     # a quick look at one part or two
    python scripts/bench_scale.py --parts predict --predict-clips 5,10
    python scripts/bench_scale.py --parts f1 --seeds 1 --epochs 3
    python scripts/bench_scale.py --parts none                      # rewrite scale.md from scale.json

Writes benchmarks/scale.json and benchmarks/scale.md; a partial run keeps the other parts' figures from
the existing scale.json. The replicas (1.3 GB and 2.2 GB) stay in runs/bench-scale/replicas for reruns.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Set before transformers is imported: the replicas are local folders, and nothing may try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np

from _bench import BENCH_DIR, ROOT, RUNS_DIR, mean_sd, write

PARTS = ("plan", "speed", "bytes", "predict", "f1")
WORK_DIR = RUNS_DIR / "bench-scale"
REPLICA_DIR = WORK_DIR / "replicas"
SAMPLE_RATE = 16_000
# The paper's search on MEACorpus, as the plan command describes it (README, emotune plan --help).
PAPER_CLIPS, PAPER_HOURS = 5129, 13.16
GB = 1e9
# Two-sided 95% quantiles of Student's t by degrees of freedom (beyond 10, 1.96 + 2.4 / df is within 0.03).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def log(*parts) -> None:
    print(*parts, flush=True)


# ------------------------------------------------------------------------------------------------ set-up


def load_corpus():
    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus

    return prepare_corpus(load_config([f"paths.runs_dir={RUNS_DIR}"])["data"], RUNS_DIR, progress=False)


def demo_utterances(corpus, n: int) -> list:
    """The first ``n`` clips of the corpus, in a fixed order (train, dev, test), so every run sees the same ones."""
    everything = list(corpus.train) + list(corpus.dev) + list(corpus.test)
    if n > len(everything):
        raise SystemExit(f"asked for {n} demo clips but the demo corpus has {len(everything)}")
    return everything[:n]


def build_replica(name: str, texts: list[str] | None = None, seed: int = 0) -> Path:
    """A random-initialised, seeded copy of the catalog architecture ``name`` (emotune/features/replica.py)."""
    from emotune.features.replica import build_replica as build

    log(f"building (or finding) the {name} replica in {REPLICA_DIR / name} ...")
    start = time.perf_counter()
    folder = build(name, REPLICA_DIR / name, texts, seed)
    log(f"  ready in {time.perf_counter() - start:.0f} s")
    return folder


def speech_recipe(folder: Path, layers="all", storage: str = "float16"):
    from emotune.features.catalog import resolve_encoder
    from emotune.features.recipe import make_recipe

    return make_recipe(resolve_encoder(str(folder), "speech"), folder, layers, storage=storage)


def load_waves(corpus, utterances) -> list[np.ndarray]:
    """Waveforms as the cache and predict feed them: 16 kHz, corpus-wide normalisation applied."""
    from emotune.data.audio import load_audio

    return [corpus.norm.apply(load_audio(u.audio)) for u in utterances]


def int8_relative_error(arrays, kept: list[int]) -> dict:
    """||int8 - float16|| / ||float16|| over the kept layers of every array, as the cache stores them."""
    from emotune.features.cache import as_stored

    num = den = 0.0
    nonfinite = 0
    worst = 0.0
    for array in arrays:
        x = np.asarray(array)[kept]
        f16, q8 = as_stored(x, "float16"), as_stored(x, "int8")
        nonfinite += int((~np.isfinite(f16)).sum())
        err, ref = float(((q8 - f16) ** 2).sum()), float((f16 ** 2).sum())
        num, den = num + err, den + ref
        worst = max(worst, math.sqrt(err / ref) if ref > 0 else 0.0)
    return {"relative_error": math.sqrt(num / den) if den > 0 else float("nan"), "worst_clip": worst,
            "float16_nonfinite_values": nonfinite}


def layer_spread(arrays) -> float:
    """How far the last layer is from the first once each frame is standardised (as the model's LayerNorm does).

    Near 0 means the layers are near-copies, so no layer subset can change much what the model sees.
    """
    def standardise(a):
        return (a - a.mean(-1, keepdims=True)) / (a.std(-1, keepdims=True) + 1e-5)

    num = den = 0.0
    for array in arrays:
        first, last = standardise(np.asarray(array[0], np.float64)), standardise(np.asarray(array[-1], np.float64))
        num, den = num + float(((last - first) ** 2).sum()), den + float((first ** 2).sum())
    return math.sqrt(num / den)


def params_of(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------- parts


def run_plan() -> dict:
    """The plan of the paper's search, from the real CLI, with the hub defaults and with all layers float16."""
    exe = Path(sys.executable).with_name("emotune")
    command = [str(exe) if exe.is_file() else "emotune", "plan", "space=encoders", "encoders=hub", "trial.folds=1"]
    out = {}
    with tempfile.TemporaryDirectory(prefix="emotune-bench-plan-") as tmp:
        for variant, extra in (("hub_default", []),
                               ("all_layers", ["features.speech_layers=all", "features.storage=float16"])):
            path = Path(tmp) / f"{variant}.json"
            args = [*command, *extra, "--clips", str(PAPER_CLIPS), "--hours", str(PAPER_HOURS), "--json", str(path)]
            # from the project folder, so the plan sees the project's runs/ (its cache and free disk), as a user would
            done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
            shown = " ".join(["emotune", *args[1:-2]])
            log(f"$ {shown}\n{done.stdout.rstrip()}")
            if not path.is_file():
                raise SystemExit(f"`{shown}` wrote no plan (exit {done.returncode}):\n{done.stderr}")
            plan = json.loads(path.read_text())
            out[variant] = {"command": shown, "total_gb": plan["total_gb"], "tflops": plan["tflops"],
                            "table": done.stdout.rstrip(),
                            "encoders": [{k: e[k] for k in ("modality", "name", "layers", "width", "params_m",
                                                            "storage", "total_bytes", "seconds")}
                                         for e in plan["encoders"]]}
    return out


def run_speed(args, corpus, folders: dict, state: dict) -> dict:
    """Seconds per clip and per transcript on this CPU, after one warm-up input, and the implied TFLOP/s."""
    import torch

    from emotune.features.catalog import resolve_encoder
    from emotune.features.encode import open_encoder
    from emotune.features.recipe import make_recipe

    torch.set_num_threads(args.threads)
    utts = demo_utterances(corpus, args.clips)
    waves = load_waves(corpus, utts)
    audio_seconds = sum(len(w) for w in waves) / SAMPLE_RATE

    recipe = speech_recipe(folders["xlsr"])
    encoder = open_encoder(recipe, "cpu")
    params = params_of(encoder.model)
    encoder.encode(waves[:1])
    start = time.perf_counter()
    outputs = encoder.encode(waves)
    seconds = time.perf_counter() - start
    frames = sum(recipe.steps(len(w)) for w in waves)
    state["xlsr_outputs"], state["xlsr_audio_seconds"] = outputs, audio_seconds  # the bytes part reuses them
    speech = {"encoder": "xlsr replica (wav2vec2, 24 x 1024)", "parameters": params, "clips": len(waves),
              "audio_seconds": audio_seconds, "frames": frames, "seconds": seconds,
              "seconds_per_clip": seconds / len(waves), "seconds_per_audio_second": seconds / audio_seconds,
              "effective_tflops": 2 * params * frames / seconds / 1e12, "batch_size": recipe.batch_size,
              "waveform_norm": recipe.waveform_norm}
    del encoder
    gc.collect()
    log(f"speech: {speech['seconds_per_clip']:.2f} s per clip, {speech['seconds_per_audio_second']:.3f} s per "
        f"second of audio, {speech['effective_tflops']:.3f} TFLOP/s effective")

    spec = resolve_encoder(str(folders["roberta-es"]), "text")
    text_recipe = make_recipe(spec, folders["roberta-es"], "last", max_tokens=256)
    encoder = open_encoder(text_recipe, "cpu")
    params = params_of(encoder.model)
    embeddings = encoder.model.get_input_embeddings().weight.numel()
    texts = [u.text for u in utts]
    tokens = sum(len(ids) for ids in encoder.tokenizer(texts, truncation=True,
                                                       max_length=text_recipe.max_tokens)["input_ids"])
    encoder.encode(texts[:1])
    start = time.perf_counter()
    encoder.encode(texts)
    seconds = time.perf_counter() - start
    text = {"encoder": "roberta-es replica (xlm-roberta, 24 x 1024)", "parameters": params,
            "parameters_without_embeddings": params - embeddings, "transcripts": len(texts), "tokens": tokens,
            "seconds": seconds, "seconds_per_transcript": seconds / len(texts),
            "effective_tflops": 2 * params * tokens / seconds / 1e12,
            "effective_tflops_without_embeddings": 2 * (params - embeddings) * tokens / seconds / 1e12,
            "batch_size": text_recipe.batch_size}
    del encoder
    gc.collect()
    log(f"text: {text['seconds_per_transcript'] * 1e3:.0f} ms per transcript ({tokens / len(texts):.1f} tokens), "
        f"{text['effective_tflops']:.3f} TFLOP/s effective as the plan counts parameters")
    return {"threads": args.threads, "speech": speech, "text": text}


def run_bytes(args, corpus, folders: dict, state: dict) -> dict:
    """Cache bytes per second of audio for XLS-R, all layers float16 against the hub default, and int8's error."""
    from emotune.features.cache import FeatureStore, bytes_per_step
    from emotune.features.encode import open_encoder
    from emotune.features.recipe import resolve_layers

    if "xlsr_outputs" not in state:  # the speed part did not run in this process: encode the same clips here
        import torch

        torch.set_num_threads(args.threads)
        waves = load_waves(corpus, demo_utterances(corpus, args.clips))
        encoder = open_encoder(speech_recipe(folders["xlsr"]), "cpu")
        state["xlsr_outputs"] = encoder.encode(waves)
        state["xlsr_audio_seconds"] = sum(len(w) for w in waves) / SAMPLE_RATE
        del encoder
        gc.collect()
    outputs, audio_seconds = state["xlsr_outputs"], state["xlsr_audio_seconds"]
    n_layers = outputs[0].shape[0]
    kept = resolve_layers("every_3", n_layers)
    variants = {"all_float16": ("all", "float16"), "every3_int8": ("every_3", "int8")}
    out = {"clips": len(outputs), "audio_seconds": audio_seconds, "kept_layers": kept}
    with tempfile.TemporaryDirectory(prefix="emotune-bench-bytes-") as tmp:
        for name, (layers, storage) in variants.items():
            recipe = speech_recipe(folders["xlsr"], layers, storage)
            store = FeatureStore(Path(tmp) / name)
            picked = list(recipe.layers)
            written = sum(store.write(f"{name}-{i:04d}", a[picked], storage) for i, a in enumerate(outputs))
            frames = sum(a.shape[1] for a in outputs)
            out[name] = {"layers": len(picked), "storage": storage, "bytes": written,
                         "mb_per_audio_second": written / audio_seconds / 1e6,
                         "bytes_per_frame_formula": bytes_per_step(recipe),
                         "mb_per_audio_second_formula": bytes_per_step(recipe) * frames / audio_seconds / 1e6}
            log(f"{name}: {out[name]['mb_per_audio_second']:.3f} MB per second of audio")
    out["ratio"] = out["all_float16"]["bytes"] / out["every3_int8"]["bytes"]
    out["int8_vs_float16"] = int8_relative_error(outputs, kept)
    log(f"int8 vs float16 on the kept layers: relative error {out['int8_vs_float16']['relative_error']:.4f}")
    return out


def _crop_files(corpus, utterances, seconds: float) -> list:
    """The clips cut to their first ``seconds`` (shorter ones kept whole), as 16 kHz float WAV files."""
    import soundfile as sf

    from emotune.data.audio import load_audio
    from emotune.data.corpus import Utterance

    folder = WORK_DIR / f"crops-{seconds:g}s"
    folder.mkdir(parents=True, exist_ok=True)
    cropped = []
    for u in utterances:
        path = folder / f"{Path(u.id).stem}.wav"
        if not path.is_file():
            wave = load_audio(u.audio)[: int(seconds * SAMPLE_RATE)]
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            sf.write(str(tmp), wave, SAMPLE_RATE, subtype="FLOAT", format="WAV")
            os.replace(tmp, path)
        cropped.append(Utterance(u.id, path, u.text, u.label, u.source, u.row))
    return cropped


def _build_ensemble(corpus, xlsr: Path, folder: Path):
    """A one-member ensemble on the XLS-R replica, all 24 layers in float16, in the format ensemble._save writes."""
    import torch

    from emotune.model import build_model
    from emotune.model.checkpoint import ModelCard, save_model

    recipe = speech_recipe(xlsr, "all", "float16")
    model_cfg = {"family": "attention", "width": 512, "hidden_layers": 2, "dropout": 0.1, "modalities": ["speech"],
                 "fused_dim": None}
    card = ModelCard(labels=list(corpus.labels), dims={"speech": (len(recipe.layers), recipe.width)},
                     norms={"speech": "layer"}, model=model_cfg, encoders={"speech": recipe.describe()},
                     features={"max_text_tokens": 256})
    labels = card.labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(model_cfg, card.dims, len(labels), card.norms)
    shutil.rmtree(folder, ignore_errors=True)
    save_model(model, card, folder / "members" / "01")
    manifest = {"format": 1, "method": "hard", "k": 1, "labels": labels,
                "members": [{"folder": "members/01", "weight": 1.0, "name": "bench", "run_id": None, "dev_f1": 0.0}],
                "encoder_folders": {}, "calibration_offsets": None, "norm_stats": corpus.norm.to_dict()}
    (folder / "ensemble.json").write_text(json.dumps(manifest, indent=2))
    return card


def _peak_estimate_gb(seconds: list[float], chunk: int, hop: int, layers: int, width: int, base_gb: float) -> float:
    """Peak RSS of a predict run: the fixed part plus twice the float32 outputs of its largest chunk.

    Twice, because predict keeps the encoder's outputs and their storage-rounded copies at the same time
    until a chunk's encoding is done.
    """
    per_frame = layers * width * 4
    largest = max(sum(int(s * SAMPLE_RATE) // hop for s in seconds[i: i + chunk])
                  for i in range(0, len(seconds), chunk))
    return base_gb + 2 * largest * per_frame / GB


# A small fresh process runs each predict child and reports its peak. Linux records the high-water mark of the
# memory a process replaces at exec as part of its peak, so a child forked straight from this benchmark (which
# held the replicas and their outputs) would report at least this process's own peak. Forked from a process
# that only ran these lines, the child's figure is its own. The meter also stops a child that grows too large.
METER = r"""
import json, resource, subprocess, sys, time
limit_kb = float(sys.argv[1]) * 1e9 / 1024
child = subprocess.Popen(sys.argv[2:])
killed = False
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as f:
            rss = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    except OSError:
        rss = 0
    if rss > limit_kb:
        child.kill()
        child.wait()
        killed = True
    time.sleep(0.2)
print(json.dumps({"returncode": child.returncode, "killed": killed,
                  "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_predict(args, corpus, folders: dict) -> dict:
    """Peak RSS of predict in child processes: small and large clip counts, chunked and unchunked."""
    import torch

    from emotune.features.encode import open_encoder

    torch.set_num_threads(args.threads)
    counts = sorted(args.predict_clips)
    utts = demo_utterances(corpus, max(counts))
    durations = [corpus.audio[u.id].n_samples / SAMPLE_RATE for u in utts]
    recipe = speech_recipe(folders["xlsr"], "all", "float16")

    # One clip of typical length, after a warm-up, says how long the largest run would take.
    typical = sorted(range(len(utts)), key=lambda i: durations[i])[len(utts) // 2]
    encoder = open_encoder(recipe, "cpu")
    wave = load_waves(corpus, [utts[typical]])
    encoder.encode(wave)
    start = time.perf_counter()
    encoder.encode(wave)
    rate = (time.perf_counter() - start) / durations[typical]  # encoder seconds per second of audio
    weights_gb = params_of(encoder.model) * 4 / GB
    del encoder
    gc.collect()
    log(f"one clip of {durations[typical]:.1f} s: {rate:.3f} s per second of audio")

    base_gb = weights_gb + args.base_gb
    from emotune.selection.predict import CHUNK_CLIPS

    largest, chunked = max(counts), CHUNK_CLIPS
    # Whole clips first: the reasons to crop, if any, are reported whether the crop was chosen here or asked for.
    reasons = []
    run_minutes = rate * sum(durations) / 60
    if run_minutes > args.max_run_minutes:
        reasons.append(f"a {largest}-clip run of whole clips would take about {run_minutes:.0f} min "
                       f"(limit {args.max_run_minutes:g})")
    peak = _peak_estimate_gb(durations, 10 ** 9, recipe.frame_hop, len(recipe.layers), recipe.width, base_gb)
    if peak > args.max_child_gb:
        reasons.append(f"the unchunked {largest}-clip run of whole clips would peak at about {peak:.1f} GB "
                       f"(limit {args.max_child_gb:g} GB)")
    crop = args.crop_seconds
    if crop is None and reasons:  # the largest crop, in half seconds, that keeps every run within both limits
        crop = max(durations)
        while crop > 0.5 and (
                rate * sum(min(d, crop) for d in durations) / 60 > args.max_run_minutes
                or _peak_estimate_gb([min(d, crop) for d in durations], 10 ** 9, recipe.frame_hop,
                                     len(recipe.layers), recipe.width, base_gb) > args.max_child_gb):
            crop = math.floor(crop * 2 - 1e-9) / 2
    if crop is not None:
        utts = _crop_files(corpus, utts, crop)
        durations = [min(d, crop) for d in durations]
        log(f"clips cropped to their first {crop:g} s ({'; '.join(reasons) or 'as asked'})")

    ensemble = WORK_DIR / "ensemble-xlsr-all-float16"
    card = _build_ensemble(corpus, folders["xlsr"], ensemble)
    runs = []
    with tempfile.TemporaryDirectory(prefix="emotune-bench-predict-") as tmp:
        for n in counts:
            items = [{"id": u.id, "audio": str(u.audio), "text": u.text} for u in utts[:n]]
            listing = Path(tmp) / f"clips-{n}.json"
            listing.write_text(json.dumps(items))
            for label, chunk in (("chunked", chunked), ("unchunked", 10 ** 9)):
                if label not in args.predict_modes.split(","):
                    continue
                estimate = _peak_estimate_gb(durations[:n], chunk, recipe.frame_hop, len(recipe.layers),
                                             recipe.width, base_gb)
                if estimate > args.max_child_gb:
                    raise SystemExit(f"predict on {n} clips ({label}) would peak at about {estimate:.1f} GB, over "
                                     f"--max-child-gb {args.max_child_gb:g}: lower --crop-seconds")
                result = Path(tmp) / f"result-{n}-{label}.json"
                child_log = Path(tmp) / f"child-{n}-{label}.log"
                command = [sys.executable, "-c", METER, str(args.kill_gb), sys.executable,
                           str(Path(__file__).resolve()), "--child-predict", str(ensemble), "--child-input",
                           str(listing), "--child-chunk", str(chunk), "--child-out", str(result),
                           "--threads", str(args.threads)]
                log(f"predict: {n} clips, {label} (estimated peak {estimate:.1f} GB, about "
                    f"{rate * sum(durations[:n]) / 60:.1f} min) ...")
                start = time.perf_counter()
                with child_log.open("w") as sink:
                    meter = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, text=True, cwd=ROOT)
                wall = time.perf_counter() - start
                try:
                    report = json.loads(meter.stdout.strip().splitlines()[-1])
                except (IndexError, ValueError):
                    report = {"returncode": meter.returncode, "killed": False}
                if report.get("killed"):
                    raise SystemExit(f"predict on {n} clips ({label}) passed --kill-gb {args.kill_gb:g} and was "
                                     "stopped: lower --crop-seconds")
                if report["returncode"] != 0 or not result.is_file():
                    raise SystemExit(f"the predict child failed (exit {report['returncode']}):\n"
                                     f"{child_log.read_text()[-4000:]}")
                inner = json.loads(result.read_text())
                runs.append({"clips": n, "mode": label, "chunk_size": chunk, "audio_seconds": sum(durations[:n]),
                             "peak_rss_gb": report["maxrss_kb"] * 1024 / GB, "estimated_peak_gb": estimate,
                             "child_self_maxrss_gb": inner["self_maxrss_kb"] * 1024 / GB,
                             "benchmark_process_peak_gb":
                                 resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB,
                             "wall_seconds": wall, "predict_seconds": inner["predict_seconds"],
                             "load_seconds": inner["load_seconds"],
                             "command": " ".join(["python scripts/bench_scale.py", *sys.argv[1:]])})
                log(f"  peak RSS {runs[-1]['peak_rss_gb']:.2f} GB, {wall:.0f} s")

    # modes not rerun keep their runs from the existing scale.json (measured the same way)
    kept = [r for r in _previous_predict_runs() if r["mode"] not in args.predict_modes.split(",")]
    runs = kept + runs

    def peak(n, mode):
        return next(r["peak_rss_gb"] for r in runs if r["clips"] == n and r["mode"] == mode)

    small = min(counts)
    return {"runs": runs, "counts": counts, "crop_seconds": crop, "crop_reasons": reasons,
            "seconds_per_audio_second": rate, "threads": args.threads, "encoder": card.encoders["speech"],
            "ratio_chunked": peak(largest, "chunked") / peak(small, "chunked"),
            "ratio_unchunked": peak(largest, "unchunked") / peak(small, "unchunked")}


def _previous_predict_runs() -> list[dict]:
    try:
        return json.loads((BENCH_DIR / "scale.json").read_text())["predict"]["runs"]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def child_predict(args) -> int:
    """One predict run (the child process the parent measures): the ensemble on the listed clips."""
    import torch

    from emotune.data.corpus import Utterance
    from emotune.selection.predict import Ensemble

    torch.set_num_threads(args.threads)
    items = json.loads(Path(args.child_input).read_text())
    utterances = [Utterance(item["id"], Path(item["audio"]), item["text"], None, "bench-scale", row)
                  for row, item in enumerate(items)]
    start = time.perf_counter()
    ensemble = Ensemble(args.child_predict)
    loaded = time.perf_counter()
    predicted, _ = ensemble.predict(utterances, chunk_size=args.child_chunk)
    done = time.perf_counter()
    Path(args.child_out).write_text(json.dumps({
        "clips": len(utterances), "load_seconds": loaded - start, "predict_seconds": done - loaded,
        "predicted": np.bincount(predicted, minlength=len(ensemble.labels)).tolist(),
        "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    return 0


def run_f1(args, corpus) -> dict:
    """Dev macro-F1 with all 24 layers in float16 against every_3 + int8, paired seeds, tiny 24-layer wav2vec2."""
    import torch
    from safetensors.torch import load_file

    from emotune.config import load_config
    from emotune.features.encode import open_encoder
    from emotune.features.recipe import resolve_layers
    from emotune.features.tiny import build_tiny_encoder
    from emotune.model.checkpoint import ModelCard
    from emotune.trial import TrialContext, run_trial

    tiny = build_tiny_encoder("tiny-wav2vec2", WORK_DIR / "tiny-wav2vec2-24", num_layers=24)
    kept = resolve_layers("every_3", 24)
    # A cache of its own: reruns reuse it, and the project's shared cache is not filled with benchmark arrays.
    base = [f"paths.runs_dir={RUNS_DIR}", f"encoders.speech={tiny}", "model.modalities=[speech]",
            "model.fused_dim=null", f"trial.max_epochs={args.epochs}", "trial.early_stop=null",
            f"features.dir={WORK_DIR / 'cache'}"]
    variants = {"all_float16": ["features.speech_layers=all", "features.storage=float16"],
                "every3_int8": ["features.speech_layers=every_3", "features.storage=int8"]}
    rows = []
    for seed in range(args.seeds):
        row = {"seed": seed}
        for name, overrides in variants.items():
            cfg = load_config(base + overrides + [f"trial.seed={seed}"])
            cfg["tracking"] = None  # as bench_encoders: no MLflow runs in the project's store
            with tempfile.TemporaryDirectory(prefix="emotune-bench-f1-") as workdir:
                start = time.perf_counter()
                quiet = TrialContext(workdir=workdir, reporter=lambda metrics, checkpoint: None, progress=False)
                summary = run_trial(cfg, quiet)
                row[name] = summary["best_val_f1"]
                row[f"{name}_val_f1_history"] = [round(h["val_f1"], 4) for h in summary["history"]]
                card = ModelCard.load(Path(workdir) / "best")
                row[f"{name}_encoder_key"] = card.encoders["speech"]["key"]  # proof the layer choice was applied
                row[f"{name}_best_epoch"] = summary["best_epoch"]
                row[f"{name}_seconds"] = time.perf_counter() - start
                if name == "all_float16":
                    logits = load_file(str(Path(workdir) / "best" / "model.safetensors"))[
                        "adapters.speech.layer_mix.logits"]
                    weights = torch.softmax(logits.float(), dim=0)
                    row["layer_weights"] = [round(float(w), 5) for w in weights]
                    row["kept_layer_share"] = float(weights[kept].sum())
        row["delta"] = row["every3_int8"] - row["all_float16"]
        rows.append(row)
        log(f"seed {seed}: all layers float16 {row['all_float16']:.3f}, every_3 int8 {row['every3_int8']:.3f}, "
            f"difference {row['delta']:+.3f}; kept layers carry {row['kept_layer_share']:.3f} of the layer mix")

    # The rounding error on this preset's features: encoded exactly as the cache does, on the dev clips.
    torch.set_num_threads(args.threads)
    encoder = open_encoder(speech_recipe(tiny, "all", "float16"), "cpu")
    arrays = encoder.encode(load_waves(corpus, corpus.dev))
    error = int8_relative_error(arrays, kept)
    spread = layer_spread(arrays)
    delta_mean, delta_sd = mean_sd(r["delta"] for r in rows)
    share_mean, share_sd = mean_sd(r["kept_layer_share"] for r in rows)
    return {"encoder": "tiny-wav2vec2, 24 layers of width 32 (random weights)", "folder": str(tiny),
            "seeds": args.seeds, "epochs": args.epochs, "kept_layers": kept, "rows": rows,
            "delta_mean": delta_mean, "delta_sd": delta_sd, "kept_layer_share_mean": share_mean,
            "kept_layer_share_sd": share_sd, "uniform_share": len(kept) / 24,
            "int8_vs_float16": error | {"clips": len(corpus.dev)}, "first_last_layer_distance": spread}


# ---------------------------------------------------------------------------------------------- report


def render(data: dict) -> list[str]:
    """The markdown page, from whatever parts ``data`` holds (a partial run keeps the others)."""
    lines = ["# The real setting on a 2-core CPU: XLS-R 300M + XLM-RoBERTa large", "",
             "The paper's encoders, rebuilt offline as random-initialised replicas of their exact architectures "
             "(emotune's catalog), so that every cost that depends only on shapes (time, bytes, memory) is the real "
             "one. GB = 10^9 bytes.", ""]
    plan, speed, size, pred, f1 = (data.get(p) for p in PARTS)
    if plan:
        default, full = plan["hub_default"], plan["all_layers"]
        lines += ["## Cache of the paper's 4 x 4 encoder search (MEACorpus size: 5,129 clips, 13.16 h)", "",
                  f"`{default['command']}` (and the same with `features.speech_layers=all features.storage=float16`):",
                  "",
                  "| encoder | hub default: layers, storage | cache | all layers float16 | cache |",
                  "|---|---|---|---|---|"]
        for a, b in zip(default["encoders"], full["encoders"]):
            lines.append(f"| {a['modality']} {a['name']} | {a['layers']} {a['storage']} | "
                         f"{a['total_bytes'] / GB:,.1f} GB | {b['layers']} {b['storage']} | "
                         f"{b['total_bytes'] / GB:,.1f} GB |")
        lines += [f"| **total** | | **{default['total_gb']:,.1f} GB** | | **{full['total_gb']:,.1f} GB** |", "",
                  f"The hub defaults (every 3rd speech layer, int8) need {full['total_gb'] / default['total_gb']:.1f}x "
                  "less cache than all layers in float16 (text is stored as its last layer in float16 either way).",
                  ""]
    if speed:
        s, t = speed["speech"], speed["text"]
        lines += [f"## Encoding speed on this CPU ({speed['threads']} torch threads, after one warm-up input)", "",
                  "| encoder | parameters | inputs | time | per input | per second of audio | effective TFLOP/s |",
                  "|---|---|---|---|---|---|---|",
                  f"| {s['encoder']} | {s['parameters'] / 1e6:.1f} M | {s['clips']} clips, {s['audio_seconds']:.0f} s "
                  f"of audio, {s['frames']:,} frames | {s['seconds']:.1f} s | {s['seconds_per_clip']:.2f} s | "
                  f"{s['seconds_per_audio_second']:.3f} s | {s['effective_tflops']:.3f} |",
                  f"| {t['encoder']} | {t['parameters'] / 1e6:.1f} M ({t['parameters_without_embeddings'] / 1e6:.0f} M "
                  f"without embeddings) | {t['transcripts']} transcripts, {t['tokens']:,} tokens | "
                  f"{t['seconds']:.1f} s | {t['seconds_per_transcript'] * 1e3:.0f} ms | - | "
                  f"{t['effective_tflops']:.3f} ({t['effective_tflops_without_embeddings']:.3f} without embeddings) |",
                  "",
                  "Effective TFLOP/s = 2 x parameters x frames (or tokens) / seconds, the formula `emotune plan` uses "
                  "for its time estimate with `features.plan_tflops` (default 10, a GPU figure)."]
        if plan:
            tflops = plan["hub_default"]["tflops"]
            rates = {"speech": s["effective_tflops"], "text": t["effective_tflops"]}
            encoders = plan["hub_default"]["encoders"]
            xlsr = next(e for e in encoders if e["name"] == "xlsr")
            total = sum(e["seconds"] * tflops / rates[e["modality"]] for e in encoders)
            lines.append(f"At this CPU's rate the plan's {xlsr['seconds'] / 60:.0f} min for the XLS-R cache become "
                         f"{xlsr['seconds'] * tflops / rates['speech'] / 3600:.1f} h, and the whole search's cache "
                         f"{total / 3600:.0f} h (each speech encoder at XLS-R's rate, each text encoder at "
                         "XLM-RoBERTa's; rough, as smaller models use a CPU less well).")
        lines.append("")
    if size:
        a, b = size["all_float16"], size["every3_int8"]
        e = size["int8_vs_float16"]
        lines += [f"## Cache bytes per second of audio (XLS-R replica, {size['clips']} demo clips, "
                  f"{size['audio_seconds']:.0f} s)", "",
                  "| stored | layers | MB per second of audio (written) | from bytes_per_step |", "|---|---|---|---|",
                  f"| all layers, float16 | {a['layers']} | {a['mb_per_audio_second']:.3f} | "
                  f"{a['mb_per_audio_second_formula']:.3f} |",
                  f"| hub default: every_3, int8 | {b['layers']} ({', '.join(map(str, size['kept_layers']))}) | "
                  f"{b['mb_per_audio_second']:.3f} | {b['mb_per_audio_second_formula']:.3f} |", "",
                  f"Ratio {size['ratio']:.2f}x. The written figure includes each file's safetensors header. int8 "
                  f"against float16 on the kept layers: relative error {e['relative_error']:.4f} over all clips "
                  f"(worst clip {e['worst_clip']:.4f}; {e['float16_nonfinite_values']} non-finite float16 values).", ""]
    if pred:
        crop = (f"clips cropped to their first {pred['crop_seconds']:g} s "
                f"({'; '.join(pred['crop_reasons']) or 'as asked'})"
                if pred["crop_seconds"] else "whole clips")
        lines += ["## Peak memory of `emotune predict` (one member on the XLS-R replica: all 24 layers, float16)", "",
                  f"Each run is its own child process, started by a small fresh meter process that reads "
                  f"`getrusage(RUSAGE_CHILDREN).ru_maxrss` once it has exited (it has no other child, so the figure is "
                  f"that run's own peak; spawned straight from the benchmark process, a child would report at least "
                  f"the benchmark's own peak, which Linux carries across fork and exec). Demo "
                  f"clips, {crop}; encoder at {pred['seconds_per_audio_second']:.3f} s per second of audio "
                  f"({pred['threads']} threads).", "",
                  "| clips | audio | chunk_size | peak RSS | estimated | predict time |", "|---|---|---|---|---|---|"]
        sources = {}
        for r in pred["runs"]:
            if r.get("command"):
                sources.setdefault(r["command"], []).append(f"{r['clips']} {r['mode']}")
        if len(sources) > 1:  # --predict-modes kept some runs from an earlier invocation
            lines[-4] += " Rows from more than one invocation: " + "; ".join(
                f"{', '.join(rows)}: `{cmd}`" for cmd, rows in sources.items()) + "."
        for r in pred["runs"]:
            chunk = f"{r['chunk_size']} (default)" if r["mode"] == "chunked" else f"{r['chunk_size']:.0e} (unchunked)"
            lines.append(f"| {r['clips']} | {r['audio_seconds']:.0f} s | {chunk} | {r['peak_rss_gb']:.2f} GB | "
                         f"{r['estimated_peak_gb']:.1f} GB | {r['predict_seconds']:.0f} s |")
        small, large = min(pred["counts"]), max(pred["counts"])
        by = {(r["clips"], r["mode"]): r for r in pred["runs"]}
        enc = pred["encoder"]
        per_clip = (by[(small, "chunked")]["audio_seconds"] / small
                    * enc["frame_rate"] * enc["layers"] * enc["width"] * 4)
        extra = by[(large, "chunked")]["peak_rss_gb"] - by[(small, "chunked")]["peak_rss_gb"]
        size = by[(large, "chunked")]["chunk_size"]
        fuller = 2 * max(0, min(size, large) - min(size, small)) * per_clip / GB
        why = (f"a full {size}-clip chunk instead of {small} clips explains about {fuller:.2f} GB of that (twice the "
               "extra clips' float32 outputs), the rest is memory kept from one chunk to the next" if fuller > 0 else
               f"both runs hold at least one full {size}-clip chunk, so the difference is what grows with the number "
               "of chunks (memory kept from one chunk to the next, allocator fragmentation)")
        lines += ["", f"Peak RSS {large} / {small} clips: chunked **{pred['ratio_chunked']:.2f}x**, unchunked "
                  f"{pred['ratio_unchunked']:.2f}x. Chunked, the {large}-clip peak is {extra:+.2f} GB from the "
                  f"{small}-clip one; {why}. 'Estimated' is the script's bound before running (XLS-R weights + a "
                  "fixed allowance + twice the float32 outputs of the largest chunk).", ""]
    if f1:
        lines += [f"## Dev macro-F1 cost of the hub default storage ({f1['encoder']}, speech only, "
                  f"{f1['epochs']} epochs, no early stop)", "",
                  "| seed | all layers float16 | every_3 int8 | difference | kept layers' share of the layer mix |",
                  "|---|---|---|---|---|"]
        for r in f1["rows"]:
            lines.append(f"| {r['seed']} | {r['all_float16']:.3f} | {r['every3_int8']:.3f} | {r['delta']:+.3f} | "
                         f"{r['kept_layer_share']:.3f} |")
        e = f1["int8_vs_float16"]
        if f1["seeds"] < 2:
            resolved = "one seed gives no spread to judge a 0.01 margin by"
        elif f1["delta_sd"] > 0.01:
            resolved = "the demo cannot resolve a 0.01 margin (the sd of the paired difference is over 0.01)"
        else:
            df = f1["seeds"] - 1
            half = T975.get(df, 1.96 + 2.4 / df) * f1["delta_sd"] / math.sqrt(f1["seeds"])
            resolved = (f"the 95% interval of the mean difference is [{f1['delta_mean'] - half:+.3f}, "
                        f"{f1['delta_mean'] + half:+.3f}] (t, {df} degrees of freedom): "
                        + ("narrow enough to resolve a 0.01 margin" if half < 0.01
                           else "too wide to resolve a 0.01 margin (more seeds would narrow it)"))
        unpaired = {name: mean_sd(r[name] for r in f1["rows"])[1] for name in ("all_float16", "every3_int8")}
        lines += [f"| **mean ± sd** | | | **{f1['delta_mean']:+.3f} ± {f1['delta_sd']:.3f}** | "
                  f"{f1['kept_layer_share_mean']:.3f} ± {f1['kept_layer_share_sd']:.3f} (uniform "
                  f"{f1['uniform_share']:.3f}) |", "",
                  f"Difference = every_3 int8 minus all layers float16, same seed. The all-layers models' learned "
                  f"layer mix (softmax of `adapters.speech.layer_mix.logits`) puts {f1['kept_layer_share_mean']:.3f} "
                  f"of its weight on the kept layers {', '.join(map(str, f1['kept_layers']))}. int8 against float16 on "
                  f"this preset's features ({e['clips']} dev clips): relative error {e['relative_error']:.4f}. Its 24 "
                  f"random layers are near-copies of each other: after per-frame standardisation the last layer "
                  f"differs from the first by {f1['first_last_layer_distance']:.3f} (relative), so a layer subset "
                  "changes little of what the model sees, and paired runs follow almost the same path.", "",
                  f"What this can show: with the same seed, the hub default changes dev macro-F1 by "
                  f"{f1['delta_mean']:+.3f} (sd {f1['delta_sd']:.3f} over {f1['seeds']} paired seeds): {resolved}. "
                  f"Unpaired, the F1 itself varies across seeds by sd {unpaired['all_float16']:.3f} (all layers) and "
                  f"{unpaired['every3_int8']:.3f} (every_3 int8)."
                  + (" The pairing is tight here because the random layers are near-copies, not because the measure is "
                     "precise in general." if f1["delta_sd"] < min(unpaired.values()) else "")
                  + " What it cannot show: the encoder's weights are random, so these F1 figures say little about "
                  "which layers of a real pretrained XLS-R carry emotion; that needs the real checkpoint on real data.",
                  ""]
    lines += ["## Caveats", "",
              "- Random-weight replicas: time, bytes and memory depend on shapes only and carry over to the real "
              "checkpoints; anything about accuracy does not.",
              "- Timings come from a shared 2-core machine (another engineer's tests ran at times), so they are "
              "somewhat noisy (scale.json keeps the 1-minute load average before and after each part: "
              + ", ".join(f"{p} {a:.1f} -> {b:.1f}" for p, (a, b) in (data.get("load_average_1min") or {}).items())
              + "); the effective TFLOP/s of a CPU is far below a GPU's.",
              "- The text replica uses a byte-level BPE tokenizer learnt on the demo transcripts (the real "
              "sentencepiece model is not available offline), so token counts, and with them text time, differ "
              "somewhat from XLM-RoBERTa's own tokenizer.",
              "- Peak RSS includes Python, torch and the XLS-R weights in float32 (about 1.3 GB).", ""]
    commands = data.get("commands") or {}
    if commands:
        by_command: dict[str, list[str]] = {}
        for part, cmd in commands.items():
            by_command.setdefault(cmd, []).append(part)
        lines += ["Commands: " + "; ".join(f"`{cmd}` ({', '.join(parts)})" for cmd, parts in by_command.items())]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default all: "
                                                                 f"{','.join(PARTS)}; none: only rewrite scale.md)")
    parser.add_argument("--clips", type=int, default=24, help="demo clips for speed and bytes (default 24)")
    parser.add_argument("--predict-clips", default="50,500", help="clip counts of the predict runs (default 50,500)")
    parser.add_argument("--predict-modes", default="chunked,unchunked",
                        help="predict runs to measure: chunked, unchunked or both; the others keep their runs from "
                        "the existing scale.json (default both)")
    parser.add_argument("--crop-seconds", type=float, default=None,
                        help="cut predict clips to their first N seconds (default: only if a run would be too slow "
                             "or too large, then the largest half second that fits)")
    parser.add_argument("--max-run-minutes", type=float, default=20, help="longest acceptable predict run (default 20)")
    parser.add_argument("--max-child-gb", type=float, default=14,
                        help="largest acceptable estimated peak of a predict child (default 14, under the 16 GB "
                             "ceiling with room for other work on the machine)")
    parser.add_argument("--kill-gb", type=float, default=16,
                        help="a predict child whose resident memory passes this is stopped (default 16)")
    parser.add_argument("--base-gb", type=float, default=1.8,
                        help="predict's memory besides the encoder weights and its outputs (Python, torch, a "
                             "batch's activations), for the estimate (default 1.8, on the safe side)")
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds of the F1 part (default 3)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per F1 trial (default 40, trial/default.yaml)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for encoding (default 2)")
    parser.add_argument("--child-predict", help=argparse.SUPPRESS)
    parser.add_argument("--child-input", help=argparse.SUPPRESS)
    parser.add_argument("--child-chunk", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_predict:
        return child_predict(args)
    parts = [p.strip() for p in args.parts.split(",") if p.strip() and p.strip() != "none"]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    args.predict_clips = sorted({int(n) for n in args.predict_clips.split(",")})
    if len(args.predict_clips) < 2:
        parser.error("--predict-clips needs two counts, e.g. 50,500")

    previous = BENCH_DIR / "scale.json"
    data = json.loads(previous.read_text()) if previous.is_file() else {}
    command = "python scripts/bench_scale.py " + " ".join(sys.argv[1:])
    state: dict = {}
    timings = data.setdefault("part_seconds", {})
    corpus = load_corpus() if set(parts) - {"plan"} else None
    folders = {}
    if set(parts) & {"speed", "bytes", "predict"}:
        folders["xlsr"] = build_replica("xlsr")
    if "speed" in parts:
        folders["roberta-es"] = build_replica("roberta-es", [u.text for u in corpus.train + corpus.dev + corpus.test])
    for part in PARTS:
        if part not in parts:
            continue
        log(f"\n=== {part} ===")
        load_before = os.getloadavg()[0]  # the machine is shared: how busy it was says how noisy the timings are
        start = time.perf_counter()
        if part == "plan":
            data["plan"] = run_plan()
        elif part == "speed":
            data["speed"] = run_speed(args, corpus, folders, state)
        elif part == "bytes":
            data["bytes"] = run_bytes(args, corpus, folders, state)
        elif part == "predict":
            data["predict"] = run_predict(args, corpus, folders)
        else:
            data["f1"] = run_f1(args, corpus)
        timings[part] = time.perf_counter() - start
        data.setdefault("load_average_1min", {})[part] = [load_before, os.getloadavg()[0]]
        data.setdefault("commands", {})[part] = command.strip()
        log(f"{part}: {timings[part]:.0f} s")

    if "plan" in data:
        data["paper_search_cache_gb"] = data["plan"]["hub_default"]["total_gb"]
        data["paper_search_cache_gb_all_layers"] = data["plan"]["all_layers"]["total_gb"]
    if "predict" in data:
        data["predict_peak_rss_ratio_500_vs_50"] = data["predict"]["ratio_chunked"]
        data["predict_peak_rss_ratio_500_vs_50_unchunked"] = data["predict"]["ratio_unchunked"]
    if "bytes" in data:
        data["cache_mb_per_audio_second_all_layers_float16"] = data["bytes"]["all_float16"]["mb_per_audio_second"]
        data["cache_mb_per_audio_second_hub_default"] = data["bytes"]["every3_int8"]["mb_per_audio_second"]
    if "speed" in data:
        data["xlsr_seconds_per_audio_second"] = data["speed"]["speech"]["seconds_per_audio_second"]
        data["xlsr_effective_tflops"] = data["speed"]["speech"]["effective_tflops"]
        data["roberta_seconds_per_transcript"] = data["speed"]["text"]["seconds_per_transcript"]
    if "f1" in data:
        data["default_storage_dev_f1_delta"] = data["f1"]["delta_mean"]
        data["default_storage_dev_f1_delta_sd"] = data["f1"]["delta_sd"]
    import torch

    data["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                       "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M")}
    order = ["paper_search_cache_gb", "paper_search_cache_gb_all_layers", "predict_peak_rss_ratio_500_vs_50",
             "default_storage_dev_f1_delta"]  # the headline figures first in the JSON
    data = {**{k: data[k] for k in order if k in data}, **{k: v for k, v in data.items() if k not in order}}
    write("scale", data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
