#!/usr/bin/env bash
# End-to-end demo on the embedded default: the tiny debug model trained on the sample corpus shipped
# in data_pipeline/samples, on CPU, W&B offline. Installs into .venv first if it is not there.
#   1. tokenise the corpus into Megatron .bin/.idx shards
#   2. train 40 steps, "preempted" after step 20 (train.exit_at_step) -> checkpoint
#   3. rerun the same command: it resumes from step 20 and finishes
#   4. evaluate the checkpoint; 5. export it to Hugging Face format and evaluate the export
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/megaqwen-train" ]; then
  echo "== installing megaqwen into $VENV (CPU torch 2.13.0)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -e .
fi
export PATH="$PWD/$VENV/bin:$PATH" WANDB_MODE=offline HF_HUB_OFFLINE=1
RUN=${RUN:-runs/demo}
CORPUS=data_pipeline/samples/corpus.jsonl
rm -rf "$RUN"

echo "== 1/5 tokenise $CORPUS"
megaqwen-data tokenize --input "$CORPUS" --output-prefix "$RUN/data/sample"

TRAIN=(megaqwen-train "train.out_dir=$RUN" "data.path=$RUN/data/sample" train.steps=40
       train.lr=3e-3 train.min_lr=3e-4 train.warmup_steps=4 train.save_every=10 train.log_every=5
       train.exit_at_step=20)
echo "== 2/5 train the debug model (stops after step 20, as if preempted)"
"${TRAIN[@]}"
echo "== 3/5 the same command again: resumes from the step-20 checkpoint"
"${TRAIN[@]}"

echo "== 4/5 evaluate the final checkpoint (first 64 documents of the corpus)"
megaqwen-eval loss --checkpoint "$RUN" --data "$CORPUS" --max-len 512 --max-docs 64 | tee "$RUN/eval.json"

echo "== 5/5 export to Hugging Face format and evaluate the export"
megaqwen-convert to-hf "$RUN" "$RUN/hf"
megaqwen-eval loss --checkpoint "$RUN/hf" --data "$CORPUS" --max-len 512 --max-docs 64 | tee "$RUN/eval_hf.json"

python3 - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
native, hf = (json.load(open(f"{run}/{n}")) for n in ("eval.json", "eval_hf.json"))
print(f"\ndemo done: {len(rows)} steps, loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}; "
      f"eval loss native {native['loss']:.4f} / HF export {hf['loss']:.4f} on {native['tokens']} tokens")
print(f"run folder: {run} (metrics.jsonl, run.json, checkpoints/, wandb/ offline run, hf/)")
PY
