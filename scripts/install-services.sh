#!/usr/bin/env bash
# Debian packages the test suite's real services need: Slurm (slurmctld, slurmd, sbatch) and munge.
# Runs only as root with apt-get; idempotent (nothing to do once installed) and quiet.
# The Slurm tests start their own one-node cluster on 127.0.0.1 (tests/slurm_fixture.py).
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
if command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
   && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
