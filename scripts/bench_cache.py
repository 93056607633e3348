"""Benchmark: the shared feature cache against re-encoding every batch (the paper's way).

The same search (the same trials, epochs and seeds: fixed points, no pruning) runs twice on the demo
corpus, once with the cache (cold: the build is part of it) and once with ``features=live``. The encoders
are wider and deeper than the tiny presets (random WavLM and BERT, 4 layers of width 384), so that encoder
cost is a fair share of the work. Reports both wall times and their ratio, the cache build time, the
head-only training time, how close the cached search comes to its floor (build + training), and an estimate,
from parameter counts, of the ratio with the paper's large encoders.

    python scripts/bench_cache.py                      # 3 trials x 6 epochs (about 15 minutes on 2 cores)
    python scripts/bench_cache.py --trials 2 --epochs 3

Writes benchmarks/cache.json and benchmarks/cache.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _bench import RUNS_DIR, run_search, trial_results, write

# Parameter counts of the paper's best pair (emotune's catalog).
LARGE = {"speech": ("facebook/wav2vec2-xls-r-300m", 315_000_000),
         "text": ("llange/xlm-roberta-large-spanish", 304_000_000)}  # xlm-roberta-large without its embedding table
SPACE = """# @package _global_
space:
  name: bench_cache
  params:
    model.dropout: {{choice: {dropouts}}}
  points_to_evaluate: {points}
"""


def build_encoders(runs_dir: Path, corpus, width: int, layers: int) -> dict[str, Path]:
    from emotune.features.tiny import build_tiny_encoder

    texts = [u.text for u in corpus.train + corpus.dev]
    return {
        "speech": build_tiny_encoder("tiny-wavlm", runs_dir / "bench-encoders" / f"wavlm-{width}x{layers}",
                                     hidden_size=width, num_layers=layers),
        "text": build_tiny_encoder("tiny-bert", runs_dir / "bench-encoders" / f"bert-{width}x{layers}", texts=texts,
                                   hidden_size=width, num_layers=layers),
    }


def encoder_seconds(folders: dict[str, Path], corpus, n: int = 24) -> dict:
    """Seconds per whole clip, per 5.5 s crop and per transcript, and each encoder's parameter count."""
    import torch

    from emotune.data.audio import crop_or_repeat, load_audio
    from emotune.features.catalog import resolve_encoder
    from emotune.features.encode import load_encoder

    torch.set_num_threads(1)  # as in a trial
    utts = corpus.train[:n]
    waves = [corpus.norm.apply(load_audio(u.audio)) for u in utts]
    crops = [crop_or_repeat(w, int(5.5 * 16000), np.random.default_rng(0)) for w in waves]
    speech = load_encoder(resolve_encoder(str(folders["speech"]), "speech"), "/tmp")
    text = load_encoder(resolve_encoder(str(folders["text"]), "text"), "/tmp")
    timings = {}
    for name, fn in (("speech_clip", lambda: speech.encode(waves)), ("speech_crop", lambda: speech.encode(crops)),
                     ("text", lambda: text.encode([u.text for u in utts]))):
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        timings[name] = (time.perf_counter() - start) / n
    timings["speech_params"] = sum(p.numel() for p in speech.model.parameters())
    embeddings = text.model.get_input_embeddings().weight.numel()
    timings["text_params"] = sum(p.numel() for p in text.model.parameters()) - embeddings
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per search (default 3)")
    parser.add_argument("--epochs", type=int, default=6, help="epochs per trial (default 6)")
    parser.add_argument("--width", type=int, default=384, help="encoder width (default 384)")
    parser.add_argument("--layers", type=int, default=4, help="encoder layers (default 4)")
    args = parser.parse_args()

    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus

    runs = RUNS_DIR
    base_cfg = load_config([f"paths.runs_dir={runs}"])
    corpus = prepare_corpus(base_cfg["data"], runs, progress=False)
    folders = build_encoders(runs, corpus, args.width, args.layers)
    per_item = encoder_seconds(folders, corpus)

    spaces = Path(tempfile.mkdtemp(prefix="emotune-bench-spaces-"))
    (spaces / "search_spaces" / "space").mkdir(parents=True)
    dropouts = [round(0.1 * (i + 1), 2) for i in range(args.trials)]
    (spaces / "search_spaces" / "space" / "bench_cache.yaml").write_text(
        SPACE.format(dropouts=dropouts, points=[{"model.dropout": d} for d in dropouts]))
    os.chdir(spaces)  # its search_spaces/ folder is searched for space=bench_cache
    cache_dir = Path(tempfile.mkdtemp(prefix="emotune-bench-cache-"))  # cold
    common = ["space=bench_cache", f"paths.runs_dir={runs}", f"encoders.speech={folders['speech']}",
              f"encoders.text={folders['text']}", "encoders.fused_dim=null", f"search.num_samples={args.trials}",
              f"trial.max_epochs={args.epochs}", f"search.grace_period={args.epochs}", "trial.early_stop=null",
              f"features.dir={cache_dir}"]
    measured = {}
    for mode, extra in (("cached", ["features=cached"]), ("live", ["features=live"])):
        start = time.perf_counter()
        summary = run_search(common + extra + [f"search.name=bench-cache-{mode}-{int(time.time())}"])
        wall = time.perf_counter() - start
        trials = trial_results(summary["experiment_dir"])
        train = sum(sum(r["epoch_seconds"] for r in t["rows"]) for t in trials)
        build = sum(r["seconds"] for r in summary["cache"])
        measured[mode] = {"wall_seconds": wall, "fit_seconds": summary["fit_seconds"], "build_seconds": build,
                          "train_seconds": train, "best_val_f1": summary["best"]["best_val_f1"],
                          "trials": len(trials)}
        print(f"{mode}: {wall:.0f} s wall, build {build:.0f} s, training {train:.0f} s", flush=True)

    cached, live = measured["cached"], measured["live"]
    concurrency = 2
    floor = cached["build_seconds"] + cached["train_seconds"] / concurrency
    # Large-encoder estimate: encoder time scales with parameters (same clips, same frames).
    scale = {"speech": LARGE["speech"][1] / per_item["speech_params"],
             "text": LARGE["text"][1] / per_item["text_params"]}
    n_train, n_eval = len(corpus.train), len(corpus.dev)
    variants = int(base_cfg["features"]["variants"])
    live_encode_per_epoch = (n_train * (per_item["speech_crop"] * scale["speech"] + per_item["text"] * scale["text"])
                             + n_eval * (per_item["speech_clip"] * scale["speech"] + per_item["text"] * scale["text"]))
    build_encode = ((n_train * (1 + variants) + n_eval + len(corpus.test)) * per_item["speech_clip"] * scale["speech"]
                    + (n_train + n_eval + len(corpus.test)) * per_item["text"] * scale["text"])
    head = cached["train_seconds"]
    trial_epochs = args.trials * args.epochs
    large_live = trial_epochs * live_encode_per_epoch + head
    large_cached = build_encode + head
    search_epochs = 40 * 93  # e.g. 40 trials of the paper's 93 epochs
    search_live = search_epochs * live_encode_per_epoch + head
    search_cached = build_encode + head * search_epochs / trial_epochs
    lines = [f"# Feature cache vs re-encoding every batch ({args.trials} trials x {args.epochs} epochs, "
             f"encoders {args.width} wide x {args.layers} layers)", "",
             "Same search both ways (fixed points, no pruning, 2 trials at a time on 2 cores). The cached run "
             "starts with a cold cache, so its wall time includes the build (clean clip + 4 augmented copies per "
             "training clip).", "",
             "| | cached | live (re-encode) |", "|---|---|---|",
             f"| search wall time | {cached['wall_seconds']:.0f} s | {live['wall_seconds']:.0f} s |",
             f"| of which trials (Tuner.fit) | {cached['fit_seconds']:.0f} s | {live['fit_seconds']:.0f} s |",
             f"| cache build | {cached['build_seconds']:.0f} s | - |",
             f"| training time summed over trials | {cached['train_seconds']:.0f} s | {live['train_seconds']:.0f} s |",
             f"| best dev macro-F1 | {cached['best_val_f1']:.3f} | {live['best_val_f1']:.3f} |", "",
             f"- live / cached wall time: **{live['wall_seconds'] / cached['wall_seconds']:.2f}x**; on the trials "
             f"alone {live['fit_seconds'] / cached['fit_seconds']:.1f}x.",
             f"- floor of the cached search (build + training / 2 parallel trials): {floor:.0f} s; the cached "
             f"search took {cached['wall_seconds']:.0f} s ({cached['wall_seconds'] / floor:.2f}x the floor; the rest "
             "is Ray start-up, per-trial set-up and MLflow).",
             f"- encoder cost per item here: speech {per_item['speech_clip'] * 1e3:.1f} ms per clip, "
             f"{per_item['speech_crop'] * 1e3:.1f} ms per 5.5 s crop, text {per_item['text'] * 1e3:.1f} ms; "
             f"parameters: speech {per_item['speech_params'] / 1e6:.1f} M, text {per_item['text_params'] / 1e6:.1f} M "
             "(without embeddings).", "",
             "Estimate for the paper's encoders (XLSR-53 315 M, XLM-RoBERTa-large 304 M without embeddings), "
             "scaling encoder time by parameters and keeping head training as measured:",
             f"- this benchmark's {trial_epochs} trial-epochs: live {large_live / 3600:.1f} h vs cached "
             f"{large_cached / 3600:.1f} h (ratio {large_live / large_cached:.1f}x);",
             f"- a 40-trial search of 93 epochs: live {search_live / 3600:.0f} h vs "
             f"cached {search_cached / 3600:.1f} h (ratio "
             f"{search_live / search_cached:.0f}x) "
             "on one CPU core; a GPU divides the encoder terms, not the ratio's direction.", "",
             f"Command: `python scripts/bench_cache.py --trials {args.trials} --epochs {args.epochs}`"]
    write("cache", {"args": vars(args), "measured": measured, "per_item": per_item, "floor_seconds": floor,
                    "large_estimate": {"live_seconds": large_live, "cached_seconds": large_cached}}, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
