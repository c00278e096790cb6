#!/usr/bin/env bash
# Every data-driven method on models trained on your own data, from packaged assets only (no hub):
#   experts of MiniLM (LoRA) trained on a task file the project never shipped -> MERGE search -> routed model;
#   RegMean with task data and TIES; all scored on your tasks against your experts.
# Usage: examples/your_own_models/walkthrough.sh [WORKDIR]   (about 5 minutes on 2 cores; needs `make setup`)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
nm="${NEUROMERGE:-$here/../../.venv/bin/neuromerge}"
py="${PYTHON:-$here/../../.venv/bin/python}"
work="${1:-own-models-walkthrough}"
mkdir -p "$work" && cd "$work"
export HF_HUB_OFFLINE=1

"$py" "$here/make_tasks.py" my-tasks
# 1. train (or reuse from the cache) one LoRA expert of the text suite's MiniLM per task, and export them
"$nm" export-experts text -o exp --quick --mode lora --task-file my-tasks/tasks.yaml --tasks objects,mood --force
# 2. MERGE: search the per-component partitions, then build the routed model of the most accurate point
cat > search.yaml <<YAML
base: exp/base
tasks: exp/tasks.yaml
experts: {objects: exp/experts/objects, mood: exp/experts/mood}
YAML
resume=(); [ -f srch/search-config.json ] && resume=(--resume)   # a rerun continues the recorded search
"$nm" search search.yaml -o srch --budget 30 --no-progress "${resume[@]}"
printf 'search: srch\npoint: high accuracy\n' > routed-merge.yaml
"$nm" route build merge --config routed-merge.yaml -o routed-merge --force
# 3. static TIES (exp/merge.yaml) and data-aware RegMean (the same models, a task per model, data: the task file)
"$nm" merge exp/merge.yaml -o ties --force --no-progress
cat > regmean.yaml <<YAML
merge_method: regmean
base_model: exp/base
models:
  - {model: exp/experts/objects, task: objects}
  - {model: exp/experts/mood, task: mood}
data: exp/tasks.yaml
YAML
"$nm" merge regmean.yaml -o regmean --force --no-progress
# 4. score everything on your tasks, normalised against your experts
"$nm" evaluate search.yaml --model ties --model regmean --model routed-merge -o eval --force --no-progress
cat eval/results.md
