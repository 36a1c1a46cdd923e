#!/usr/bin/env bash
# From nothing to a compressed checkpoint on a Cloud TPU VM (single host or multi-host pod).
#
#   tpu/launch.sh --project P --zone Z --type T --name N --recipe R [options]
#
#   --project P          Google Cloud project (default: gcloud's configured project)
#   --zone Z             TPU zone, e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-b (v6e)
#   --type T             accelerator type: v4-8, v4-32, v5litepod-16, v6e-16, ...
#   --name N             TPU VM name (also the name of the local result folder)
#   --recipe R           recipe file in this checkout, e.g. tpu/recipes/digits-cnn-prune-qat.yaml
#   --version V          TPU VM runtime (default tpu-ubuntu2204-base)
#   --model-parallel M   devices per model shard (default 1: data parallel)
#   --steps S            training steps (default: the recipe's)
#   --out DIR            where the job writes on the workers (default ~/jaxshrink-out; a gs://
#                        bucket puts the multi-host orbax checkpoint in one place)
#   --spot               create a Spot VM
#   --keep               leave the VM running at the end (default: delete it, even on failure)
#
# Steps: create the VM; copy this checkout to every worker (scp --worker=all); install
# jaxshrink with jax[tpu] on every worker; run `python -m jaxshrink.podjob` on all workers at
# once (ssh --worker=all: jax.distributed finds the other workers from the TPU metadata);
# copy worker 0's compact checkpoint and result.json to ./tpu-out/NAME/; delete the VM.
set -euo pipefail

project="" zone="" type="" name="" recipe="" version="tpu-ubuntu2204-base"
model_parallel=1 steps="" out="jaxshrink-out" spot=0 keep=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --type) type="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --recipe) recipe="$2"; shift 2 ;;
    --version) version="$2"; shift 2 ;;
    --model-parallel) model_parallel="$2"; shift 2 ;;
    --steps) steps="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "launch.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in zone type name recipe; do
  [[ -n "${!v}" ]] || { echo "launch.sh: --$v is required (see --help)" >&2; exit 2; }
done
[[ -f "$recipe" ]] || { echo "launch.sh: recipe $recipe not found" >&2; exit 2; }
[[ "$model_parallel" =~ ^[1-9][0-9]*$ ]] || {
  echo "launch.sh: --model-parallel must be a positive integer; got $model_parallel" >&2; exit 2; }

gc=(gcloud compute tpus tpu-vm)
flags=(--zone "$zone")
[[ -n "$project" ]] && flags+=(--project "$project")
root="$(cd "$(dirname "$0")/.." && pwd)"
recipe_rel="$(realpath --relative-to="$root" "$recipe")"

cleanup() { [[ $keep -eq 1 ]] || "${gc[@]}" delete "$name" "${flags[@]}" --quiet || true; }
trap cleanup EXIT

create=("${gc[@]}" create "$name" "${flags[@]}" --accelerator-type "$type" --version "$version")
[[ $spot -eq 1 ]] && create+=(--spot)
"${create[@]}"

# 1. Copy this checkout to every worker.
tar -C "$root" --exclude=.git --exclude='.venv*' --exclude=tpu-out -czf /tmp/jaxshrink-src.tgz .
"${gc[@]}" scp /tmp/jaxshrink-src.tgz "$name":~/ "${flags[@]}" --worker=all

# 2. Install on every worker; each prints its local chips.
"${gc[@]}" ssh "$name" "${flags[@]}" --worker=all --command \
  'mkdir -p jaxshrink && tar -xzf jaxshrink-src.tgz -C jaxshrink && cd jaxshrink &&
   python3 -m venv .venv && . .venv/bin/activate &&
   pip install -q -e . "jax[tpu]>=0.10,<0.11" &&
   python -c "import jax; print(jax.local_devices())"'

# 3. The pod job on all workers at once (no coordinator flags: JAX reads the TPU metadata).
job="python -m jaxshrink.podjob --recipe '$recipe_rel' --out '$out' --model-parallel $model_parallel"
[[ -n "$steps" ]] && job+=" --steps $steps"
"${gc[@]}" ssh "$name" "${flags[@]}" --worker=all --command \
  "cd jaxshrink && . .venv/bin/activate && JAX_LOG_COMPILES=${JAX_LOG_COMPILES:-0} $job"

# 4. Collect: worker 0 holds the compact checkpoint and result.json.
mkdir -p "tpu-out/$name"
if [[ "$out" == gs://* ]]; then
  gcloud storage cp -r "$out/compact" "$out/result.json" "tpu-out/$name/"
else
  "${gc[@]}" scp --recurse "$name:~/jaxshrink/$out/compact" "$name:~/jaxshrink/$out/result.json" \
    "tpu-out/$name/" "${flags[@]}" --worker=0
fi
echo "compact checkpoint in ./tpu-out/$name/compact (jaxshrink eval / inspect it here)"
