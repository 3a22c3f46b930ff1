#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying normexp's SLURM launches and for the
# tests marked `slurm` (`make test-slurm`). Also the recipe for a test cluster by hand:
#
#   scripts/slurm_cluster.sh up      # install slurm-wlm and munge if missing (root, apt-get),
#                                    # write the config, start munged, slurmctld, slurmd
#   scripts/slurm_cluster.sh down    # stop the daemons `up` started (none it did not start)
#
# The cluster: slurmctld and slurmd on localhost, one node with this machine's cores and 90% of
# its memory, one partition; ProctrackType=proctrack/linuxproc and TaskPlugin=task/none (no
# cgroups), no accounting. `up` does nothing when `sinfo` already answers.
set -euo pipefail

conf=/etc/slurm/slurm.conf
started=/run/normexp-slurm-started  # the daemons this script started, one name a line

answers() { timeout 5 sinfo -h >/dev/null 2>&1; }

up() {
  if command -v sinfo >/dev/null && answers; then
    echo "slurm_cluster: a SLURM cluster already answers (sinfo); nothing to do" >&2
    return 0
  fi
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
      echo "slurm_cluster: SLURM is not installed; installing it needs root and apt-get" \
        "(apt-get install slurm-wlm munge)" >&2
      exit 2
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "slurm_cluster: starting the daemons needs root" >&2
    exit 2
  fi
  : > "$started"
  if ! pgrep -x munged >/dev/null; then
    [ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 \
      count=1 status=none; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    echo munged >> "$started"
  fi
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$conf" <<EOF
# written by normexp's scripts/slurm_cluster.sh: a one-node test cluster
ClusterName=normexp
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  /usr/sbin/slurmctld && echo slurmctld >> "$started"
  /usr/sbin/slurmd && echo slurmd >> "$started"
  for _ in $(seq 30); do
    if answers && sinfo -h -o %T | grep -qv -e down -e unknown; then
      echo "slurm_cluster: up ($(sinfo -h -o '%N %c cores %m MB %T'))" >&2
      return 0
    fi
    sleep 1
  done
  echo "slurm_cluster: the daemons started but the node is not idle after 30 s" \
    "(see /var/log/slurm/)" >&2
  exit 1
}

down() {
  [ -f "$started" ] || { echo "slurm_cluster: started nothing; nothing to stop" >&2; return 0; }
  local daemon
  for daemon in slurmd slurmctld munged; do
    if grep -qx "$daemon" "$started"; then
      pkill -x "$daemon" || true
    fi
  done
  rm -f "$started"
  echo "slurm_cluster: stopped what it started" >&2
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: scripts/slurm_cluster.sh up|down" >&2; exit 2 ;;
esac
