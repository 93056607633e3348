#!/usr/bin/env bash
# Set-up command 1: create the environment if missing, then run the main job on the embedded default
# (the synthetic Spanish demo corpus, built offline on first use). Extra arguments are config overrides.
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
emotune check-corpus "$@"
