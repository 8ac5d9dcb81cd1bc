#!/usr/bin/env bash
# Debian packages the test suite's real services and I/O need: Slurm (slurmctld, slurmd, sbatch)
# and munge, and libaio-dev (DeepSpeed's async I/O op for `cluster.spill: aio` builds against it).
# Runs only as root with apt-get; idempotent (nothing to do once installed) and quiet.
# The Slurm tests start their own one-node cluster on 127.0.0.1 (tests/slurm_fixture.py).
set -euo pipefail
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  exit 0
fi
need=()
if ! { command -v slurmctld && command -v slurmd && command -v sbatch && command -v munged; } >/dev/null 2>&1; then
  need+=(slurm-wlm munge)
fi
if ! dpkg-query -W -f='${Status}' libaio-dev 2>/dev/null | grep -q "install ok installed"; then
  need+=(libaio-dev)
fi
if [ "${#need[@]}" -eq 0 ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
