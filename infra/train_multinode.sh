#!/usr/bin/env bash
# Launch USE training on one node of a multi-node job with torchrun's c10d rendezvous.
# Run the same command on every node (or let SLURM do it: `srun infra/train_multinode.sh ...`).
#
#   NNODES=4 NPROC=8 HEAD=10.0.0.1 infra/train_multinode.sh --config trainer/configs/vitl14.yaml \
#       --shards /data/use/coco --output /data/use/runs/vitl14 --resume
#
# NNODES (default: SLURM_NNODES or 1), NPROC (default: GPUs on this node, else 1),
# HEAD (rendezvous host; default: first host of SLURM_JOB_NODELIST, else localhost), PORT (29500),
# JOB_ID (rendezvous id; default: SLURM_JOB_ID or "use-train"), MAX_RESTARTS (3): a rank that dies
# (node lost, OOM) makes torchrun restart every rank, which continue from the last checkpoint (pass --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then sed -n '2,11p' "$0"; exit 0; fi
NNODES=${NNODES:-${SLURM_NNODES:-1}}
NPROC=${NPROC:-$({ nvidia-smi -L 2>/dev/null || true; } | wc -l)}  # no nvidia-smi: 0 (pipefail)
[[ "$NPROC" -gt 0 ]] || NPROC=1
if [[ -z "${HEAD:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
HEAD=${HEAD:-localhost}
PORT=${PORT:-29500}
JOB_ID=${JOB_ID:-${SLURM_JOB_ID:-use-train}}
MAX_RESTARTS=${MAX_RESTARTS:-3}
PY=${PY:-.venv/bin/python}
# A fresh store for every restart round. torchrun's c10d rendezvous otherwise hands the ranks of every
# round the same agent-hosted TCPStore, whose keys from the round before are still there: a restarted
# rank can read a dead peer's gloo/NCCL address and hang in process-group creation until the timeout
# (pytorch/pytorch#135712; seen here under load after a killed rank).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
echo "[train] nodes=$NNODES procs/node=$NPROC rendezvous=$HEAD:$PORT id=$JOB_ID" >&2
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$HEAD:$PORT" --rdzv_id="$JOB_ID" --max-restarts="$MAX_RESTARTS" \
  -m trainer train "$@"
