"""Typed configurations for a training job (document 002's training/dataset/optimizer/parallel configs).

`training.arguments.init_configs_from_args(args)` fills them from Megatron flags or YAML; scripts and tests
may build them directly. The model's own config is `legacy_model.TransformerConfig`. Each field names the
Megatron flag it comes from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from mindtron.legacy_model.config import TransformerConfig


@dataclass
class TrainingConfig:
    """The loop: iterations, batches, precision and loss scaling, checkpoints, logging."""

    seed: int = 1234
    """Global seed for initialisation, data order and dropout (--seed)."""
    training_iters: int = 0
    """Iterations to train (--train-iters); derived from train_samples when that is given."""
    train_samples: Optional[int] = None
    """Samples to train instead of iterations (--train-samples)."""
    log_interval: int = 100
    """Iterations between log lines (--log-interval)."""
    eval_interval: Optional[int] = 1000
    """Iterations between evaluations (--eval-interval); None or 0 disables."""
    eval_iters: int = 100
    """Batches per evaluation (--eval-iters)."""
    save_interval: Optional[int] = None
    """Iterations between checkpoints (--save-interval)."""
    exit_interval: Optional[int] = None
    """Stop when the iteration is a multiple of this (--exit-interval)."""
    exit_duration_in_mins: Optional[float] = None
    """Stop after this many minutes of training (--exit-duration-in-mins)."""
    micro_batch_size: int = 1
    """Samples per micro-batch per data-parallel rank (--micro-batch-size)."""
    global_batch_size: Optional[int] = None
    """Samples per iteration over all data-parallel ranks (--global-batch-size); default micro x dp."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per iteration (document 001); with a global batch it is global / (micro x dp)."""
    rampup_batch_size: Optional[List[int]] = None
    """Batch-size ramp-up [start, increment, ramp-up samples] towards global_batch_size
    (--rampup-batch-size; Megatron-Core <= 0.15's meaning, see training/num_microbatches.py)."""
    step_batch_size_schedule: Optional[str] = None
    """Step-wise global batch size "THRESHOLD:BS ..." by consumed tokens (samples without a sequence length)
    (--step-batch-size-schedule, Megatron-Core 0.19)."""
    decrease_batch_size_if_needed: bool = False
    """Round the global batch down to a multiple of micro batch x data parallel
    (--decrease-batch-size-if-needed)."""
    iterations_to_skip: List[int] = field(default_factory=list)
    """Iterations whose batch is read and dropped without training (--iterations-to-skip)."""
    bf16: bool = False
    """Compute in bfloat16 with fp32 master weights (--bf16)."""
    fp16: bool = False
    """Compute in float16 with fp32 master weights and loss scaling (--fp16)."""
    accumulate_allreduce_grads_in_fp32: bool = False
    """Accumulate and reduce gradients in fp32 (--accumulate-allreduce-grads-in-fp32)."""
    loss_scale: Optional[float] = None
    """Static loss scale (--loss-scale); None means dynamic under fp16."""
    loss_scale_value: float = 2.0 ** 32
    """Initial dynamic loss scale (--initial-loss-scale)."""
    min_loss_scale: float = 1.0
    """Floor of the dynamic loss scale (--min-loss-scale)."""
    loss_scale_window: int = 1000
    """Good steps before the dynamic scale grows (--loss-scale-window)."""
    loss_scale_factor: int = 2
    """Hysteresis: overflows tolerated before the scale shrinks (--hysteresis)."""
    use_adaptive_loss_scale: bool = False
    """Adaptive loss scaling of document 000 (window adapts between min and max window)."""
    scale_factor: float = 2.0
    """Adaptive loss scaling: growth/backoff factor."""
    max_scale_window: int = 1000
    """Adaptive loss scaling: largest window."""
    min_scale_window: int = 20
    """Adaptive loss scaling: smallest window (document 000 default 20)."""
    use_clip_grad: bool = False
    """Clip gradients by global norm (document 001); --clip-grad > 0 turns it on."""
    max_grad_norm: float = 1.0
    """Global-norm threshold when clipping (document 001; Megatron: --clip-grad)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (--use-distributed-optimizer)."""
    wrap_with_ddp: bool = True
    """Reduce gradients over data parallel through gradient buffers (document 002)."""
    bucket_size: Optional[int] = None
    """Elements per gradient bucket (--ddp-bucket-size)."""
    overlap_grad_reduce: bool = False
    """Reduce buckets while backward runs (--overlap-grad-reduce)."""
    delay_grad_reduce: bool = True
    """With overlap, hold a finished model chunk's reduction back by pipeline-rank backward steps so all
    pipeline ranks reduce at about the same time (document 002; Megatron-Core's delay_grad_reduce)."""
    enable_mem_align: bool = False
    """Round gradient bucket sizes up to a multiple of 128 elements (document 002)."""
    check_for_nan_in_loss_and_grad: bool = False
    """Stop with an error naming the rank and parameter when a local gradient holds NaN/Inf, before the
    data-parallel reduction (Megatron's --no-check-for-nan-in-loss-and-grad turns its default-on check off)."""
    resume_training: bool = False
    """Resume from the latest checkpoint in load_checkpoint (document 002)."""
    crc_check: bool = False
    """Verify each checkpoint file's CRC on load (--resume-crc-check)."""
    load_checkpoint: Optional[str] = None
    """Directory to load from (--load)."""
    output_dir: Optional[str] = None
    """Directory to save to (--save)."""
    prefix: str = "network"
    """Checkpoint file prefix (--ckpt-prefix)."""
    ckpt_format: str = "safetensors"
    """Checkpoint file format (--ckpt-format)."""
    keep_checkpoint_max: Optional[int] = None
    """Keep at most this many checkpoints, deleting the oldest (--keep-checkpoint-max)."""
    no_load_optim: bool = False
    """Do not load optimizer state (--no-load-optim)."""
    no_load_rng: bool = False
    """Do not load RNG state (--no-load-rng)."""
    no_save_optim: bool = False
    """Do not save optimizer state (--no-save-optim)."""
    no_save_rng: bool = False
    """Do not save RNG state (--no-save-rng)."""
    finetune: bool = False
    """Load weights only and start at iteration 0 (--finetune)."""
    exit_on_missing_checkpoint: bool = False
    """Stop with an error when load_checkpoint holds no checkpoint (--exit-on-missing-checkpoint)."""
    new_dataset: bool = False
    """Start the data from the beginning even when resuming (document 002)."""
    profile: bool = False
    """Run the MindSpore profiler between profile_step_start and profile_step_end (--profile)."""
    profile_save_path: str = "./profile"
    """Where profiles go (document 002)."""
    profile_step_start: int = 10
    """First profiled iteration (--profile-step-start)."""
    profile_step_end: int = 12
    """Profiling stops once this many iterations are done (--profile-step-end); with profile_step_start 10
    and this 12, iterations 11 and 12 are recorded, as in Megatron."""
    # --- watching and operating a run (issue 18): TensorBoard/W&B, timers, memory, profiler options, exits ---
    profile_ranks: List[int] = field(default_factory=lambda: [0])
    """Ranks that run the profiler (--profile-ranks); an empty list means every rank."""
    profile_level: str = "level0"
    """MindSpore profiler level: level0, level1 or level2 (document 002; Ascend only)."""
    profile_with_stack: bool = False
    """Record Python call stacks in the profile (document 002; Ascend only)."""
    profile_memory: bool = False
    """Record tensor memory in the profile (document 002; Ascend only)."""
    profile_framework: Optional[str] = None
    """Record framework (host) data, "all" or "time" (document 002); host data is always on for CPU."""
    profile_communication: bool = False
    """Record communication ops: raises the level to level1 (document 002; Ascend only)."""
    profile_parallel_strategy: bool = False
    """Record the parallel strategy (document 002; Ascend only)."""
    profile_aicore_metrics: int = 0
    """AI Core metrics: -1 none, 0 ArithmeticUtilization, 1 PipeUtilization, 2 Memory, 3 MemoryL0,
    4 ResourceConflictRatio, 5 MemoryUB, 6 L2Cache, 7 MemoryAccess (document 002; Ascend only, level1+)."""
    profile_l2_cache: bool = False
    """Record L2 cache data (document 002; Ascend only)."""
    profile_hbm_ddr: bool = False
    """Record on-chip memory / DDR bandwidth (document 002; Ascend only)."""
    profile_pcie: bool = False
    """Record PCIe bandwidth (document 002; Ascend only)."""
    profile_data_process: bool = False
    """Record data-processing time (document 002; MindSpore datasets only)."""
    profile_data_simplification: bool = False
    """Keep only the profiler's deliverables, dropping raw framework data (document 002; Ascend only)."""
    profile_op_time: bool = True
    """Record device op times (document 002); host op times are always recorded."""
    profile_offline_analyse: bool = False
    """Leave the raw data for a later `mindspore.profiler.profiler.analyse(dir)` (document 002)."""
    profile_dynamic_profiler_config_path: str = ""
    """JSON file driving MindSpore's DynamicProfilerMonitor instead of the fixed window (document 002)."""
    tensorboard_dir: Optional[str] = None
    """Write TensorBoard event files here, from the last rank (--tensorboard-dir)."""
    tensorboard_log_interval: int = 1
    """Iterations between TensorBoard scalars (--tensorboard-log-interval)."""
    tensorboard_queue_size: int = 1000
    """Events buffered before a write to the event file (--tensorboard-queue-size)."""
    log_timers_to_tensorboard: bool = False
    """Also write the timers and iteration time to TensorBoard (--log-timers-to-tensorboard)."""
    log_validation_ppl_to_tensorboard: bool = False
    """Also write validation perplexity (--log-validation-ppl-to-tensorboard)."""
    log_memory_to_tensorboard: bool = False
    """Also write memory figures (--log-memory-to-tensorboard)."""
    log_loss_scale_to_tensorboard: bool = True
    """Write the loss scale (off with --no-log-loss-scale-to-tensorboard)."""
    log_world_size_to_tensorboard: bool = False
    """Also write the world size (--log-world-size-to-tensorboard)."""
    log_num_zeros_in_grad: bool = False
    """Count zero gradient entries and log them (--log-num-zeros-in-grad)."""
    log_params_norm: bool = False
    """Log the L2 norm of the parameters (--log-params-norm)."""
    log_throughput: bool = False
    """Add Megatron's "throughput per GPU (TFLOP/s/GPU)" to the log line (--log-throughput)."""
    log_memory_interval: Optional[int] = None
    """Iterations between memory reports, a multiple of log_interval (--log-memory-interval)."""
    timing_log_level: int = 0
    """Timers to measure and print: 0 none beyond the iteration time, 1 once-per-step phases, 2 also
    per-micro-batch work and pipeline sends/receives (--timing-log-level)."""
    timing_log_option: str = "minmax"
    """Timer figures over ranks: "max", "minmax" or "all" (--timing-log-option)."""
    barrier_with_L1_time: bool = True
    """Level-1 timers wait for every rank before starting (off: --no-barrier-with-level-1-timing)."""
    wandb_project: str = ""
    """Weights & Biases project; logging to W&B is on when set (--wandb-project)."""
    wandb_entity: str = ""
    """Weights & Biases entity (--wandb-entity)."""
    wandb_exp_name: str = ""
    """Weights & Biases run name (--wandb-exp-name)."""
    wandb_save_dir: str = ""
    """Directory for W&B files; default <save>/wandb (--wandb-save-dir)."""
    exit_signal_handler: bool = False
    """On exit_signal every rank finishes the iteration, a checkpoint is saved and the job exits 0
    (--exit-signal-handler)."""
    exit_signal: int = 15
    """Signal number the handler waits for; 15 is SIGTERM (--exit-signal)."""
    exit_on_missing_checkpoint: bool = False
    """With load_checkpoint set but holding no checkpoint, stop with an error instead of starting from
    scratch (--exit-on-missing-checkpoint)."""
    # --- callbacks and the MoE tools of documents 000/001 ---
    callbacks: Optional[List[dict]] = None
    """Callbacks of the configuration, as [{"type": Name, argument: value, ...}] (the YAML `callbacks:` list
    or --callbacks JSON; training/callbacks.py); pretrain(callbacks=...) adds instances after them."""
    token_distribution_dir: Optional[str] = None
    """Where --save-token-distribution writes its .npy files (--token-distribution-dir); default
    <save>/token_distribution."""
    token_distribution_interval: int = 1
    """Iterations between token-distribution files (--token-distribution-interval)."""
    log_token_distribution: bool = False
    """Every log interval, log each MoE layer's most and least loaded expert over the mean
    (--log-token-distribution)."""


@dataclass
class DatasetConfig:
    """Data: where it is, how it is split and batched, and the mask options."""

    batch_size: int = 1
    """Micro-batch size (--micro-batch-size)."""
    micro_batch_num: int = 1
    """Micro-batches per iteration under pipeline parallelism (document 002)."""
    seq_length: int = 1024
    """Tokens per sample (--seq-length)."""
    data_path: Optional[List[str]] = None
    """Prefixes (optionally weighted) of .bin/.idx datasets (--data-path)."""
    train_data_path: Optional[List[str]] = None
    """Separate training data (--train-data-path)."""
    valid_data_path: Optional[List[str]] = None
    """Separate validation data (--valid-data-path)."""
    test_data_path: Optional[List[str]] = None
    """Separate test data (--test-data-path)."""
    split: Optional[str] = None
    """Train/valid/test proportions such as "969,30,1" (--split)."""
    data_cache_path: Optional[str] = None
    """Where dataset index files are cached (--data-cache-path)."""
    mock_data: bool = False
    """Synthetic data instead of files (--mock-data)."""
    reset_attention_mask: bool = False
    """Attention stays within each document (--reset-attention-mask)."""
    reset_position_ids: bool = False
    """Positions restart after each end-of-document token (--reset-position-ids)."""
    eod_mask_loss: bool = False
    """No loss on end-of-document tokens (--eod-mask-loss)."""
    pad_token_id: Optional[int] = None
    """Padding token id (document 002)."""
    eos_token_id: Optional[int] = None
    """End-of-document token id (document 002); the tokenizer's eod when None."""
    drop_remainder: bool = True
    """Drop a last incomplete global batch (document 002)."""
    num_workers: int = 2
    """Data loader workers (--num-workers)."""
    dataloader_type: str = "single"
    """"single" (Megatron's sequential pretraining sampler), "cyclic" (a fresh random order each epoch) or
    "external" (the caller passes the data loader) (--dataloader-type)."""
    tokenizer_type: Optional[str] = None
    """--tokenizer-type."""
    vocab_file: Optional[str] = None
    """--vocab-file."""
    merge_file: Optional[str] = None
    """--merge-file."""
    tokenizer_model: Optional[str] = None
    """--tokenizer-model (SentencePiece / HuggingFace)."""
    vocab_size: Optional[int] = None
    """Vocabulary size for the null tokenizer (--vocab-size)."""


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate and weight-decay schedules, clipping."""

    optimizer_type: str = "adam"
    """"adam" (AdamW, decoupled weight decay as Megatron) or "sgd" (--optimizer)."""
    learning_rate: Optional[float] = None
    """Peak learning rate (--lr)."""
    min_lr: float = 0.0
    """Floor of the decayed learning rate (--min-lr)."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """Adam betas (--adam-beta1, --adam-beta2)."""
    eps: float = 1e-8
    """Adam epsilon (--adam-eps)."""
    sgd_momentum: float = 0.9
    """SGD momentum (--sgd-momentum)."""
    weight_decay: float = 0.01
    """Weight decay (--weight-decay); biases and norm weights are not decayed."""
    start_weight_decay: Optional[float] = None
    """Weight decay at the start of the increment schedule (--start-weight-decay)."""
    end_weight_decay: Optional[float] = None
    """Weight decay at the end of the increment schedule (--end-weight-decay)."""
    weight_decay_incr_style: str = "constant"
    """"constant", "linear" or "cosine" (--weight-decay-incr-style)."""
    lr_decay_style: str = "linear"
    """"constant", "linear", "cosine", "inverse-square-root" or "WSD" (--lr-decay-style)."""
    lr_decay_iters: Optional[int] = None
    """Iterations of decay (--lr-decay-iters); defaults to the training iterations."""
    lr_decay_samples: Optional[int] = None
    """Samples of decay (--lr-decay-samples)."""
    lr_warmup_iters: int = 0
    """Iterations of linear warmup (--lr-warmup-iters)."""
    lr_warmup_samples: int = 0
    """Samples of linear warmup (--lr-warmup-samples)."""
    lr_warmup_fraction: Optional[float] = None
    """Warmup as a fraction of the decay length (--lr-warmup-fraction)."""
    lr_warmup_init: float = 0.0
    """Learning rate at the start of warmup (--lr-warmup-init)."""
    lr_wsd_decay_style: str = "exponential"
    """Shape of WSD's final decay: "exponential", "linear", "cosine" (--lr-wsd-decay-style)."""
    lr_wsd_decay_iters: Optional[int] = None
    """Iterations of WSD's final decay (--lr-wsd-decay-iters)."""
    lr_wsd_decay_samples: Optional[int] = None
    """Samples of WSD's final decay (--lr-wsd-decay-samples)."""
    use_checkpoint_opt_param_scheduler: bool = False
    """Take scheduler settings from the checkpoint (--use-checkpoint-opt_param-scheduler)."""
    override_opt_param_scheduler: bool = False
    """Take scheduler settings from the arguments, ignoring the checkpoint (--override-opt_param-scheduler)."""
    clip_grad: float = 1.0
    """Global-norm clipping threshold (--clip-grad); 0 disables."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather (--overlap-param-gather)."""
    decoupled_lr: Optional[float] = None
    """Peak learning rate of the word embedding and output-layer weights (--decoupled-lr); None: --lr."""
    decoupled_min_lr: Optional[float] = None
    """Floor of their decayed learning rate (--decoupled-min-lr); None: --min-lr."""
    apply_wd_to_qk_layernorm: bool = False
    """Weight-decay the query/key norm parameters too (--apply-wd-to-qk-layernorm, or
    --no-weight-decay-cond-type apply_wd_to_qk_layernorm); other 1-D parameters and biases stay exempt."""


@dataclass
class ParallelConfig:
    """How the job is split over processes."""

    tensor_model_parallel_size: int = 1
    """--tensor-model-parallel-size."""
    pipeline_model_parallel_size: int = 1
    """--pipeline-model-parallel-size."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline rank (derived from --num-layers-per-virtual-pipeline-stage)."""
    num_layers_per_virtual_pipeline_stage: Optional[int] = None
    """--num-layers-per-virtual-pipeline-stage."""
    num_layer_list: Optional[list] = None
    """Uneven layers per stage (document 002)."""
    context_parallel_size: int = 1
    """--context-parallel-size."""
    context_parallel_algo: str = "ring"
    """"ring" (ring attention), "ulysses" or "hybrid" (document 002)."""
    ulysses_degree_in_cp: Optional[int] = None
    """Ulysses share of the context-parallel group under "hybrid" (document 002)."""
    expert_model_parallel_size: int = 1
    """Ranks the experts of each MoE layer are spread over (--expert-model-parallel-size)."""
    expert_tensor_parallel_size: Optional[int] = None
    """Ranks each expert's weights are split over (--expert-tensor-parallel-size); None: the tensor-parallel
    size, as in Megatron."""
    sequence_parallel: bool = False
    """--sequence-parallel."""
    order: str = "tp-cp-ep-dp-pp"
    """Rank order of the parallel axes."""
    recompute: bool = False
    """Full recompute (document 002)."""
    select_recompute: bool = False
    """Selective recompute (document 002)."""
    select_comm_recompute: bool = False
    """Recompute communication in selective recompute (document 002)."""


@dataclass
class AllConfig:
    """Everything a training job is configured with."""

    model_config: TransformerConfig = field(default_factory=TransformerConfig)
    training_config: TrainingConfig = field(default_factory=TrainingConfig)
    dataset_config: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer_config: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
