#!/usr/bin/env bash
# Set-up command 1: create the environment if missing, then run the main job on the embedded default: a
# search over offline encoder pairs and head settings on the synthetic Spanish demo corpus (built on first
# use). Extra arguments are configuration overrides, e.g. scripts/demo.sh search.num_samples=20
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
python -m emotune.search space=encoders "$@"
