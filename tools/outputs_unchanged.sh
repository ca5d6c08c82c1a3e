#!/usr/bin/env bash
# Prove that a refactor left the outputs unchanged: run this on the previous head and on the new
# tree with the SAME checkpoint directory, then compare the fingerprints.
#
#   tools/outputs_unchanged.sh TREE OUT CKPTS
#
#   git -C /work/main worktree add /work/wt-base <previous head>
#   tools/outputs_unchanged.sh /work/wt-base /work/outputs-base /work/outputs-ckpts   # writes CKPTS once
#   tools/outputs_unchanged.sh /work/main    /work/outputs-new  /work/outputs-ckpts   # reuses them
#   diff /work/outputs-base/fingerprint.txt /work/outputs-new/fingerprint.txt         # empty: unchanged
#
# Everything runs with TREE's code (cwd TREE, PYTHONPATH=TREE, so TREE wins over an editable
# install; checked), with $PYTHON (default /work/main/.venv/bin/python), on the CPU, torch at 2
# threads, no Ray. OUT must not exist or be empty. Steps, each logged to OUT/logs/:
#   1. the demo data (python -m pipelines.builders.demo --out OUT/demo), sharded into OUT/shards;
#   2. unless CKPTS holds them already, three seeded full checkpoints written with TREE's code (do
#      this with the OLD tree; CKPTS/written-by.txt says which): simplematch.pt (resnet18, random
#      weights, 64 px, decoder_channels 32, multi-scale) and baseline.pt (configs/baseline_demo.yaml's
#      model section, random weights); the zero-shot model needs no file
#      (zero-shot:dinov2_vits14, --backbone-weights random, 56 px);
#   3. python -m sm_eval on the test split of OUT/shards for each of the three, 6 match pictures,
#      into OUT/eval-{simplematch,baseline,zero-shot};
#   4. python -m sm_eval.match for each of the three on demo images cat_0000.jpg -> cat_0001.jpg
#      with --grid 5, into OUT/match-{simplematch,baseline,zero-shot};
#   5. OUT/fingerprint.txt, "sha256  path relative to OUT", sorted: every file of demo/ and shards/,
#      each eval's predictions.parquet, pck_curve.png and matches/*.png, each match's matches.png
#      and matches.json, and the checkpoints (as CKPTS/NAME). Left out: logs/ (timestamps),
#      report.json and report.md (they hold run times and the OUT, CKPTS and shard paths).
#      matches.json holds the image and checkpoint paths, so it is hashed with OUT, CKPTS and TREE
#      replaced by the words $OUT, $CKPTS, $TREE ("matches.json[paths-replaced]"); the PCK numbers
#      of report.json are hashed on their own ("report.json[alphas,data,results]": alphas, data
#      without the shard path, each model's name, kind, localizer, image size and results).
# A run takes about 1.5 minutes on 2 CPU cores (the first, writing CKPTS, a few seconds more).
set -euo pipefail

if [[ $# -ne 3 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
PYTHON=${PYTHON:-/work/main/.venv/bin/python}
TREE=$(realpath -e "$1")
OUT=$(realpath -m "$2")
CKPTS=$(realpath -m "$3")
THREADS=2
KINDS=(simplematch baseline zero-shot)

if [[ -e "$OUT" && -n "$(ls -A "$OUT")" ]]; then
    echo "outputs_unchanged: $OUT exists and is not empty; give a new directory" >&2
    exit 2
fi
mkdir -p "$OUT/logs" "$CKPTS"
started=$(date +%s)

# Run "$@" with TREE's code: cwd TREE, TREE first on the path. Output to OUT/logs/$log.log.
in_tree() {
    local log=$1
    shift
    if ! (cd "$TREE" && PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$@") >"$OUT/logs/$log.log" 2>&1; then
        echo "outputs_unchanged: step $log failed; its log, $OUT/logs/$log.log, ends:" >&2
        tail -n 30 "$OUT/logs/$log.log" >&2
        exit 1
    fi
}
step() { echo "[$(($(date +%s) - started)) s] $*"; }

in_tree where -c 'import pipelines, sm_eval, sm_model; print(sm_model.__file__, sm_eval.__file__, pipelines.__file__)'
for package in $(cat "$OUT/logs/where.log"); do
    if [[ $package != "$TREE"/* ]]; then
        echo "outputs_unchanged: $package is imported from outside $TREE" >&2
        exit 1
    fi
done
commit=$(git -C "$TREE" rev-parse HEAD 2>/dev/null || echo unknown)
step "tree $TREE (commit $commit, $(git -C "$TREE" status --porcelain --untracked-files=no 2>/dev/null | wc -l) changed files), python $PYTHON"

step "1. demo data and shards"
in_tree demo -m pipelines.builders.demo --out "$OUT/demo"
in_tree shard -m pipelines.shard demo --root "$OUT/demo" --out "$OUT/shards" --workers 2

if [[ -f "$CKPTS/simplematch.pt" && -f "$CKPTS/baseline.pt" ]]; then
    step "2. checkpoints: reusing those in $CKPTS ($(head -n 1 "$CKPTS/written-by.txt" 2>/dev/null || echo 'no written-by.txt'))"
else
    step "2. checkpoints: writing them into $CKPTS with $TREE"
    in_tree checkpoints - "$CKPTS" <<'EOF'
import sys
from pathlib import Path

import torch

from sm_model.checkpoint import save_checkpoint
from sm_model.config import ModelConfig
from sm_model.registry import build_model
from sm_train.config import load_config

ckpts = Path(sys.argv[1])
simplematch = ModelConfig(
    kind="simplematch", backbone="resnet18", weights=None, image_size=64, finetune="full",
    decoder_channels=32, decoder_dropout=0.0, window_size=9, coarse_window_sizes=(None, 7), multiscale=True,
)
baseline = load_config("configs/baseline_demo.yaml").model  # random weights (weights: null)
assert baseline.kind == "baseline" and baseline.weights is None, baseline
for name, config in (("simplematch.pt", simplematch), ("baseline.pt", baseline)):
    if (ckpts / name).exists():
        print(f"{name}: kept")
        continue
    torch.manual_seed(0)
    save_checkpoint(build_model(config), ckpts / name)  # a full checkpoint
    print(f"{name}: written, {config}")
EOF
    {
        echo "written by $TREE at commit $commit (tools/outputs_unchanged.sh)"
        cat "$OUT/logs/checkpoints.log"
    } >"$CKPTS/written-by.txt"
fi

model_args() {  # the --model options of one kind
    case $1 in
        simplematch) echo "--model $CKPTS/simplematch.pt" ;;
        baseline) echo "--model $CKPTS/baseline.pt" ;;
        zero-shot) echo "--model zero-shot:dinov2_vits14 --backbone-weights random --image-size 56" ;;
    esac
}

for kind in "${KINDS[@]}"; do
    step "3. sm_eval $kind"
    # shellcheck disable=SC2046  # model_args splits into options on purpose (no spaces in the paths)
    in_tree "eval-$kind" -m sm_eval $(model_args "$kind") --shards "$OUT/shards" --split test \
        --out "$OUT/eval-$kind" --matches 6 --device cpu --threads "$THREADS" --loader-workers 0 --no-progress
done

SRC_IMAGE=$OUT/demo/JPEGImages/cat/cat_0000.jpg
TRG_IMAGE=$OUT/demo/JPEGImages/cat/cat_0001.jpg
for kind in "${KINDS[@]}"; do
    step "4. sm_eval.match $kind"
    # shellcheck disable=SC2046
    in_tree "match-$kind" -m sm_eval.match $(model_args "$kind") "$SRC_IMAGE" "$TRG_IMAGE" --grid 5 \
        --out "$OUT/match-$kind" --device cpu --threads "$THREADS"
done

step "5. fingerprint"
"$PYTHON" - "$OUT" "$CKPTS" "$TREE" "${KINDS[@]}" >"$OUT/fingerprint.txt" <<'EOF'
import hashlib
import json
import sys
from pathlib import Path

out, ckpts, tree = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
kinds = sys.argv[4:]
lines = []


def add(name: str, data: bytes) -> None:
    lines.append(f"{hashlib.sha256(data).hexdigest()}  {name}")


def add_files(paths) -> None:
    for path in paths:
        add(path.relative_to(out).as_posix(), path.read_bytes())


for folder in ("demo", "shards"):
    add_files(p for p in (out / folder).rglob("*") if p.is_file())
for name in ("simplematch.pt", "baseline.pt"):
    add(f"CKPTS/{name}", (ckpts / name).read_bytes())
for kind in kinds:
    evaluation = out / f"eval-{kind}"
    add_files([evaluation / "predictions.parquet", evaluation / "pck_curve.png", *(evaluation / "matches").glob("*.png")])
    report = json.loads((evaluation / "report.json").read_text())
    numbers = {
        "alphas": report["alphas"],
        "data": {key: value for key, value in report["data"].items() if key != "shards"},
        "models": [{key: model.get(key) for key in ("name", "kind", "localizer", "image_size", "results")} for model in report["models"]],
    }
    add(f"eval-{kind}/report.json[alphas,data,results]", json.dumps(numbers, sort_keys=True).encode())
    match = out / f"match-{kind}"
    add_files([match / "matches.png"])
    text = (match / "matches.json").read_text()
    for path, word in sorted(((out, "$OUT"), (ckpts, "$CKPTS"), (tree, "$TREE")), key=lambda pw: -len(str(pw[0]))):
        text = text.replace(str(path), word)
    add(f"match-{kind}/matches.json[paths-replaced]", text.encode())
lines.sort(key=lambda line: line.split("  ", 1)[1])
print("\n".join(lines))
EOF
step "done: $(wc -l <"$OUT/fingerprint.txt") entries in $OUT/fingerprint.txt"
