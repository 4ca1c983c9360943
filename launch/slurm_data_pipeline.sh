#!/usr/bin/env bash
# The data pipeline on a SLURM cluster: one array job per stage, chained with afterok dependencies.
#
#   launch/slurm_data_pipeline.sh cluster [ARRAY_SIZE]         # a shipped config's name, or a YAML path
#
# Each array task runs `megaqwen-data pipeline --stage S --rank slurm`, i.e. tasks r, r+N, r+2N ...
# of the stage (N = array size). Completed tasks leave markers, so resubmitting the script after a
# failure or preemption redoes only what is missing. Single-task stages (dedup, train_scorer,
# recipes, report) run as arrays of one. With dedup.band_tasks > 0 the near-dedup is distributed:
# dedup_bands runs as the input array, dedup_buckets as an array of band_tasks x key_splits, dedup
# as one task. Per-stage partitions/resources via environment:
#   CPU_SBATCH_ARGS  (default "--cpus-per-task=4 --mem=16G --time=12:00:00")
#   GPU_SBATCH_ARGS  for the judge stage when judge.backend is local (default adds --gres=gpu:1)
#   DATA_PIPELINE_STAGES to run a subset, e.g. "annotate shards recipes report"
set -euo pipefail

CONFIG=${1:?usage: $0 CONFIG.yaml [ARRAY_SIZE]}
ARRAY=${2:-64}
CPU_ARGS=${CPU_SBATCH_ARGS:---cpus-per-task=4 --mem=16G --time=12:00:00}
GPU_ARGS=${GPU_SBATCH_ARGS:---cpus-per-task=8 --mem=64G --gres=gpu:1 --time=24:00:00}
STAGES=${DATA_PIPELINE_STAGES:-"filter dedup_bands dedup_buckets dedup judge train_scorer train_domains annotate shards recipes report"}
LOGS=${LOG_DIR:-logs/data_pipeline}
mkdir -p "$LOGS"

read -r judge_backend student band_tasks <<<"$(python - "$CONFIG" <<'PY'
import sys
from megaqwen.data_pipeline.config import load_config
cfg = load_config(sys.argv[1])
print(cfg.judge.backend, int(cfg.domains.backend == "embedding" and cfg.domains.student),
      cfg.dedup.band_tasks * cfg.dedup.key_splits)
PY
)"

dep=""
for stage in $STAGES; do
  case $stage in
    judge|train_scorer) [ "$judge_backend" = none ] && continue ;;
    train_domains) [ "$student" = 0 ] && continue ;;
    dedup_bands|dedup_buckets) [ "$band_tasks" = 0 ] && continue ;;
  esac
  case $stage in
    filter|dedup_bands|judge|annotate|shards) n=$ARRAY ;;
    dedup_buckets) n=$band_tasks ;;
    *) n=1 ;;
  esac
  args=$CPU_ARGS
  if [ "$stage" = judge ] && [ "$judge_backend" = local ]; then args=$GPU_ARGS; fi
  # shellcheck disable=SC2086
  jid=$(sbatch --parsable --job-name="mq-data-$stage" --array=0-$((n - 1)) $args ${dep:+--dependency=afterok:$dep} \
        --output="$LOGS/$stage-%A_%a.out" \
        --wrap="OMP_NUM_THREADS=\${SLURM_CPUS_PER_TASK:-1} megaqwen-data pipeline --config $CONFIG --stage $stage \
                --rank slurm --world $n --workers 1 --no-progress")
  echo "stage $stage: job $jid (array of $n)"
  dep=$jid
done
