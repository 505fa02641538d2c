"""Megatron-LM checkpoints (saved with torch.save, or byte by byte without PyTorch) converted to mindtron and back:
GPT-2 style (legacy model) and Llama style (Megatron-Core, Transformer Engine names) at TP=1/2 x PP=1/2, old
names and checkpoint versions 0-3, release directories, bf16, virtual pipeline chunks, vocabulary re-padding,
argument overrides, the round trip to Megatron's format, the CLI, and pretrain() loading the result."""
import argparse
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import convert_fixtures as F
from convert_bytes import Global, write_torch_zip
from numerics import rel_err
from reference_gpt import reference_logits
from mindtron.convert import convert_checkpoint, read_checkpoint
from mindtron.convert.cli import main as cli_main
from mindtron.legacy_model import GPTModel
from mindtron.parallel_core import parallel_state as ps
from mindtron.parallel_core import tensor_parallel as tp
from mindtron.training import checkpointing

REPO = Path(__file__).resolve().parent.parent
try:
    import torch  # test-only dependency: builds checkpoints with the real torch.save
    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False
needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="PyTorch (test extra) builds these fixtures")


def tokens_for(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, cfg.seq_length))


def loaded_logits(cfg, root, tokens):
    """Logits of a GPTModel (TP=1, PP=1) loaded by mindtron's own checkpoint loader, as pretrain loads it."""
    ps.initialize_model_parallel()
    try:
        tp.model_parallel_seed(77)
        model = GPTModel(cfg)
        model.set_train(False)
        assert checkpointing.load_checkpoint(str(root), model, finetune=True, crc_check=True) == (0, 0)
        import mindspore as ms
        from mindspore import Tensor
        return model(Tensor(tokens, ms.int32)).asnumpy()
    finally:
        ps.destroy_model_parallel()


@needs_torch
@pytest.mark.parametrize("name,scheme,tp_size,pp_size,te", [
    ("gpt2", "legacy", 2, 2, False), ("gpt2", "legacy", 1, 1, False), ("llama", "core", 2, 2, True),
    ("llama", "core", 1, 2, True), ("gpt2", "core", 2, 1, False), ("llama", "legacy", 2, 1, False)])
def test_megatron_checkpoint_to_mindtron_gives_the_source_logits(tmp_path, name, scheme, tp_size, pp_size, te):
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", name, tp_size, pp_size, scheme, transformer_engine=te)
    report = convert_checkpoint(src, tmp_path / "dst", 1, 1)
    assert report.source_format == f"megatron-{scheme}" and report.source_layout == (tp_size, pp_size, 1)
    assert report.iteration == 20 and (tmp_path / "dst" / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert set(report.not_converted) == {"optimizer", "opt_param_scheduler", "rng_state"}
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tmp_path / "dst", tokens), reference_logits(cfg, weights, tokens)) < 1e-5
    if te:
        assert len(report.ignored["Transformer Engine FP8 metadata (_extra_state)"]) == 5 * cfg.num_layers * tp_size


@needs_torch
@pytest.mark.parametrize("version", [0, 1, 2, 3])
def test_legacy_versions_and_old_names_give_the_same_weights(tmp_path, version):
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "gpt2", 2, 1, "legacy", version=float(version),
                                           old_names=version < 3)
    full = read_checkpoint(src)
    assert set(full.tensors) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)  # QKV reordered to the current layout


def test_checkpoint_written_byte_by_byte_converts_without_torch(tmp_path):
    """No PyTorch anywhere: a Megatron legacy checkpoint in the on-disk format, built opcode by opcode."""
    cfg = F.config("gpt2")
    weights = F.random_weights(cfg, 4)
    args = F.megatron_args(cfg, 1, 1)
    state = {"args": argparse.Namespace(**args, params_dtype=Global("torch", "float32")),
             "checkpoint_version": 3.0, "iteration": 20,
             "model": F.legacy_model_state(F.megatron_shards(cfg, weights, 1, 1)[(0, 0)])}
    path = tmp_path / "src" / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    write_torch_zip(path, state, archive="model_optim_rng")
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("20")
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", 2, 1, reader="python", verify=True)
    assert report.verify["relative"] < 1e-5
    full = read_checkpoint(tmp_path / "dst")  # TP=2 written, merged again
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)


@needs_torch
def test_megatron_core_checkpoint_with_signal_and_enum_arguments_converts(tmp_path):
    """Megatron-Core 0.19 keeps signal.Signals and its own enums in `args` (saved here with the real torch.save):
    both readers load them as inert values, and the conversion to TP=1 and TP=2 gives the source's logits."""
    from mindtron.convert.torch_reader import load_torch_file

    cfg = F.config("llama")
    weights = F.random_weights(cfg, 8)
    shards = F.megatron_shards(cfg, weights, 2, 1)
    with F.megatron_enum_modules() as enums:
        F.save_with_torch(tmp_path / "src", {k: F.core_model_state(v) for k, v in shards.items()},
                          F.megatron_core_args(cfg, 2, 1, enums))
    assert not any(m.startswith("megatron") for m in sys.modules)
    tokens = tokens_for(cfg)
    want = reference_logits(cfg, weights, tokens)
    for reader in ("python", "torch"):
        for tp_size in (1, 2):
            out = tmp_path / f"{reader}_tp{tp_size}"
            report = convert_checkpoint(tmp_path / "src", out, tp_size, 1, reader=reader, verify=tp_size == 2)
            assert {"signal.Signals", "megatron.core.enums.ModelType"} <= set(report.placeholders), reader
            full = read_checkpoint(out)
            for key, value in weights.items():
                np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)
        assert rel_err(loaded_logits(cfg, tmp_path / f"{reader}_tp1", tokens), want) < 1e-5
        rank_file = tmp_path / "src" / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt"
        args = load_torch_file(rank_file, reader)[0]["args"]
        assert args.exit_signal.value == 15 and args.model_type.value == 1 and args.fp8_recipe.value == "delayed"
        assert args.cuda_graph_modules[0].value == 1 and args.num_layers == cfg.num_layers
    assert not any(m.startswith("megatron") for m in sys.modules)  # the enums were never imported


@needs_torch
def test_release_directory_and_bf16_weights(tmp_path):
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "llama", 2, 1, "core", release=True, dtype="bfloat16")
    report = convert_checkpoint(src, tmp_path / "dst", 1, 1, verify=True)
    assert report.iteration == 0 and (tmp_path / "dst" / "iter_0000000" / "mp_rank_00" / "meta.json").exists()
    full = read_checkpoint(tmp_path / "dst")
    for key, value in weights.items():  # the bfloat16 values, widened to float32 exactly
        np.testing.assert_array_equal(full.tensors[key], torch.from_numpy(value).bfloat16().float().numpy())


@needs_torch
def test_virtual_pipeline_chunks_merge_in_model_order(tmp_path):
    """PP=2 x 2 virtual chunks: file of stage p holds model0 (chunk 0) and model1 (chunk 1)."""
    cfg = F.config("gpt2", num_layers=4)
    weights = F.random_weights(cfg, 5)
    pieces = F.megatron_shards(cfg, weights, 1, 4)  # 4 model pieces of one layer, in model order
    models = {(0, p): {"model0": F.legacy_model_state(pieces[(0, p)]),
                       "model1": F.legacy_model_state(pieces[(0, p + 2)])} for p in range(2)}
    for (t, p), chunks in models.items():
        directory = tmp_path / "src" / "iter_0000020" / F.rank_dir(t, p, 2)
        directory.mkdir(parents=True)
        convert = lambda tree: {k: convert(v) for k, v in tree.items()} if isinstance(tree, dict) \
            else torch.from_numpy(tree)  # noqa: E731
        torch.save({"args": argparse.Namespace(**F.megatron_args(cfg, 1, 2)), "checkpoint_version": 3.0,
                    "iteration": 20, **{k: convert(v) for k, v in chunks.items()}}, directory / "model_optim_rng.pt")
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("20")
    full = read_checkpoint(tmp_path / "src")
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)


@needs_torch
def test_vocabulary_is_padded_again_for_the_target(tmp_path):
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "gpt2", 2, 1, "legacy")
    overrides = {"true_vocab_size": 90, "make_vocab_size_divisible_by": 16}
    report = convert_checkpoint(src, tmp_path / "dst", 1, 1, overrides=overrides, verify=True)
    assert report.vocab_rows == (128, 96)  # ceil(90 / 16) x 16
    full = read_checkpoint(tmp_path / "dst")
    np.testing.assert_array_equal(full.tensors["language_model.embedding.word_embeddings.weight"],
                                  weights["language_model.embedding.word_embeddings.weight"][:96])
    tokens = np.random.default_rng(0).integers(0, 90, (2, cfg.seq_length))
    got = loaded_logits(F.config("gpt2", vocab_size=96), tmp_path / "dst", tokens)
    assert rel_err(got[..., :90], reference_logits(cfg, weights, tokens)[..., :90]) < 1e-5


@needs_torch
@pytest.mark.parametrize("ids,rows,true_vocab", [(128, 128, 128), (127, 128, 127), (128, 192, 129)])
def test_null_tokenizer_vocabulary_follows_the_stored_table(tmp_path, ids, rows, true_vocab):
    """--vocab-size N with NullTokenizer: N ids (Megatron-Core 0.19), or N + 1 where the table was padded for
    the older rule (EOD = N); re-padding for TP=2 keeps every id the tokenizer can emit."""
    cfg = F.config("gpt2", vocab_size=rows)
    weights = F.random_weights(cfg)
    args = F.megatron_args(cfg, 1, 1, tokenizer_type="NullTokenizer", vocab_size=ids)
    F.save_with_torch(tmp_path / "src", F.megatron_shards(cfg, weights, 1, 1), args)
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", 2, 1, verify=True)
    padded = -(-true_vocab // 128) * 128  # make_vocab_size_divisible_by 64 x TP 2
    assert report.vocab_rows == (rows, padded)


@needs_torch
def test_command_line_flags_override_the_stored_arguments(tmp_path):
    cfg = F.config("llama")
    weights = F.random_weights(cfg)
    args = F.megatron_args(cfg, 1, 1)
    for key in ("swiglu", "ffn_hidden_size", "group_query_attention", "num_query_groups", "seq_length",
                "encoder_seq_length"):
        del args[key]  # as if an older or hand-made checkpoint lacked them
    shards = F.megatron_shards(cfg, weights, 1, 1)
    F.save_with_torch(tmp_path / "src", {k: F.core_model_state(v) for k, v in shards.items()}, args)
    with pytest.raises(ValueError, match=r"(?s)query_key_value.weight has shape \[64, 32\].*--num-query-groups"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    overrides = {"swiglu": True, "ffn_hidden_size": 48, "num_query_groups": 2}
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", overrides=overrides, verify=True)
    assert "2 query groups" in report.model and "swiglu" in report.model


@needs_torch
@pytest.mark.parametrize("name,scheme", [("gpt2", "legacy"), ("llama", "core")])
def test_round_trip_to_megatron_format_is_bit_exact(tmp_path, name, scheme):
    """Megatron TP=2 x PP=2 -> mindtron TP=1 -> Megatron TP=2 x PP=2 (legacy model, or Megatron-Core names with
    Transformer Engine's fused norms and the tied head's copy): the same tensors, the same files' structure, and
    arguments Megatron-LM's checks accept."""
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", name, 2, 2, scheme)
    convert_checkpoint(src, tmp_path / "mid", 1, 1)
    report = convert_checkpoint(tmp_path / "mid", tmp_path / "back", 2, 2, target_format=f"megatron-{scheme}",
                                verify=True)
    assert report.target_format == f"megatron-{scheme}" and len(report.written) == 4
    assert (tmp_path / "back" / "latest_checkpointed_iteration.txt").read_text() == "20"
    for t in range(2):
        for p in range(2):
            name = f"iter_0000020/{F.rank_dir(t, p, 2)}/model_optim_rng.pt"
            original = torch.load(src / name, weights_only=False)
            written = torch.load(tmp_path / "back" / name, weights_only=False)
            assert written["checkpoint_version"] == 3.0 and written["iteration"] == 20
            flat_a, flat_b = _flatten(original["model"]), _flatten(written["model"])
            assert flat_a.keys() == flat_b.keys()
            for key in flat_a:
                if key.endswith("_extra_state"):  # Transformer Engine's FP8 metadata: written empty
                    assert flat_b[key] is None, key
                    continue
                assert torch.equal(flat_a[key], flat_b[key]), key
            stored = written["args"]
            for key in ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings",
                        "padded_vocab_size", "make_vocab_size_divisible_by", "tokenizer_type",
                        "add_position_embedding", "untie_embeddings_and_output_weights", "ffn_hidden_size"):
                if key == "add_position_embedding" and cfg.position_embedding_type == "rope":
                    assert stored.add_position_embedding is False  # (the fixture's args leave it True)
                    continue
                assert getattr(stored, key) == getattr(original["args"], key), key
            assert (stored.tensor_model_parallel_size, stored.pipeline_model_parallel_size) == (2, 2)
            assert stored.use_legacy_models == (scheme == "legacy") and stored.ckpt_format == "torch"  # as held
            assert stored.use_mcore_models == (scheme == "core")


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@needs_torch
def test_cli_converts_verifies_and_summarises(tmp_path, capsys):
    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "llama", 2, 2, "core")
    status = cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "dst"), "--target-tensor-parallel-size",
                       "2", "--target-pipeline-parallel-size", "2", "--source-format", "megatron-core", "--verify",
                       "--lr", "0.1"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "converted megatron-core checkpoint" in out and "TP=2 x PP=2" in out and "verify: logits" in out
    assert "ignored 20 entries: Transformer Engine FP8 metadata" in out
    assert re.search(r"writing 4/4 files, \d+ tensors \(", err) and "--lr do(es) not describe the model" in err
    ranks = sorted(p.name for p in (tmp_path / "dst" / "iter_0000020").iterdir())
    assert ranks == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]


def test_convert_script_at_the_repository_root_runs(tmp_path):
    """convert/convert.py, the thin script, as a user runs it (a separate process, no PyTorch needed)."""
    cfg = F.config("gpt2")
    weights = F.random_weights(cfg, 2)
    state = {"args": argparse.Namespace(**F.megatron_args(cfg, 1, 1)), "checkpoint_version": 3.0,
             "iteration": 20, "model": F.legacy_model_state(F.megatron_shards(cfg, weights, 1, 1)[(0, 0)])}
    path = tmp_path / "src" / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    write_torch_zip(path, state)
    (tmp_path / "src" / "latest_checkpointed_iteration.txt").write_text("20")
    run = subprocess.run([sys.executable, str(REPO / "convert" / "convert.py"), "--load-dir", str(tmp_path / "src"),
                          "--save-dir", str(tmp_path / "dst"), "--target-tensor-parallel-size", "2",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "into mindtron checkpoint" in run.stdout and "TP=2 x PP=1" in run.stdout


@needs_torch
def test_pretrain_loads_a_converted_checkpoint(tmp_path):
    """pretrain(..., --load DIR --finetune) at the converted layout starts from exactly the converted weights."""
    from workers import training_checks as tc
    from mindtron.training.checkpointing import named_parameters

    run = tc.make_config(steps=1, load_checkpoint=str(tmp_path / "dst"), finetune=True, eval_iters=0,
                         eval_interval=None)
    run.model_config.jit_layers = False
    o = run.optimizer_config
    o.learning_rate, o.min_lr, o.lr_warmup_iters = 0.0, 0.0, 0  # no update: the weights stay the loaded ones
    cfg = run.model_config
    weights = F.random_weights(cfg, 6)
    shards = F.megatron_shards(cfg, weights, 2, 2)
    F.save_with_torch(tmp_path / "src", {k: F.core_model_state(v) for k, v in shards.items()},
                      F.megatron_args(cfg, 2, 2))
    convert_checkpoint(tmp_path / "src", tmp_path / "dst", 1, 1)
    seen = {}
    result = tc.train(run, on_finish=lambda trainer: seen.update(
        {n: p.asnumpy() for n, p in named_parameters(trainer.model).items()}))
    assert len(result["loss"]) == 1 and np.isfinite(result["loss"][0])
    assert set(seen) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(seen[key], value, err_msg=key)


def test_mindtron_checkpoint_with_every_option_reshards_and_verifies(tmp_path):
    """A checkpoint saved by mindtron's own save_checkpoint (sandwich norm, partial rotary, QKV bias only, exact
    GeLU, layer scaling, 3 layers) resharded to TP=2 x PP=3, verified, and merged back to the same weights;
    Megatron's format has no sandwich norm, so writing it there is refused."""
    import dataclasses

    cfg = F.config("options")
    ps.initialize_model_parallel()
    try:
        tp.model_parallel_seed(11)
        model = GPTModel(cfg)
        checkpointing.save_checkpoint(str(tmp_path / "src"), 5, model,
                                      args={"model_config": dataclasses.asdict(cfg)})
        weights = {n: p.asnumpy() for n, p in model.parameters_and_names()}
    finally:
        ps.destroy_model_parallel()
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", 2, 3, verify=True)
    assert report.source_format == "mindtron" and report.verify["relative"] < 1e-5
    full = read_checkpoint(tmp_path / "dst")
    assert full.spec.config().use_sandwich_norm and full.spec.config().rotary_percent == 0.5
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)
    with pytest.raises(ValueError, match=r"attn_post_norm.(weight|bias) has no place in Megatron's legacy GPT"):
        convert_checkpoint(tmp_path / "src", tmp_path / "meg", target_format="megatron-legacy")
    if HAVE_TORCH:
        with pytest.raises(ValueError, match=r"attn_post_norm.(weight|bias) has no place in Megatron-Core's GPT"):
            convert_checkpoint(tmp_path / "src", tmp_path / "meg", target_format="megatron-torch-dist")
    assert not (tmp_path / "meg").exists()  # refused before anything was written
