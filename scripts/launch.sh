#!/usr/bin/env bash
# Start a jaxrl-entropy run on a Cloud TPU VM slice (every worker) or on one GPU node.
#
#   scripts/launch.sh tpu-create    # the slice:            gcloud compute tpus tpu-vm create
#   scripts/launch.sh tpu-install   # every worker:         Python >= 3.11, a venv, this repository, '.[tpu,gcs]'
#   scripts/launch.sh tpu-weights   # every worker:         the HF checkpoint from GCS onto its local disk
#   scripts/launch.sh tpu-train     # every worker:         the same `jaxrl-entropy train --multihost` command
#   scripts/launch.sh gpu-install   # this GPU node:        a venv with '.[cuda,gcs]'
#   scripts/launch.sh gpu-train     # this GPU node:        `jaxrl-entropy train` on all its GPUs
#   scripts/launch.sh worker-command  # print what tpu-train runs on each worker (nothing is started)
#
# Settings come from the environment (defaults in brackets):
#   TPU [rl]  ZONE [us-east5-a]  ACCELERATOR [v5p-64]  RUNTIME [v2-alpha-tpuv5]  PROJECT [gcloud's default]
#   REPO [https://github.com/<you>/jaxrl-entropy.git]  REF [main]  CHECKOUT [~/jaxrl-entropy]  VENV [.venv]
#   PYTHON [python3.11]
#   CONFIG [configs/qwen3_8b_dapo.py:full,v5p-64]   the preset and variant,slice (configs/*.py)
#   WORKDIR [gs://$BUCKET/runs/<variant>]           run directory (gs:// or a shared disk)
#   BUCKET                                          a GCS bucket holding the weights and data
#   MODEL [Qwen3-<size>-Base, from CONFIG's name]   the HF checkpoint's directory name
#   HF_GCS [gs://$BUCKET/ckpt/$MODEL]               the HF checkpoint on GCS (tpu-weights copies it)
#   HF_DIR [/tmp/ckpt/<its name>]                   where the checkpoint lies on every worker (local disk)
#   DATA [gs://$BUCKET/data]                        dapo-math-17k.parquet and the six evaluation files
#   EXTRA []                                        more flags for train (--config.KEY=VALUE ...)
#
# Runtimes by TPU generation: v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v6e v2-alpha-tpuv6e.
set -euo pipefail

TPU=${TPU:-rl}
ZONE=${ZONE:-us-east5-a}
ACCELERATOR=${ACCELERATOR:-v5p-64}
RUNTIME=${RUNTIME:-v2-alpha-tpuv5}
REPO=${REPO:-https://github.com/<you>/jaxrl-entropy.git}
REF=${REF:-main}
CHECKOUT=${CHECKOUT:-'~/jaxrl-entropy'}
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
CONFIG=${CONFIG:-configs/qwen3_8b_dapo.py:full,v5p-64}
BUCKET=${BUCKET:-my-bucket}
SIZE=$(basename "${CONFIG%%:*}" | sed -n 's/^qwen3_\(.*\)_dapo\.py$/\1/p')   # configs/qwen3_1.7b_dapo.py -> 1.7b
MODEL=${MODEL:-Qwen3-$(printf '%s' "${SIZE:-8b}" | tr b B)-Base}
HF_GCS=${HF_GCS:-gs://$BUCKET/ckpt/$MODEL}
HF_DIR=${HF_DIR:-/tmp/ckpt/$(basename "$HF_GCS")}
DATA=${DATA:-gs://$BUCKET/data}
VARIANT=${CONFIG#*:}; VARIANT=${VARIANT%%,*}; [ "$VARIANT" = "$CONFIG" ] && VARIANT=full
WORKDIR=${WORKDIR:-gs://$BUCKET/runs/$VARIANT}
EXTRA=${EXTRA:-}
EVAL_SETS="aime24 aime25 amc23 math500 minerva olympiadbench"

gcloud_ssh() {  # gcloud_ssh COMMAND: run COMMAND on every worker of the slice
  gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all --command="$1"
}

benchmarks() {  # aime24=$DATA/aime24.parquet,...: every placeholder of the presets' evaluation
  local out="" name
  for name in $EVAL_SETS; do out+="${out:+,}$name=$DATA/$name.parquet"; done
  printf '%s' "$out"
}

# The command of one process: the venv, then train with every path the presets leave as a placeholder
# (model.hf_dir, data.train_files, eval.benchmarks) set. MULTIHOST=1 adds --multihost (a pod slice).
train_command() {
  printf 'cd %s && . %s/bin/activate && jaxrl-entropy train%s --config=%s --workdir=%s --config.model.hf_dir=%s --config.data.train_files=%s --config.eval.benchmarks=%s%s' \
    "$CHECKOUT" "$VENV" "$([ "${MULTIHOST:-1}" = 1 ] && printf ' --multihost')" "$CONFIG" "$WORKDIR" "$HF_DIR" \
    "$DATA/dapo-math-17k.parquet" "$(benchmarks)" "${EXTRA:+ $EXTRA}"
}

install_command() {  # $1: the extras
  # TPU VM images ship Python 3.10; the project needs >= 3.11 (Ubuntu 22.04 has python3.11 in universe)
  printf '%s' "command -v $PYTHON >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q $PYTHON $PYTHON-venv) && \
([ -d $CHECKOUT ] || git clone $REPO $CHECKOUT) && cd $CHECKOUT && git fetch -q origin && git checkout -q $REF && \
$PYTHON -m venv $VENV && . $VENV/bin/activate && pip install -q -U pip && pip install -q -e '.[$1]' && \
python -c 'import jax; print(jax.devices())'"
}

case "${1:-}" in
  tpu-create)
    gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" ;;
  tpu-install) gcloud_ssh "$(install_command tpu,gcs)" ;;
  tpu-weights) gcloud_ssh "mkdir -p $(dirname "$HF_DIR") && gcloud storage cp -r $HF_GCS $(dirname "$HF_DIR")/" ;;
  tpu-train) gcloud_ssh "$(MULTIHOST=1 train_command)" ;;
  worker-command) MULTIHOST=${MULTIHOST:-1} train_command; echo ;;
  gpu-install) bash -c "$(install_command cuda,gcs)" ;;
  gpu-train) bash -c "$(MULTIHOST=0 train_command)" ;;
  *) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
