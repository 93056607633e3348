"""Benchmark: does one trial learn on the demo corpus, and which offline encoder carries what?

Runs single trials with the same budget and seeds: the default pair (speech + text), text only, speech only,
and speech only for every offline speech encoder. Reports dev macro-F1 (best epoch, which is what the
search selects on, so it is optimistic) and the held-out test macro-F1 of that same checkpoint, plus the
cold cache-build time of each encoder and the training time per epoch.

    python scripts/bench_encoders.py                 # 3 seeds, 40 epochs (about 20 minutes on 2 cores)
    python scripts/bench_encoders.py --seeds 1 --epochs 10

Writes benchmarks/encoders.json and benchmarks/encoders.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, RUNS_DIR

SPEECH_ENCODERS = ["fbank", "mfcc", "tiny-wav2vec2", "tiny-wav2vec2-base", "tiny-wavlm", "tiny-hubert"]


def test_f1(workdir: Path, corpus) -> float:
    from emotune.evaluation import macro_f1, read_predictions

    ids, probs, labels = read_predictions(workdir / "best" / "test_predictions.csv")
    truth = {u.id: u.label for u in corpus.test}
    return macro_f1([labels.index(truth[i]) for i in ids], probs.argmax(1), len(labels))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="trial seeds per configuration (default 3)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs per trial, no early stopping (default 40)")
    parser.add_argument("--runs-dir", default=str(RUNS_DIR), help="where the demo corpus lives (default runs/)")
    parser.add_argument("--out", default=str(BENCH_DIR), help="output folder (default benchmarks/)")
    args = parser.parse_args()

    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus
    from emotune.trial import TrialContext, run_trial

    cache_dir = Path(tempfile.mkdtemp(prefix="emotune-bench-cache-"))  # cold cache: build times are real
    base = [f"paths.runs_dir={args.runs_dir}", f"features.dir={cache_dir}", f"trial.max_epochs={args.epochs}",
            "trial.early_stop=null"]
    configs = [("speech + text (fbank + tiny-bert)", ["model.modalities=[speech,text]"]),
               ("text only (tiny-bert)", ["model.modalities=[text]"])]
    configs += [(f"speech only ({name})", [f"encoders.speech={name}", "model.modalities=[speech]"])
                for name in SPEECH_ENCODERS]
    corpus = prepare_corpus(load_config(base)["data"], args.runs_dir, progress=True)
    quiet = {"reporter": lambda metrics, checkpoint: None, "progress": False}
    results = []
    for title, overrides in configs:
        rows = []
        for seed in range(args.seeds):
            cfg = load_config(base + overrides + [f"trial.seed={seed}"])
            cfg["tracking"] = None
            with tempfile.TemporaryDirectory() as workdir:
                start = time.perf_counter()
                summary = run_trial(cfg, TrialContext(workdir=workdir, **quiet))
                rows.append({"seed": seed, "dev_f1": summary["best_val_f1"], "test_f1": test_f1(Path(workdir), corpus),
                             "best_epoch": summary["best_epoch"], "feature_seconds": summary["feature_seconds"],
                             "seconds_per_epoch": summary["seconds_per_epoch"],
                             "wall_seconds": time.perf_counter() - start})
            print(f"{title:<40} seed {seed}: dev {rows[-1]['dev_f1']:.3f}  test {rows[-1]['test_f1']:.3f}  "
                  f"features {rows[-1]['feature_seconds']:.1f} s  {rows[-1]['seconds_per_epoch']:.2f} s/epoch",
                  flush=True)
        results.append({"config": title, "overrides": overrides, "runs": rows})

    def mean_sd(values):
        return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)

    lines = [f"# Single trials on the demo corpus ({args.seeds} seeds, {args.epochs} epochs, no early stopping)", "",
             "Dev macro-F1 is the best epoch's (what a search selects on, so optimistic); test macro-F1 is that same",
             "checkpoint scored on the held-out test split. 'Features ready' is the first seed's time until training",
             "starts: a cold cache build (4 augmented variants per training clip) the first time an encoder appears,",
             "a cache read afterwards. Chance level is about 0.17.", "",
             "| configuration | dev macro-F1 | test macro-F1 | features ready (s) | s/epoch |", "|---|---|---|---|---|"]
    for r in results:
        dev, test = mean_sd([x["dev_f1"] for x in r["runs"]]), mean_sd([x["test_f1"] for x in r["runs"]])
        epoch = statistics.mean(x["seconds_per_epoch"] for x in r["runs"])
        lines.append(f"| {r['config']} | {dev[0]:.3f} ± {dev[1]:.3f} | {test[0]:.3f} ± {test[1]:.3f} | "
                     f"{r['runs'][0]['feature_seconds']:.1f} | {epoch:.2f} |")
    lines += ["", f"Command: `python scripts/bench_encoders.py --seeds {args.seeds} --epochs {args.epochs}`"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps({"seeds": args.seeds, "epochs": args.epochs, "results": results},
                                                  indent=2))
    (out / "encoders.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
