"""Training runs of a tiny GPT under several layouts; each returns its per-iteration losses (and grad
norms), so tests can compare layouts against the single-process run. Used in one process (pytest itself)
and on 2 ranks through run_on_ranks."""
import os
import shutil
import tempfile

from mock_data import MockGPTDataset
from mindtron.legacy_model import GPTModel, TransformerConfig
from mindtron.parallel_core import parallel_state as ps
from mindtron.training import pretrain
from mindtron.training.config import AllConfig, DatasetConfig, OptimizerConfig, ParallelConfig, TrainingConfig

SEED, SEQ, VOCAB = 2024, 16, 128


def make_config(tp=1, sp=False, steps=10, pp=1, vpp=None, num_layer_list=None, overlap_param_gather=False,
                model_options=None, dataset_options=None, ep=1, etp=None, **training) -> AllConfig:
    model = TransformerConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, seq_length=SEQ, num_layers=4,
                                        num_attention_heads=4, attention_dropout_rate=0.0, hidden_dropout_rate=0.0,
                                        sequence_parallel=sp, normalization="RMSNorm", hidden_act="swiglu",
                                        ffn_hidden_size=64, position_embedding_type="rope",
                                        num_layer_list=num_layer_list,
                                        # eager layers: the tests build many short-lived models, and compiling
                                        # each costs more than it saves; test_jit_layers covers compiled == eager
                                        jit_layers=False), **(model_options or {})})
    return AllConfig(
        model_config=model,
        training_config=TrainingConfig(**{"seed": SEED, "training_iters": steps, "micro_batch_size": 2,
                                          "global_batch_size": 8, "log_interval": 5, "eval_interval": 5,
                                          "eval_iters": 2,
                                          **training}),
        dataset_config=DatasetConfig(seq_length=SEQ, **(dataset_options or {})),
        optimizer_config=OptimizerConfig(learning_rate=3e-3, min_lr=3e-4, lr_decay_style="cosine",
                                         lr_warmup_iters=2, clip_grad=1.0, weight_decay=0.01,
                                         overlap_param_gather=overlap_param_gather),
        parallel_config=ParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp,
                                       pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                       num_layer_list=num_layer_list, expert_model_parallel_size=ep,
                                       expert_tensor_parallel_size=etp))


def train(config: AllConfig, on_finish=None, callbacks=None) -> dict:
    """pretrain() on mock data; destroys the process groups afterwards so runs can follow each other.
    `on_finish(trainer)` may look at the trainer before that; `callbacks` go to pretrain()."""
    def datasets(sizes):
        return (MockGPTDataset(max(sizes[0], 1), SEQ, VOCAB, seed=SEED),
                MockGPTDataset(max(sizes[1], 1), SEQ, VOCAB, seed=SEED + 1), None)

    def model_provider(pre_process=True, post_process=True):
        return GPTModel(config.model_config, pre_process=pre_process, post_process=post_process)

    try:
        trainer = pretrain(datasets, model_provider, all_config=config, callbacks=callbacks)
        last = ps.is_pipeline_last_stage(ignore_virtual=True)
        if on_finish is not None:
            on_finish(trainer)
    finally:
        ps.destroy_model_parallel()
    # The word embedding as each stage holds it (first stage: the embedding; last stage: the head's copy).
    tied = {name: p.asnumpy() for name, p in trainer_named(trainer).items()
            if name.endswith("word_embeddings.weight") or name.endswith("word_embeddings_for_head.weight")}
    return {"loss": [r.loss for r in trainer.history], "grad_norm": [r.grad_norm for r in trainer.history],
            "skipped": [r.skipped for r in trainer.history], "last_stage": last, "tied": tied,
            "eval": list(trainer.eval_history)}


def train_on(config: AllConfig, micro_batches: list) -> dict:
    """pretrain() on the given micro-batches ({"text": [b, s + 1]} each) instead of a dataset."""
    def model_provider(pre_process=True, post_process=True):
        return GPTModel(config.model_config, pre_process=pre_process, post_process=post_process)

    try:
        trainer = pretrain(model_provider_func=model_provider, all_config=config, train_data_loader=micro_batches)
    finally:
        ps.destroy_model_parallel()
    return {"loss": [r.loss for r in trainer.history]}


def trainer_named(trainer) -> dict:
    from mindtron.training.checkpointing import named_parameters
    return named_parameters(trainer.model)


LAYOUT_STEPS, LAYOUT_EVAL = 6, 3  # the layout comparisons: 6 iterations, validation after 3 and 6


def layout_config(**layout) -> AllConfig:
    """The run every layout of test_training.py repeats (and the single process it is compared with)."""
    return make_config(steps=LAYOUT_STEPS, eval_interval=LAYOUT_EVAL, **layout)


def layouts() -> dict:
    """Every layout a 2-rank job can run: DP=2, TP=2, TP=2 with sequence parallel, PP=2, PP=2 x VPP=2; a
    PP=2 run stopped, saved per stage and resumed; DP=2 (also with the distributed optimizer) and PP=2 with
    the per-token loss."""
    return {"dp2": train(layout_config()),
            "tp2": train(layout_config(tp=2)),
            "tp2_sp": train(layout_config(tp=2, sp=True)),
            "pp2": train(layout_config(pp=2)),
            "pp2_vpp2": train(layout_config(pp=2, vpp=2)),
            "pp2_resume": resume(steps=4, save_at=2, pp=2),
            "dp2_per_token": train(per_token_config()),
            "dp2_per_token_distopt": train(per_token_config(use_distributed_optimizer=True)),
            "pp2_per_token": train(per_token_config(pp=2))}


def per_token_config(**layout) -> AllConfig:
    """--calculate-per-token-loss with EOD tokens left out of the loss (--eod-mask-loss), so micro-batches
    count different numbers of tokens."""
    return make_config(steps=4, eval_interval=2, model_options={"calculate_per_token_loss": True},
                       dataset_options={"eod_mask_loss": True}, **layout)


def layouts_3() -> dict:
    """PP=3 with Megatron's uneven per-stage layer list."""
    return {"pp3_uneven": train(layout_config(pp=3, num_layer_list=[2, 1, 1]))}


def layouts_4() -> dict:
    """PP=4 (one layer per stage) and PP=2 x DP=2."""
    return {"pp4": train(layout_config(pp=4)),
            "pp2_dp2": train(layout_config(pp=2))}


def resume(steps: int = 20, save_at: int = 10, **layout) -> dict:
    """Uninterrupted `steps`, then a run of the same length stopped at `save_at` (--exit-interval, saving
    on exit) and resumed to `steps`: the second half must repeat the uninterrupted run."""
    if "MS_SCHED_PORT" in os.environ:  # every rank of this launch must write into the same directory
        root = os.path.join(tempfile.gettempdir(), f"mindtron_ckpt_{os.environ['MS_SCHED_PORT']}_{save_at}")
    else:
        root = tempfile.mkdtemp(prefix="mindtron_ckpt_")
    try:
        full = train(make_config(steps=steps, **layout))
        first = train(make_config(steps=steps, output_dir=root, exit_interval=save_at, **layout))
        second = train(make_config(steps=steps, load_checkpoint=root, output_dir=None, **layout))
    finally:
        from mindtron.parallel_core import comm
        comm.barrier()  # every stage has loaded before the directory goes
        shutil.rmtree(root, ignore_errors=True)
    return {"full": full["loss"], "resumed": first["loss"] + second["loss"], "last_stage": full["last_stage"],
            "eval_full": full["eval"], "eval_resumed": first["eval"] + second["eval"]}


class RecordingDataset:
    """A dataset that records which sample indices were read, in order (to follow the data sampler)."""

    def __init__(self, dataset):
        self.dataset, self.read = dataset, []

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        self.read.append(int(index))
        return self.dataset[index]


def train_recording(config: AllConfig) -> dict:
    """pretrain() on mock data, recording the training samples read and the trainer's schedule state."""
    recorded = {}

    def datasets(sizes):
        recorded["train"] = RecordingDataset(MockGPTDataset(max(sizes[0], 1), SEQ, VOCAB, seed=SEED))
        return recorded["train"], None, None

    def model_provider(pre_process=True, post_process=True):
        return GPTModel(config.model_config, pre_process=pre_process, post_process=post_process)

    try:
        trainer = pretrain(datasets, model_provider, all_config=config)
    finally:
        ps.destroy_model_parallel()
    return {"loss": [r.loss for r in trainer.history], "batch": [r.global_batch_size for r in trainer.history],
            "read": recorded["train"].read, "scheduler_steps": trainer.scheduler.num_steps}
