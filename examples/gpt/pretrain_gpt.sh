#!/usr/bin/env bash
# Train a GPT with Megatron-style flags through msrun (document 002's pretrain_gpt.sh).
#   bash examples/gpt/pretrain_gpt.sh                  tiny GPT on CPU, 2 workers, the bundled corpus
#   WORKERS=4 MASTER_PORT=9000 bash examples/gpt/pretrain_gpt.sh --tensor-model-parallel-size 2
#   CONFIG=examples/gpt/configs/tiny_llama.yaml bash examples/gpt/pretrain_gpt.sh   model and training from YAML
# Extra arguments are appended to the flags below (later flags win). Logs: $LOG_DIR/worker_*.log.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

WORKERS=${WORKERS:-2}
MASTER_PORT=${MASTER_PORT:-8848}
LOG_DIR=${LOG_DIR:-msrun_log}
export GLOG_v=${GLOG_v:-3}   # MindSpore's own INFO/WARNING chatter off

GPT_ARGS="
    --num-layers 2
    --hidden-size 64
    --num-attention-heads 4
    --seq-length 64
    --max-position-embeddings 64
    --micro-batch-size 4
    --global-batch-size 8
    --lr 2e-3
    --min-lr 2e-4
    --lr-decay-style cosine
    --lr-warmup-iters 4
    --weight-decay 0.01
    --clip-grad 1.0
    --train-iters 100
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --seed 1234
"
DATA_ARGS="
    --data-path $HERE/data/corpus_text_document
    --split 949,50,1
    --tokenizer-type GPT2BPETokenizer
    --vocab-file $HERE/data/vocab.json
    --merge-file $HERE/data/merges.txt
"
OUTPUT_ARGS="
    --log-interval 10
    --eval-interval 50
    --eval-iters 2
"
if [ -n "${CONFIG:-}" ]; then   # the YAML file sets the model and the training; data and output stay here
    GPT_ARGS="--yaml-cfg $CONFIG"
    OUTPUT_ARGS=""
fi

msrun --worker_num "$WORKERS" --local_worker_num "$WORKERS" --master_port "$MASTER_PORT" \
      --log_dir "$LOG_DIR" --join=True --cluster_time_out=300 \
      "$HERE/pretrain_gpt.py" $GPT_ARGS $DATA_ARGS $OUTPUT_ARGS "$@"
echo "logs: $LOG_DIR/worker_*.log"
grep -h "Step:" "$LOG_DIR/worker_$((WORKERS - 1)).log" | sed -n '1p;$p' || true   # the last rank logs
