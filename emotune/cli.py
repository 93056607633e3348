"""The ``emotune`` command. ``emotune --help`` lists the subcommands; each has its own ``--help``.

Commands that take a configuration accept Hydra-style ``key=value`` overrides after their options, for
example ``emotune check-corpus data=folder data.root=/data/meacorpus data.on_error=skip``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from emotune.errors import EmotuneError, run_command
from emotune.names import ENSEMBLE_METHODS


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from emotune.data.corpus import format_summary, load_corpus
    from emotune.data.demo import build_demo_corpus

    start = time.perf_counter()
    manifest = build_demo_corpus(args.out_dir, n_clips=args.clips, seed=args.seed, workers=args.workers)
    built = time.perf_counter() - start
    out = Path(args.out_dir).resolve()
    corpus = load_corpus(out / "train.csv", out / "audio", out / "test.csv", out / "test_labels.csv")
    print(f"demo corpus: {manifest['n_clips']} clips, seed {manifest['seed']}, written to {out} in {built:.1f} s")
    print(format_summary({"train": corpus.train, "test": corpus.test}, corpus.labels, corpus.audio))
    speakers = sorted({c["speaker"] for c in manifest["clips"]})
    modes = {m: sum(c["mode"] == m for c in manifest["clips"]) for m in ("neutral", "text", "voice", "both")}
    print(f"{len(speakers)} voices; emotion carried by: " + ", ".join(f"{m} {n}" for m, n in modes.items()))
    return 0


def _cmd_check_corpus(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus

    cfg = load_config(args.overrides)
    prepared = prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"])
    print(prepared.summary())
    out = prepared.save(Path(cfg["paths"]["runs_dir"]) / "corpus-check" / Path(cfg["data"]["root"]).name)
    print(f"statistics written to {out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.trial import TrialContext, run_trial

    cfg = load_config(args.overrides)
    workdir = Path(cfg["paths"]["runs_dir"]) / "trials" / time.strftime("train-%Y%m%d-%H%M%S")
    summary = run_trial(cfg, TrialContext(workdir=workdir))
    print(f"best dev macro-F1 {summary['best_val_f1']:.4f} at epoch {summary['best_epoch']} "
          f"({summary['epochs_trained']} epochs, {summary['seconds_per_epoch']:.2f} s/epoch, "
          f"features ready in {summary['feature_seconds']:.1f} s)")
    print(f"checkpoint and predictions: {workdir / 'best'}")
    if summary.get("run_id"):
        print(f"MLflow run {summary['run_id']} in {cfg['tracking']['uri']}  (see it with: emotune ui)")
    return 0


def _members(text: str) -> int | str:
    """``--k``: a number of members, else the word as given (``tied``; anything else EnsembleRequest refuses)."""
    try:
        return int(text)
    except ValueError:
        return text.strip().lower()


def _cmd_select_top(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.selection.ensemble import EnsembleRequest, select_top

    cfg = load_config(args.overrides)
    select_top(cfg, EnsembleRequest(k=args.k, method=args.method, search=args.search,
                                    exclude_stopped=args.exclude_stopped, steps=args.steps, calibrate=args.calibrate,
                                    out_dir=args.out))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.data.prepare import prepare_corpus
    from emotune.insight.page import write_report
    from emotune.insight.record import load_record
    from emotune.tracking.store import TrackedRun

    record = load_record(load_config(args.overrides, "search"), args.search)
    corpus = prepare_corpus(record.cfg["data"], record.cfg["paths"]["runs_dir"], progress=False)
    page, pngs = write_report(record, corpus)
    print(f"report of search '{record.name}': {page}")
    run_id = record.summary.get("parent_run_id")
    if run_id and not args.no_log:
        TrackedRun(record.cfg["tracking"], run_id).log_artifacts([page, *pngs], "summary")
        print(f"logged to the search's MLflow run {run_id} (artifacts, summary/)")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from emotune.selection.predict import Ensemble, read_inputs, write_output

    ensemble = Ensemble(args.ensemble_dir, args.models_dir)
    utterances, report = read_inputs(args.csv, args.audio_dir, args.audio, args.text, args.on_error)
    if len(report):
        print(report.summary(), file=sys.stderr)
    predicted, scores = ensemble.predict(utterances)
    text = write_output(args.out, utterances, predicted, scores, ensemble.labels)
    if args.out:
        print(f"{len(utterances)} predictions written to {args.out}")
    else:
        print(text)
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.features.plan import DEFAULT_TEST_SHARE, ClipSplits, plan_cache
    from emotune.search.plan import Machine, device_tflops, plan_search
    from emotune.search.space import encoders_in_play, validate_space

    cfg = load_config(args.overrides, "search")
    validate_space(cfg["space"], cfg)
    encoders = encoders_in_play(cfg)
    if (args.clips is None) != (args.hours is None):
        raise EmotuneError("--clips and --hours go together: the number of clips and their total hours")
    if args.device_tflops is not None:
        args.device_tflops, source = device_tflops(args.device_tflops)
        print(f"device speed: {args.device_tflops:g} TFLOP/s, {source}")
    for flag in ("device_tflops", "read_gbps", "cpus", "gpus"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (value == 0 and flag != "gpus")):
            raise EmotuneError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    corpus_seconds = (0.0, 0.0)
    if args.clips is not None:
        splits = ClipSplits.described(args.clips, args.hours, float(cfg["data"]["dev_fraction"]),
                                      DEFAULT_TEST_SHARE if args.test_share is None else args.test_share)
    else:
        from emotune.data.prepare import prepare_corpus

        started = time.perf_counter()
        splits = ClipSplits.of_corpus(prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"]))
        cold = time.perf_counter() - started
        started = time.perf_counter()  # what each trial pays again: the corpus read from its prepared form
        prepare_corpus(cfg["data"], cfg["paths"]["runs_dir"], progress=False)
        corpus_seconds = (cold, time.perf_counter() - started)
    if args.device_tflops is not None:
        cfg["features"]["plan_tflops"] = args.device_tflops  # the fill's encoders run on the same device
    plan = plan_cache(cfg["features"], cfg["paths"], splits, encoders)
    if not plan.encoders:
        print("features.cache=false: encoders run inside the trials and nothing is stored.")
        return 0
    print(plan.table())
    data = plan.to_dict()
    if not args.cache_only:
        print()
        search_plan = plan_search(cfg, splits, plan, Machine(args.device_tflops, args.read_gbps, args.cpus, args.gpus),
                                  corpus_seconds, as_command=True)
        print(search_plan.table())
        data |= {"total_seconds": round(search_plan.total_seconds, 1),
                 "device_hours": round(search_plan.device_hours, 3), "search": search_plan.to_dict()}
    if args.json:
        import json

        Path(args.json).write_text(json.dumps(data, indent=1))
        print(f"plan written to {Path(args.json).resolve()}")
    return 0


def _cmd_ui(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.tracking.ui import serve

    cfg = load_config(args.overrides)
    return serve(cfg["tracking"], args.host, args.port, open_browser=args.open)


def _cmd_server(args: argparse.Namespace) -> int:
    from emotune.config import load_config
    from emotune.tracking.server import ServerOptions, serve_tracking

    cfg = load_config(args.overrides)
    if args.add_user:
        from emotune.tracking.server import add_user

        print(add_user(cfg["tracking"], args.add_user, args.password_file or f"{args.add_user}-password"))
        return 0
    return serve_tracking(cfg["paths"]["runs_dir"], ServerOptions(
        host=args.host, port=args.port, backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination, auth=args.auth, auth_config=args.auth_config,
        insecure=args.insecure, workers=args.workers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emotune",
        description="Search frozen-encoder speech + text emotion recognizers with Ray Tune, Optuna and MLflow.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in (_add_corpus_commands, _add_training_commands, _add_select_top, _add_report, _add_predict, _add_plan,
                _add_ui, _add_server):
        add(sub)
    return parser


def _add_corpus_commands(sub) -> None:
    """demo-corpus and check-corpus."""
    demo = sub.add_parser(
        "demo-corpus",
        help="synthesize the offline Spanish demo corpus",
        description="Synthesize the demo corpus (espeak-ng, offline) in the challenge's layout and print its summary.",
    )
    demo.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (must be empty or an earlier demo corpus)")
    demo.add_argument("--clips", type=int, default=900, help="number of clips (default: 900)")
    demo.add_argument("--seed", type=int, default=0, help="seed; the same seed gives the same files (default: 0)")
    demo.add_argument("--workers", type=int, default=None, help="synthesis processes (default: one per core)")
    demo.set_defaults(func=_cmd_demo_corpus)

    check = sub.add_parser(
        "check-corpus",
        help="read and check a corpus, print its splits and statistics",
        description="Validate every row and audio file of the configured corpus, split it and print a summary. "
        "Example: emotune check-corpus data=folder data.root=/data/meacorpus data.on_error=skip",
    )
    check.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    check.set_defaults(func=_cmd_check_corpus)


def _add_training_commands(sub) -> None:
    """train (one model) and search (its --help is the search's own)."""
    train = sub.add_parser(
        "train",
        help="train one model (a single trial, without Ray)",
        description="Train one model with the composed configuration and log it to MLflow. "
        "Example: emotune train encoders.speech=mfcc model.dropout=0.2 trial.max_epochs=20",
    )
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")
    train.set_defaults(func=_cmd_train)

    search = sub.add_parser(
        "search",
        help="run or resume a hyperparameter search (same as python -m emotune.search)",
        description="Run a Ray Tune + Optuna + ASHA search; running the same search name again resumes it. "
        "Example: emotune search space=encoders search.num_samples=20. `python -m emotune.search --help` "
        "lists the spaces and the main keys.",
    )
    search.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides")


def _add_report(sub) -> None:
    report = sub.add_parser(
        "report",
        help="what a finished search learned: which settings matter, which encoder pair wins (HTML)",
        description="Write runs/ray/SEARCH/summary/report.html, one self-contained page: each searched setting's "
        "importance (fANOVA; PED-ANOVA from 20 trials) with a 95%% interval from a bootstrap over the trials, the "
        "encoder pairs with their best and mean scores, ties with the best pair and expected F1 on unseen clips, "
        "each numeric setting against the score (trials ASHA cut drawn apart), the best score against time, and "
        "the trials tied with the best. Every search writes it at its end; this command writes it again and logs "
        "it to the search's MLflow run. Example: emotune report --search encoders-20",
    )
    report.add_argument("--search", default=None, help="search name (default: the latest finished search)")
    report.add_argument("--no-log", action="store_true", help="write the page only; do not log it to MLflow")
    report.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="configuration overrides (paths.runs_dir=... for a search in another runs folder)")
    report.set_defaults(func=_cmd_report)


def _add_select_top(sub) -> None:
    select = sub.add_parser(
        "select-top",
        help="ensemble the best trials of a search, evaluate it, write predictions",
        description="Pick the best trials of a search by their ranking score (best_val_score, the best value of "
        "trial.select_by; best_val_f1 for older searches), combine them (hard vote, soft vote or greedy ensemble "
        "selection), score the ensemble on data not used to choose it, and save a folder that `emotune predict` "
        "can use. Trials with equal scores rank by run start, earlier first. "
        "Examples: emotune select-top --k 3 --method soft;  emotune select-top --k tied",
    )
    select.add_argument("--k", type=_members, default=3, metavar="K|tied",
                        help="members for hard/soft voting (default 3), or 'tied': the best trial and every trial "
                        "statistically tied with it (the best does not beat it in at least search.ties_confidence, "
                        "default 95%%, of paired bootstrap resamples of the dev clips that choose the members), at "
                        "least 3 (fewer tied: the next best-ranked fill up, since a majority vote of two is the "
                        "better member alone) and at most 7 (more tied: the 7 best-ranked, since further members "
                        "of a tied crowd add little but prediction time)")
    select.add_argument("--method", choices=ENSEMBLE_METHODS, default="hard",
                        help="hard: majority vote, ties to the best member (the paper's); soft: mean probabilities; "
                        "greedy: Caruana ensemble selection over the trials the best does not beat with confidence "
                        "(it picks its own members: no --k tied) (default hard)")
    select.add_argument("--search", default=None, help="search name or parent run id (default: the latest search)")
    select.add_argument("--exclude-stopped", action="store_true", help="leave out trials that ASHA stopped early")
    select.add_argument("--steps", type=int, default=25, help="greedy selection steps (default 25)")
    select.add_argument("--calibrate", action="store_true",
                        help="soft and greedy only (the hard vote takes no offsets): tune per-class offsets on the "
                        "dev clips that choose the members and apply them to the predictions, submission.csv and "
                        "`emotune predict`; the macro-F1, report and confusion matrix are then the calibrated ones, "
                        "and the macro-F1 without offsets is printed beside")
    select.add_argument("--out", default=None, help="ensemble folder (default runs/ensembles/SEARCH-METHOD-kK, "
                        "e.g. smoke-hard-ktied); an "
                        "existing one is replaced only if it holds an earlier ensemble or nothing")
    select.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides (paths, tracking)")
    select.set_defaults(func=_cmd_select_top)


def _add_predict(sub) -> None:
    predict = sub.add_parser(
        "predict",
        help="predict emotions of new clips with a saved ensemble",
        description="Run an ensemble on a CSV of clips (id,transcription + an audio folder) or on one clip. "
        "Output: id, prediction and class probabilities, as CSV or JSON (by --out's suffix), or on stdout.",
    )
    predict.add_argument("ensemble_dir", metavar="ENSEMBLE_DIR", help="a folder written by emotune select-top")
    predict.add_argument("--csv", help="CSV with id,transcription (a label column is ignored)")
    predict.add_argument("--audio-dir", help="folder with the audio files named by id")
    predict.add_argument("--audio", help="one audio file (with --text)")
    predict.add_argument("--text", help="the transcript of --audio")
    predict.add_argument("--out", help="output file: .csv or .json (default: print CSV)")
    predict.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                         help="bad rows: stop (raise) or leave out and report them (skip)")
    predict.add_argument("--models-dir", help="a models folder (the search's paths.models_dir) to find hub encoders "
                         "in when they are not in this machine's Hugging Face cache")
    predict.set_defaults(func=_cmd_predict)


def _add_plan(sub) -> None:
    plan = sub.add_parser(
        "plan",
        help="plan a search before it runs: its feature cache, its trials' time, its wall time and device-hours",
        description="Print, per encoder the search may use and in total: the cache size, the encoder passes, what "
        "the cache already holds, whether the rest fits the disk, and an encoding-time estimate. Then the trials: "
        "seconds per epoch of the shapes the space can draw (measured here in a few seconds), ASHA's expected share "
        "of the epochs and trials per rung, and the whole search's wall time and device-hours. Nothing is "
        "downloaded, encoded or logged. Takes the search's overrides. Examples: emotune plan space=encoders "
        "encoders=hub data=folder data.root=/data/meacorpus;  emotune plan space=encoders encoders=hub --clips 5129 "
        "--hours 13.16 --device-tflops 100 --read-gbps 3 --gpus 2",
    )
    plan.add_argument("--clips", type=int, help="plan for a corpus you describe: its number of clips (with --hours)")
    plan.add_argument("--hours", type=float, help="the described corpus' total hours of audio (with --clips)")
    plan.add_argument("--test-share", type=float, default=None,
                      help="share of a described corpus in the test split (default 0.2, as EmoSPeech 2024: 750 of "
                      "3,750); dev is data.dev_fraction of the rest")
    plan.add_argument("--json", metavar="FILE", help="also write the plan as JSON: the cache plan's keys, the "
                      "search's wall time total_seconds and device_hours, and the time plan's parts under 'search'")
    plan.add_argument("--device-tflops", metavar="TF|gpu.json",
                      help="plan a device you do not have: its effective TFLOP/s, or the gpu.json that "
                      "scripts/gpu_check.py measured on it (benchmarks/gpu.json); the trials' steps are then counted "
                      "in FLOPs, not timed here; also sets features.plan_tflops for the fill")
    plan.add_argument("--read-gbps", type=float, metavar="GBPS",
                      help="the cache folder's read speed in GB/s (default: measured in features.dir)")
    plan.add_argument("--cpus", type=int,
                      help="CPUs of the machine or cluster (default: ray.num_cpus or this machine's)")
    plan.add_argument("--gpus", type=int, help="GPUs of the machine or cluster (default: this machine's)")
    plan.add_argument("--cache-only", action="store_true", help="only the cache plan (no measurement, no trial plan)")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides, as for the search")
    plan.set_defaults(func=_cmd_plan)


def _add_ui(sub) -> None:
    ui = sub.add_parser(
        "ui",
        help="open the MLflow UI for the project's runs (on 127.0.0.1)",
        description="Start the MLflow UI on the project's tracking store and print the address of the latest "
        "search's runs. It listens on 127.0.0.1 unless --host says otherwise; 0.0.0.0 exposes it to your network. "
        "Ctrl-C, SIGTERM or SIGHUP stop the server and every process it started. With tracking.uri=http://HOST:PORT "
        "(a tracking server, e.g. `emotune server`) it starts nothing and prints that server's runs page.",
    )
    ui.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="configuration overrides (e.g. paths.runs_dir)")
    ui.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    ui.add_argument("--open", action="store_true", help="open the runs page in a web browser")
    ui.set_defaults(func=_cmd_ui)


def _add_server(sub) -> None:
    server = sub.add_parser(
        "server",
        help="run an MLflow tracking server that searches on other machines (a team, a Ray cluster) log to",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run MLflow's tracking server on a store of its own, with the artifacts going through it, and\n"
        "print the tracking.uri to give to searches: their trials, on any machine, need no access to its disk.\n"
        "Ctrl-C, SIGTERM or SIGHUP stop the server and every process it started.\n\n"
        "It listens on 127.0.0.1 unless --host says otherwise. Any other host lets every machine that reaches the\n"
        "port read, change and delete the runs, so it needs --auth (MLflow's logins; clients then set\n"
        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD) or --insecure.",
        epilog="examples:\n"
        "  emotune server                                  # this machine only; store in RUNS_DIR/server/\n"
        "  emotune search tracking.uri=http://127.0.0.1:5000 space=encoders\n"
        "  MLFLOW_AUTH_ADMIN_PASSWORD=... emotune server --host 0.0.0.0 --auth   # the network, with logins\n"
        "  emotune server --host 0.0.0.0 --insecure --workers 8   # a private cluster, no logins\n"
        "  emotune server --backend-store-uri postgresql://mlflow@db/mlflow --artifacts-destination s3://bucket/ml\n"
        "  emotune ui tracking.uri=http://127.0.0.1:5000   # the latest search's runs on the server\n"
        "  MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=... emotune server --add-user worker \\\n"
        "      --password-file /shared/worker-password tracking.uri=http://HEAD:5000   # a user for the workers",
    )
    server.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="configuration overrides (paths.runs_dir: where the default store and artifacts go)")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1); 0.0.0.0 is every interface")
    server.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    server.add_argument("--backend-store-uri", metavar="URI",
                        help="where runs are recorded (default sqlite:///RUNS_DIR/server/mlflow.db); any SQLAlchemy "
                        "URI, e.g. postgresql://user@host/db, for many concurrent trials")
    server.add_argument("--artifacts-destination", metavar="DIR_OR_URI",
                        help="where the server keeps artifacts (default RUNS_DIR/server/artifacts), or a URI "
                        "such as s3://bucket/path")
    access = server.add_mutually_exclusive_group()
    access.add_argument("--auth", action="store_true",
                        help="require logins (MLflow's basic-auth app). The admin's password comes from "
                        "MLFLOW_AUTH_ADMIN_PASSWORD (12+ characters) or --auth-config; users are kept in "
                        "RUNS_DIR/server/basic_auth.db")
    access.add_argument("--insecure", action="store_true",
                        help="serve a non-loopback --host without logins (a network where everyone may do anything)")
    server.add_argument("--auth-config", metavar="FILE",
                        help="MLflow basic-auth INI file to use instead of emotune's (implies --auth; default "
                        "$MLFLOW_AUTH_CONFIG_PATH)")
    server.add_argument("--workers", type=int, metavar="N", help="MLflow's request workers (default MLflow's, 4)")
    server.add_argument("--add-user", metavar="NAME",
                        help="instead of serving: create user NAME on the running server tracking.uri (as its admin: "
                        "MLFLOW_TRACKING_USERNAME/PASSWORD), with EDIT on emotune's experiment (tracking.experiment), "
                        "for workers; its password goes to --password-file")
    server.add_argument("--password-file", metavar="FILE",
                        help="with --add-user: the user's password, made and written there (owner-only) when the "
                        "file is missing (default ./NAME-password)")
    server.set_defaults(func=_cmd_server)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["search"]:  # everything after `search` belongs to the search (its own --help included)
        from emotune.search.driver import main as search_main

        return search_main(argv[1:])
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow options too (argparse stops collecting positionals at the first option)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
