#!/usr/bin/env bash
# Set-up command 1: create the environment if missing, then run the main job on the embedded default: a
# search over offline encoder pairs and head settings (space=encoders, the search's default space) on the
# synthetic Spanish demo corpus (built on first use). Extra arguments are configuration overrides, e.g.
#   scripts/demo.sh search.num_samples=20 search.name=encoders-20    # a bigger search under a name of its own
source "$(dirname "$0")/_env.sh"
cd "$ROOT"
# the search names this script, not python -m, when it suggests a command to type
EMOTUNE_COMMAND="scripts/demo.sh" exec python -m emotune.search "$@"
