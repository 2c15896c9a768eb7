#!/usr/bin/env bash
# Run ernie_jax on a GKE TPU cluster through xpk (https://github.com/AI-Hypercomputer/xpk).
#
#   tpu/xpk.sh --cluster my-cluster --type v5p-128 --image IMAGE --config configs/ernie45_21b_a3b.yaml \
#              --workdir gs://bucket/runs/exp1 [--num-slices 1] [--set key=value ...] [--dry-run]
#
# IMAGE is a container with ernie_jax and jax[tpu] installed (tpu/Dockerfile builds one).
# With --num-slices N > 1 the mesh splits data parallelism across the slices (mesh.dcn.data=N; expert
# and tensor parallelism stay inside a slice) unless a --set names mesh.dcn.* itself.
# tpu/jobset.yaml is the equivalent plain Kubernetes JobSet for clusters without xpk.
set -euo pipefail
cluster="" type="" image="" config="" workdir="" slices=1 dry=0 name="ernie-$(date +%m%d-%H%M)"
sets=""
while [ $# -gt 0 ]; do
  case $1 in
    --cluster) cluster=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --num-slices) slices=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --set) sets+=" --set $(printf '%q' "$2")"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    *) echo "error: unknown option $1" >&2; exit 2 ;;
  esac
done
for v in cluster type image config workdir; do
  [ -n "${!v}" ] || { echo "error: tpu/xpk.sh needs --$v" >&2; exit 2; }
done
[[ "$slices" =~ ^[1-9][0-9]*$ ]] || { echo "error: --num-slices $slices must be a positive integer" >&2; exit 2; }
if [ "$slices" -gt 1 ] && [[ "$sets" != *mesh.dcn.* ]]; then sets+=" --set mesh.dcn.data=$slices"; fi
cmd=(xpk workload create --cluster "$cluster" --workload "$name" --tpu-type "$type" --num-slices "$slices"
     --docker-image "$image"
     --command "ERNIE_JAX_DISTRIBUTED=auto python3 -m ernie_jax.train --config $config --workdir $workdir$sets")
show() { local out="" a; for a in "$@"; do case $a in *[[:space:]\'\"\$\&\>]*) out+=" '${a//\'/\'\\\'\'}'" ;; *) out+=" $a" ;; esac; done; echo "${out# }"; }
if [ $dry = 1 ]; then show "${cmd[@]}"; else "${cmd[@]}"; fi
