"""Megatron's torch_dist format: checkpoints written by PyTorch's torch.distributed.checkpoint as Megatron-Core
writes them (tests/convert_dist.py), in one process and by 2 processes joined by gloo (tensor-parallel shards,
pipeline stages, expert-parallel experts as chunks of the global tensors), read without PyTorch and converted
to mindtron with the source's logits (a Mixture-of-Experts model written at EP=2 included, its experts read
with their global shapes); mindtron written back as torch_dist (read by PyTorch's DCP itself, and round-tripping)."""
import argparse
import io
import json
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")  # the fixtures are written by PyTorch's own DCP (test extra)

import convert_dist as D  # noqa: E402
import convert_fixtures as F  # noqa: E402
from reference_gpt import reference_logits  # noqa: E402
from numerics import rel_err  # noqa: E402
from test_convert_megatron import loaded_logits, tokens_for  # noqa: E402
from mindtron.convert import convert_checkpoint, read_checkpoint  # noqa: E402
from mindtron.convert.dcp_reader import DcpCheckpoint  # noqa: E402
from mindtron.convert.megatron_dist import read_model_tensors  # noqa: E402


def whole_core(weights):
    """The whole model by per-layer Megatron-Core keys with the fused norm names (torch_dist's spelling)."""
    return {k: v for k, v in F.core_model_state(weights, transformer_engine=True).items() if "_extra_state" not in k}


def common_bytes(cfg, tp, pp, iteration=20):
    """(torch.save([common state]), torch.save(common state)): Megatron-Core 0.19's common_state object and
    0.18's common.pt, with the enum and signal arguments a current Megatron run stores."""
    with F.megatron_enum_modules() as enums:
        args = argparse.Namespace(**F.megatron_core_args(cfg, tp, pp, enums, ckpt_format="torch_dist"),
                                  params_dtype=torch.bfloat16)
        state = {"args": args, "checkpoint_version": 3.0, "iteration": iteration,
                 "num_floating_point_operations_so_far": 1.5e12,
                 "content_metadata": {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}}
        return D.saved_bytes([state]).getvalue(), D.saved_bytes(state).getvalue()


def moe_model():
    """A Mixtral-style model with a gated shared expert and sigmoid routing with an expert bias, every layer MoE."""
    from mindtron.parallel_core.moe import MoEConfig
    return F.config("llama", moe_config=MoEConfig(
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True))


def moe_tensors(cfg, weights):
    """The model as torch_dist stores it (written here from the format's description): stacked experts [L, E, ...]
    by global index, router [L, E, h], expert bias [L, E], shared experts [L, ...] ("experts"), and the dense parts
    by per-layer keys, an MoE layer's norm as pre_mlp_layernorm (Transformer Engine), which the writer stacks
    ("dense")."""
    L, layer = cfg.num_layers, "language_model.encoder.layers.{}.mlp."
    parts = {"router.weight": "mlp.router.weight", "router.expert_bias": "mlp.router.expert_bias",
             "experts.dense_h_to_4h.weight": "mlp.experts.experts.linear_fc1.weight",
             "experts.dense_4h_to_h.weight": "mlp.experts.experts.linear_fc2.weight",
             "shared_experts.dense_h_to_4h.weight": "mlp.shared_experts.linear_fc1.weight",
             "shared_experts.dense_4h_to_h.weight": "mlp.shared_experts.linear_fc2.weight",
             "shared_experts.gate_weight": "mlp.shared_experts.gate_weight"}
    experts = {f"decoder.layers.{key}": np.stack([weights[layer.format(i) + part] for i in range(L)])
               for part, key in parts.items()}
    dense = whole_core({k: v for k, v in weights.items() if not any(p in k for p in F.MOE_PARTS)})
    for i in range(L):
        norm = dense.pop(f"decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight")
        dense[f"decoder.layers.{i}.pre_mlp_layernorm.weight"] = norm
    return experts, dense


@pytest.fixture(scope="module")
def two_process_checkpoints(tmp_path_factory):
    """One launch of 2 processes (gloo) writes: a Llama-style model at TP=2 (each rank its tensor-parallel
    shards), a GPT-2 style model at PP=2 (each rank its stage's layers) and an MoE model at EP=2."""
    root = tmp_path_factory.mktemp("dist2")
    llama, gpt2 = F.config("llama"), F.config("gpt2", num_layers=4)
    llama_w, gpt2_w = F.random_weights(llama, 21), F.random_weights(gpt2, 22)
    moe_cfg = moe_model()
    moe_w = F.random_weights(moe_cfg, 26)
    experts, dense = moe_tensors(moe_cfg, moe_w)
    moe_args = argparse.Namespace(**F.megatron_moe_args(moe_cfg, 1, 1, 2, ckpt_format="torch_dist"))
    jobs = [dict(root=str(root / "llama_tp2"), iteration=20, common=common_bytes(llama, 2, 1)[0],
                 whole=whole_core(llama_w), num_layers=llama.num_layers, swiglu=True, tp=2, pp=1),
            dict(root=str(root / "gpt2_pp2"), iteration=30, common=common_bytes(gpt2, 1, 2, 30)[0],
                 whole=whole_core(gpt2_w), num_layers=gpt2.num_layers, swiglu=False, tp=1, pp=2),
            dict(root=str(root / "moe_ep2"), iteration=20, common=D.saved_bytes(
                [{"args": moe_args, "checkpoint_version": 3.0, "iteration": 20}]).getvalue(),
                 experts=experts, dense=dense, num_layers=moe_cfg.num_layers, ep=2)]
    D.spawn_writers(jobs)
    return {"root": root, "llama": (llama, llama_w), "gpt2": (gpt2, gpt2_w), "moe": (moe_cfg, moe_w, experts)}


def test_tp2_checkpoint_written_by_two_processes_converts_with_the_source_logits(two_process_checkpoints, tmp_path):
    cfg, weights = two_process_checkpoints["llama"]
    src = two_process_checkpoints["root"] / "llama_tp2"
    assert sorted(p.name for p in (src / "iter_0000020").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "metadata.json"]  # each process wrote its own file
    report = convert_checkpoint(src, tmp_path / "tp1", 1, 1)
    assert report.source_format == "megatron-torch-dist" and report.source_layout == (2, 1, 1)
    assert report.iteration == 20 and report.files_read == 2 and "signal.Signals" in report.placeholders
    assert "megatron.core.transformer.enums.AttnBackend" in report.placeholders
    assert not any(m.startswith("megatron") for m in sys.modules)  # the enums were never imported
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tmp_path / "tp1", tokens), reference_logits(cfg, weights, tokens)) < 1e-5
    report = convert_checkpoint(src, tmp_path / "tp2", 2, 1, verify=True)  # and straight to TP=2
    assert report.verify["relative"] < 1e-5
    for key, value in weights.items():
        np.testing.assert_array_equal(read_checkpoint(tmp_path / "tp2").tensors[key], value, err_msg=key)


def test_pp2_checkpoint_written_by_two_processes_holds_every_layer(two_process_checkpoints, tmp_path):
    cfg, weights = two_process_checkpoints["gpt2"]
    src = two_process_checkpoints["root"] / "gpt2_pp2"
    report = convert_checkpoint(src, tmp_path / "dst", 2, 2, verify=True)
    assert report.iteration == 30 and report.source_layout == (1, 2, 1) and report.verify["relative"] < 1e-5
    full = read_checkpoint(tmp_path / "dst")
    assert set(full.tensors) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)


def test_moe_checkpoint_written_at_ep2_converts_with_the_source_logits(two_process_checkpoints, tmp_path):
    cfg, weights, experts = two_process_checkpoints["moe"]
    src = two_process_checkpoints["root"] / "moe_ep2"
    ckpt = DcpCheckpoint(src / "iter_0000020")
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert ckpt.tensors[fc1].shape == (cfg.num_layers, 4, 32, cfg.hidden_size)
    assert len({c.file for c in ckpt.tensors[fc1].chunks}) == 2  # experts 0-1 from rank 0, 2-3 from rank 1
    for key, value in experts.items():
        np.testing.assert_array_equal(ckpt.read_tensor(key), value, err_msg=key)
    per_layer = read_model_tensors(ckpt, list(experts))  # named per layer and global expert, as the torch format
    np.testing.assert_array_equal(per_layer["decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight"],
                                  experts[fc1][1, 3])
    np.testing.assert_array_equal(per_layer["decoder.layers.0.mlp.router.expert_bias"],
                                  experts["decoder.layers.mlp.router.expert_bias"][0])
    report = convert_checkpoint(src, tmp_path / "dst", 1, 1, verify=True)
    assert report.source_format == "megatron-torch-dist" and report.source_experts == (2, 1)
    assert report.verify["relative"] < 1e-5
    full = read_checkpoint(tmp_path / "dst")
    assert set(full.tensors) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tmp_path / "dst", tokens), reference_logits(cfg, weights, tokens)) < 1e-5


@pytest.mark.parametrize("case", ["tp2_bf16_common_state", "pp2_common_pt"])
def test_single_process_checkpoints_convert_with_the_source_logits(tmp_path, case):
    """Written by one process without a process group: TP=2 shards in bfloat16 with the 0.19 common_state, and
    PP=2 stages with Megatron-Core 0.18's common.pt."""
    if case.startswith("tp2"):
        cfg, tp, pp, dtype, kind = F.config("llama"), 2, 1, torch.bfloat16, 0
    else:
        cfg, tp, pp, dtype, kind = F.config("gpt2"), 1, 2, torch.float32, 1
    weights = F.random_weights(cfg, 23)
    items, common_pt = common_bytes(cfg, tp, pp)
    D.write_single(tmp_path / "src", whole_core(weights), cfg.num_layers, cfg.hidden_act == "swiglu", items, tp=tp,
                   pp=pp, common_pt=common_pt if kind else None, dtype=dtype)
    assert (tmp_path / "src" / "iter_0000020" / "common.pt").exists() == bool(kind)
    reader = "torch" if kind else "python"  # PyTorch's restricted loader reads the items too
    report = convert_checkpoint(tmp_path / "src", tmp_path / "dst", 1, 1, verify=True, reader=reader)
    assert report.iteration == 20 and report.checkpoint_version == 3 and report.source_layout == (tp, pp, 1)
    assert "signal.Signals" in report.placeholders, reader
    assert "num_floating_point_operations_so_far" in report.not_converted
    if dtype == torch.bfloat16:
        weights = {k: torch.from_numpy(v).bfloat16().float().numpy() for k, v in weights.items()}
    full = read_checkpoint(tmp_path / "dst")
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tmp_path / "dst", tokens), reference_logits(cfg, weights, tokens)) < 1e-5


def _stacked(weights, num_layers):
    """The torch_dist tensors of a model, stacked by this test's own code (independent of the writer)."""
    out, layers = {}, {}
    for key, value in whole_core(weights).items():
        match = D.LAYER_KEY.match(key)
        if match:
            layers.setdefault(f"decoder.layers.{match.group(2)}", {})[int(match.group(1))] = value
        else:
            out[key] = value
    out.update({k: np.stack([v[i] for i in range(num_layers)]) for k, v in layers.items()})
    return out


def _object(loaded):
    """An object DCP loaded into a BytesIO destination (PyTorch versions deserialize it already, or not: Megatron
    accepts both), read with PyTorch's restricted loader as Megatron-Core reads its common state."""
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(loaded, weights_only=True)
    return loaded


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_mindtron_to_torch_dist_is_read_by_pytorch_dcp_and_round_trips(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "llama", 2, 2, "core", seed=24)
    convert_checkpoint(src, tmp_path / "mid", 1, 1)
    report = convert_checkpoint(tmp_path / "mid", tmp_path / "dist", 2, 2, target_format="megatron-torch-dist",
                                verify=True)
    assert report.target_format == "megatron-torch-dist" and report.verify["relative"] < 1e-5
    directory = tmp_path / "dist" / "iter_0000020"
    assert (tmp_path / "dist" / "latest_checkpointed_iteration.txt").read_text() == "20"
    assert json.loads((directory / "metadata.json").read_text()) == {"sharded_backend": "torch_dist",
                                                                     "sharded_backend_version": 1}
    # PyTorch's DCP loads every tensor Megatron-Core asks for, by key and global shape, in one process.
    want = _stacked(weights, cfg.num_layers)
    loaded = {k: torch.zeros(v.shape) for k, v in want.items()}
    loaded["common_state/shard_0_1"] = io.BytesIO()  # as Megatron-Core 0.19 loads its common state
    extra = [f"decoder.layers.{m}._extra_state/shard_{i}_{cfg.num_layers}" for m in D.TE_MODULES
             for i in range(cfg.num_layers)]
    loaded.update({k: io.BytesIO() for k in extra})
    dcp.load(loaded, storage_reader=FileSystemReader(str(directory)), no_dist=True)
    for key, value in want.items():
        np.testing.assert_array_equal(loaded[key].numpy(), value, err_msg=key)
    assert set(FileSystemReader(str(directory)).read_metadata().state_dict_metadata) == \
        set(want) | set(extra) | {"common_state/shard_0_1"}
    for key in extra:
        assert _object(loaded[key]) == [None]
    # The common state as Megatron-Core reads it when DCP hands back the raw item: torch.load(weights_only=True).
    metadata = FileSystemReader(str(directory)).read_metadata()
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == "common_state/shard_0_1")
    raw = (directory / info.relative_path).read_bytes()[info.offset:info.offset + info.length]
    common = _object(io.BytesIO(raw))[0]
    assert common.keys() == _object(loaded["common_state/shard_0_1"])[0].keys()
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 20
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (2, 2)
    assert args.ckpt_format == "torch_dist" and args.use_mcore_models and args.no_save_optim and args.no_save_rng
    for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size",
                "padded_vocab_size", "swiglu", "normalization", "untie_embeddings_and_output_weights"):
        assert getattr(args, key) == F.megatron_args(cfg, 2, 2)[key], key
    # and back: torch_dist -> mindtron gives the very same tensors
    convert_checkpoint(tmp_path / "dist", tmp_path / "back", 1, 1)
    back = read_checkpoint(tmp_path / "back")
    for key, value in weights.items():
        np.testing.assert_array_equal(back.tensors[key], value, err_msg=key)


def test_writing_torch_dist_without_pytorch_says_what_to_install(tmp_path, monkeypatch):
    from mindtron.convert import megatron_dist_writer

    cfg, weights, src = F.build_checkpoint(tmp_path / "src", "gpt2", 1, 1, "legacy", extras=False)
    monkeypatch.setattr(megatron_dist_writer, "torch_available", lambda: False)
    with pytest.raises(ValueError, match="megatron-torch-dist writes through PyTorch.*pip install torch"):
        convert_checkpoint(src, tmp_path / "dst", target_format="megatron-torch-dist")
    assert not (tmp_path / "dst").exists()


def test_damaged_or_incomplete_torch_dist_files_are_named(tmp_path):
    cfg = F.config("gpt2")
    weights = F.random_weights(cfg, 25)
    D.write_single(tmp_path / "src", whole_core(weights), cfg.num_layers, False, common_bytes(cfg, 1, 1)[0])
    data = tmp_path / "src" / "iter_0000020" / "__0_0.distcp"
    original = data.read_bytes()
    data.write_bytes(original[: len(original) // 2])
    with pytest.raises(ValueError, match=r"__0_0.distcp \(bytes \d+\.\.\d+\) lies beyond the end of the file"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    damaged = bytearray(original)
    damaged[len(original) // 2: len(original) // 2 + 4096] = b"\xff" * 4096  # headers and values of some items
    data.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"__0_0.distcp \(bytes \d+\.\.\d+\)"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    data.unlink()
    with pytest.raises(FileNotFoundError, match=r"__0_0.distcp is missing \(it holds .*\): the checkpoint is "
                                                r"incomplete"):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
