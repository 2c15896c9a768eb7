#!/usr/bin/env bash
# TPU VM pod slices for ernie_jax: create, install, launch, logs, stop.
#
#   tpu/pod.sh create  --name ernie --zone us-east5-a --type v5p-64 [--version v2-alpha-tpuv5]
#   tpu/pod.sh install --name ernie --zone us-east5-a [--repo URL | --wheel dist/ernie_jax-*.whl]
#   tpu/pod.sh launch  --name ernie --zone us-east5-a --config configs/ernie45_21b_a3b.yaml \
#                      --workdir gs://bucket/runs/exp1 [--set mesh.fsdp=-1 --set mesh.data=1 ...]
#   tpu/pod.sh logs    --name ernie --zone us-east5-a
#   tpu/pod.sh stop    --name ernie --zone us-east5-a      (stops the job; add --delete to delete the VM)
#
# Every command accepts --dry-run: print the gcloud commands instead of running them.
# launch runs `python -m ernie_jax.train` on every worker at once with ERNIE_JAX_DISTRIBUTED=auto,
# so jax.distributed discovers the slice; only worker 0 writes metrics and logs.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[ $# -ge 1 ] || usage
action=$1; shift
name="" zone="" type="" version="tpu-ubuntu2204-base" config="" workdir="" repo="" wheel="" dry=0 delete=0
project_flag=()
sets=()
while [ $# -gt 0 ]; do
  case $1 in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --type) type=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project_flag=(--project "$2"); shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --repo) repo=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    --set) sets+=(--set "$2"); shift 2 ;;
    --dry-run) dry=1; shift ;;
    --delete) delete=1; shift ;;
    -h|--help) usage ;;
    *) echo "error: unknown option $1 (see tpu/pod.sh --help)" >&2; exit 2 ;;
  esac
done
need() { for v in "$@"; do [ -n "${!v}" ] || { echo "error: $action needs --$v" >&2; exit 2; }; done; }
show() { local out="" a; for a in "$@"; do case $a in *[[:space:]\'\"\$\&\>]*) out+=" '${a//\'/\'\\\'\'}'" ;; *) out+=" $a" ;; esac; done; echo "${out# }"; }
run() { if [ $dry = 1 ]; then show "$@"; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=all --command "$1"; }

need name zone
case $action in
  create)
    need type
    run gcloud compute tpus tpu-vm create "$name" --zone "$zone" "${project_flag[@]}" \
      --accelerator-type "$type" --version "$version" ;;
  install)
    if [ -n "$wheel" ]; then
      run gcloud compute tpus tpu-vm scp "$wheel" "$name:~/" --zone "$zone" "${project_flag[@]}" --worker=all
      ssh_all "python3 -m pip install -U 'jax[tpu]' ~/$(basename "$wheel")"
    else
      need repo
      ssh_all "rm -rf ~/ernie_jax && git clone --depth 1 $repo ~/ernie_jax && python3 -m pip install -U 'jax[tpu]' -e ~/ernie_jax"
    fi ;;
  launch)
    need config workdir
    extra=""
    for s in "${sets[@]}"; do extra+=" $(printf '%q' "$s")"; done
    ssh_all "cd ~/ernie_jax && ERNIE_JAX_DISTRIBUTED=auto nohup python3 -m ernie_jax.train --config $config --workdir $workdir$extra > ~/ernie_jax_train.log 2>&1 &" ;;
  logs)
    run gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" "${project_flag[@]}" --worker=0 \
      --command "tail -f ~/ernie_jax_train.log" ;;
  stop)
    # SIGTERM: each worker finishes its step, the job saves a checkpoint and exits 0
    ssh_all "pkill -TERM -f ernie_jax.train || true"
    if [ $delete = 1 ]; then run gcloud compute tpus tpu-vm delete "$name" --zone "$zone" "${project_flag[@]}" --quiet; fi ;;
  *) usage ;;
esac
