#!/usr/bin/env bash
# Compress a model with a jaxshrink recipe on a Cloud TPU VM, then bring the checkpoint home.
#
#   tpu/launch.sh --name js-demo --zone us-central2-b --type v4-8 \
#                 --recipe examples/recipes/digits-cnn-bf16.yaml [--project P] [--keep]
#
# Steps: create the VM, copy this checkout, install jaxshrink with jax[tpu] on every worker,
# run `jaxshrink compress` on worker 0, copy the checkpoint back to ./tpu-out/, delete the VM
# (unless --keep). Single-host slices (v4-8, v5litepod-8, v6e-8) run the recipe as is.
set -euo pipefail

name="" zone="" type="" recipe="" project="" version="tpu-ubuntu2204-base" keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --recipe) recipe="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "launch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in name zone type recipe; do
  [[ -n "${!v}" ]] || { echo "launch.sh: --$v is required (see --help)" >&2; exit 2; }
done
[[ -f "$recipe" ]] || { echo "launch.sh: recipe $recipe not found" >&2; exit 2; }

gc=(gcloud compute tpus tpu-vm)
flags=(--zone "$zone")
[[ -n "$project" ]] && flags+=(--project "$project")
root="$(cd "$(dirname "$0")/.." && pwd)"

cleanup() { [[ $keep -eq 1 ]] || "${gc[@]}" delete "$name" "${flags[@]}" --quiet || true; }
trap cleanup EXIT

"${gc[@]}" create "$name" "${flags[@]}" --accelerator-type "$type" --version "$version"
tar -C "$root" --exclude=.git --exclude='.venv*' -czf /tmp/jaxshrink-src.tgz .
"${gc[@]}" scp /tmp/jaxshrink-src.tgz "$name":~/ "${flags[@]}" --worker=all
"${gc[@]}" ssh "$name" "${flags[@]}" --worker=all --command \
  'mkdir -p jaxshrink && tar -xzf jaxshrink-src.tgz -C jaxshrink && cd jaxshrink &&
   python3 -m venv .venv && . .venv/bin/activate &&
   pip install -q -e . "jax[tpu]>=0.10,<0.11" && python -c "import jax; print(jax.devices())"'
"${gc[@]}" ssh "$name" "${flags[@]}" --worker=0 --command \
  "cd jaxshrink && . .venv/bin/activate && jaxshrink compress '$recipe' --out tpu-out --overwrite &&
   jaxshrink inspect tpu-out"
mkdir -p tpu-out
"${gc[@]}" scp --recurse "$name":~/jaxshrink/tpu-out ./tpu-out/"$name" "${flags[@]}" --worker=0
echo "checkpoint copied to ./tpu-out/$name"
