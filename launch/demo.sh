#!/usr/bin/env bash
# End-to-end demo on the embedded default: the tiny debug model trained on the sample corpus shipped
# in data_pipeline/samples, on CPU, W&B offline. Installs into the repository's .venv first if it is
# not there.
#   1. tokenise the corpus into Megatron .bin/.idx shards
#   2. train 40 steps, with the validation loss on 5% held-out documents every 10 steps,
#      "preempted" after step 20 (train.exit_at_step) -> checkpoint
#   3. rerun the same command: it resumes from step 20 and finishes
#   4. evaluate the checkpoint; 5. export it to Hugging Face format and evaluate the export
# The run folder RUN (default runs/demo) is relative to the folder you call this from; so is VENV
# when you set it (default: .venv in the repository).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
case "$VENV" in /*) ;; *) VENV=$PWD/$VENV ;; esac
RUN=${RUN:-runs/demo}
CORPUS=$REPO/data_pipeline/samples/corpus.jsonl

pip_install() {  # pip's progress as one line per package fetched; the full log goes to pip.log
  local log=$VENV/pip.log
  "$VENV/bin/pip" install --progress-bar off "$@" 2>&1 | tee -a "$log" | awk '
    /^Collecting /                      { printf "  collecting %s\n", $2; fflush() }
    /^Processing .*\.whl/               { n = split($2, p, "/"); printf "  unpacking %s\n", p[n]; fflush() }
    /Downloading .*\.whl \([0-9.]+ MB\)/ { printf "  downloading %s %s %s\n", $2, $3, $4; fflush() }
    /^Successfully installed/           { printf "  installed %d packages\n", NF - 2; fflush() }' \
    || { echo "pip install $* failed; the last lines of $log:" >&2; tail -n 20 "$log" >&2; exit 1; }
}

if [ ! -x "$VENV/bin/megaqwen-train" ]; then
  echo "== 0/5 installing megaqwen into $VENV (CPU torch 2.13.0 first: ~200 MB, a few minutes)"
  python3 -m venv "$VENV"
  pip_install torch==2.13.0
  pip_install -e "$REPO"
  echo "   done in ${SECONDS}s"
fi
export PATH="$VENV/bin:$PATH" WANDB_MODE=offline HF_HUB_OFFLINE=1
rm -rf "$RUN"

echo "== 1/5 tokenise $CORPUS"
echo "   (the corpus plants a few malformed lines on purpose: they are skipped and counted in one line)"
megaqwen-data tokenize --input "$CORPUS" --output-prefix "$RUN/data/sample"

TRAIN=(megaqwen-train "train.out_dir=$RUN" "data.path=$RUN/data/sample" train.steps=40
       train.lr=3e-3 train.min_lr=3e-4 train.warmup_steps=4 train.save_every=10 train.log_every=5
       train.eval_every=10 train.eval_iters=2 data.valid_fraction=0.05 train.exit_at_step=20)
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
import json, os, sys
run = sys.argv[1]
rows = [json.loads(l) for l in open(f"{run}/metrics.jsonl")]
val = [r for r in rows if "val_loss" in r]
native, hf = (json.load(open(f"{run}/{n}")) for n in ("eval.json", "eval_hf.json"))
print(f"\ndemo done: {len(rows)} steps, training loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, "
      f"validation loss {val[0]['val_loss']:.3f} (step {val[0]['step']}) -> {val[-1]['val_loss']:.3f} "
      f"(step {val[-1]['step']}); eval loss native {native['loss']:.4f} / HF export {hf['loss']:.4f} "
      f"on {native['tokens']} tokens")
what = {
    "loss.png": "training and validation loss, learning rate",
    "metrics.jsonl": "one row per step (loss, lr, grad norm, tokens/s, memory; val_loss every 10)",
    "run.json": "resolved config, git revision, command line",
    "checkpoints": "torch.distributed.checkpoint folders + meta.json, `latest` pointer",
    "data": "the tokenised corpus (sample.bin/.idx, .stats.json, .shard.json: its tokenizer)",
    "hf": "Hugging Face export (config.json, generation_config.json, model.safetensors, tokenizer)",
    "eval.json": "eval loss of the final checkpoint", "eval_hf.json": "eval loss of the HF export",
    "wandb": "offline W&B run (wandb sync to upload)", ".hydra": "Hydra's config and overrides",
    "wandb_id.txt": "W&B run id, reused on resume", "main.log": "the trainer's log of both runs",
}
print(f"files in {os.path.abspath(run)}:")
for name in sorted(os.listdir(run)):
    print(f"  {name + ('/' if os.path.isdir(os.path.join(run, name)) else ''):<16} {what.get(name, '')}")
PY
