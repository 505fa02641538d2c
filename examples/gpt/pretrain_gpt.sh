#!/usr/bin/env bash
# Train a GPT with Megatron-style flags through msrun (document 002's pretrain_gpt.sh).
#   bash examples/gpt/pretrain_gpt.sh                  tiny GPT on CPU, 2 workers, the bundled corpus
#   WORKERS=4 MASTER_PORT=9000 bash examples/gpt/pretrain_gpt.sh --tensor-model-parallel-size 2
#   CONFIG=examples/gpt/configs/tiny_llama.yaml bash examples/gpt/pretrain_gpt.sh   model and training from YAML
# Several machines, with Megatron's launcher variables (run once per machine, NODE_RANK 0 on MASTER_ADDR):
#   NNODES=2 NODE_RANK=0 GPUS_PER_NODE=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=6000 bash examples/gpt/pretrain_gpt.sh
# Extra arguments are appended to the flags below (later flags win). Logs: $LOG_DIR/worker_*.log.
# A SIGTERM or SIGINT sent to this script (a scheduler stopping the job) is passed on to the workers; with
# --exit-signal-handler (and --save) they finish the iteration, save a checkpoint and exit 0.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-8848}
# workers on this machine: WORKERS_PER_NODE, else Megatron's GPUS_PER_NODE, else WORKERS (one machine)
WORKERS_PER_NODE=${WORKERS_PER_NODE:-${GPUS_PER_NODE:-${WORKERS:-2}}}
WORLD_SIZE=$((NNODES * WORKERS_PER_NODE))
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

# msrun runs in its own session, so a signal for this script's process group reaches this script only (and
# msrun's workers run in sessions of their own); the trap hands it to the workers (MS_ROLE=MS_WORKER) and
# leaves msrun and its scheduler to end with them.
setsid --wait msrun --worker_num "$WORLD_SIZE" --local_worker_num "$WORKERS_PER_NODE" --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
      --log_dir "$LOG_DIR" --join=True --cluster_time_out=300 \
      "$HERE/pretrain_gpt.py" $GPT_ARGS $DATA_ARGS $OUTPUT_ARGS "$@" &
MSRUN_PID=$!
forward_to_workers() {
    local parent pid
    # msrun's workers are its children (each in a session of its own); msrun is $! or, had setsid to
    # fork, the child of $!
    for parent in "$MSRUN_PID" $(pgrep -P "$MSRUN_PID" || true); do
        for pid in $(pgrep -P "$parent" || true); do
            if tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -qx 'MS_ROLE=MS_WORKER'; then
                kill -s "$1" "$pid" 2>/dev/null || true
            fi
        done
    done
}
trap 'forward_to_workers TERM' TERM
trap 'forward_to_workers INT' INT
status=0
while true; do
    wait "$MSRUN_PID" && status=0 || status=$?
    kill -0 "$MSRUN_PID" 2>/dev/null || break   # a trapped signal interrupts wait; msrun still runs
done
echo "logs: $LOG_DIR/worker_*.log"
LAST_RANK=$((WORLD_SIZE - 1))
if [ -f "$LOG_DIR/worker_$LAST_RANK.log" ]; then   # the last rank logs (on the last node)
    grep -h "Step:" "$LOG_DIR/worker_$LAST_RANK.log" | sed -n '1p;$p' || true
fi
exit "$status"
