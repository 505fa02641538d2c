"""Mixture-of-Experts checkpoints converted both ways: Megatron-Core MoE checkpoints saved with the real torch.save
(per-expert SequentialMLP names, legacy grouped-GEMM weight1/weight2, Transformer Engine's grouped
linear_fc1.weightI; experts spread over EP=2 rank files, TP=2 shards with expert tensor parallel 2 or 1 (the
latter with only the two files a 2-GPU run writes), PP=2 x EP=2 folders, shared experts with a gate, expert
bias, router biases) give the float64 reference logits at EP=1; mindtron checkpoints at EP=2 (folders per
expert rank) read back and load at EP=1; round trips through Megatron-Core's torch format (EP files, compared
with the fixture's own files) and torch_dist (stacked or per layer) are exact; tensors that cannot be placed
are errors naming them. (The 2-rank loads at EP=2 are in test_convert_parallel.py's launch, the 2-process
torch_dist MoE checkpoint in test_convert_dist.py.)"""
import json
import shutil

import numpy as np
import pytest

import convert_fixtures as F
from reference_gpt import reference_logits
from numerics import rel_err
from test_convert_megatron import loaded_logits, tokens_for
from mindtron.convert import convert_checkpoint, read_checkpoint
from mindtron.convert.cli import main as cli_main

torch = pytest.importorskip("torch")  # the Megatron fixtures are written with torch.save


def megatron_moe_checkpoint(root, name, tp, pp, ep, etp=None, experts="sequential", seed=3, edit=None):
    """(config, whole-model weights, directory) of a Megatron-Core MoE checkpoint; `edit(key, model)` may change
    the model dict of rank (tp, pp, ep) before it is saved."""
    cfg = F.moe_config(name)
    weights = F.random_weights(cfg, seed)
    models = F.megatron_moe_models(cfg, weights, tp, pp, ep, etp, experts)
    for key, model in models.items():
        if edit is not None:
            edit(key, model)
    F.save_with_torch(root, models, F.megatron_moe_args(cfg, tp, pp, ep, etp, experts))
    return cfg, weights, root


def assert_same_weights(full, weights):
    assert set(full.tensors) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)


@pytest.mark.parametrize("name,tp,pp,ep,etp,experts,folders", [
    ("mixtral", 2, 1, 2, 2, "sequential", ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]),
    ("mixtral", 1, 1, 2, 1, "grouped", ["mp_rank_00_000", "mp_rank_00_001"]),
    # what 2 GPUs save at TP=2, expert TP=1, EP=2: rank r is tensor rank r and expert rank r, one file each
    ("gpt2_moe", 2, 1, 2, 1, "te_grouped", ["mp_rank_00_000", "mp_rank_01_001"]),
    ("deepseek", 1, 2, 2, 1, "sequential", ["mp_rank_00_000_000", "mp_rank_00_000_001", "mp_rank_00_001_000",
                                            "mp_rank_00_001_001"]),
])
def test_megatron_core_moe_checkpoint_gives_the_reference_logits(tmp_path, name, tp, pp, ep, etp, experts, folders):
    cfg, weights, src = megatron_moe_checkpoint(tmp_path / "src", name, tp, pp, ep, etp, experts)
    for folder in (src / "iter_0000020").iterdir():
        if folder.name not in folders:
            shutil.rmtree(folder)
    report = convert_checkpoint(src, tmp_path / "dst", 1, 1, verify=True)
    assert report.files_read == len(folders)
    assert report.source_format == "megatron-core" and report.source_layout == (tp, pp, 1)
    assert report.source_experts == (ep, etp) and report.target_experts == (1, 1)
    assert report.verify["relative"] < 1e-5
    moe_layers = sum(cfg.moe_config.is_moe_layer(i, cfg.num_layers) for i in range(cfg.num_layers))
    stacks = 2 * moe_layers * (2 if cfg.add_bias_linear else 1)
    assert report.experts[f"expert stacks of {cfg.moe_config.num_experts} experts"] == stacks
    summary = report.summary()
    assert f"x EP={ep} (expert TP={etp})" in summary and "of which Mixture of Experts" in summary
    assert f"MoE layers {[i for i in range(cfg.num_layers) if cfg.moe_config.is_moe_layer(i, cfg.num_layers)]}" \
        in report.model
    assert_same_weights(read_checkpoint(tmp_path / "dst"), weights)
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tmp_path / "dst", tokens), reference_logits(cfg, weights, tokens)) < 1e-5


def test_expert_parallel_mindtron_checkpoint_loads_at_ep1_and_reshards(tmp_path, capsys):
    """Written at EP=2 x TP=2 by the command line: one folder per (tensor, expert) rank with the layout in
    meta.json; mindtron's loader regathers the experts at EP=1, and --source-format mindtron reshards it."""
    cfg, weights, src = megatron_moe_checkpoint(tmp_path / "src", "deepseek", 1, 1, 2, seed=4)
    status = cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "ep2"), "--target-tensor-parallel-size",
                       "2", "--target-expert-parallel-size", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert status == 0 and "into mindtron checkpoint" in out and "TP=2 x PP=1 x EP=2 (expert TP=2)" in out
    folders = sorted(p.name for p in (tmp_path / "ep2" / "iter_0000020").iterdir())
    assert folders == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    meta = json.loads((tmp_path / "ep2" / "iter_0000020" / "mp_rank_01_001" / "meta.json").read_text())
    assert {k: meta["layout"][k] for k in ("tp", "ep", "etp", "directories")} == \
        {"tp": 2, "ep": 2, "etp": 2, "directories": 4}
    assert meta["args"]["model_config"]["moe_config"]["moe_shared_expert_gate"] is True
    from safetensors.numpy import load_file

    shard = load_file(str(tmp_path / "ep2" / "iter_0000020" / "mp_rank_01_001" / "model.safetensors"))
    fc1 = "language_model.encoder.layers.1.mlp.experts.dense_h_to_4h.weight"
    whole = weights[fc1][2:]  # expert rank 1: global experts 2 and 3; tensor rank 1: their second halves
    gate, up = np.split(whole, 2, axis=1)
    np.testing.assert_array_equal(shard[fc1], np.concatenate([gate[:, 8:], up[:, 8:]], axis=1))
    # mindtron's own loader (what pretrain --load does) at EP=1 regathers the experts of both folders
    tp1 = tmp_path / "tp1_ep2"
    convert_checkpoint(tmp_path / "ep2", tp1, 1, 1, target_ep=2)
    tokens = tokens_for(cfg)
    assert rel_err(loaded_logits(cfg, tp1, tokens), reference_logits(cfg, weights, tokens)) < 1e-5
    report = convert_checkpoint(tmp_path / "ep2", tmp_path / "ep1", 1, 1, verify=True)  # mindtron -> mindtron
    assert report.source_format == "mindtron" and report.source_experts == (2, 2)
    assert_same_weights(read_checkpoint(tmp_path / "ep1"), weights)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("name", ["mixtral", "deepseek"])
def test_round_trips_through_megatron_core_formats_are_exact(tmp_path, name):
    """mindtron EP=2 -> Megatron-Core torch format at TP=2 x EP=2 (the very files Megatron's layout gives, as the
    fixture builds them) -> mindtron; and -> torch_dist (stacked over layers, or per layer with a
    --moe-layer-freq pattern; PyTorch's DCP reads it) -> mindtron: the same tensors."""
    from torch.distributed.checkpoint import FileSystemReader

    cfg, weights, src = megatron_moe_checkpoint(tmp_path / "src", name, 1, 1, 2, seed=5)
    convert_checkpoint(src, tmp_path / "mid", 1, 1, target_ep=2)
    report = convert_checkpoint(tmp_path / "mid", tmp_path / "core", 2, 1, target_format="megatron-core",
                                target_ep=2, verify=True)
    assert report.target_format == "megatron-core" and report.target_experts == (2, 2)
    want = F.megatron_moe_models(cfg, weights, 2, 1, 2)
    for (t, p, e), model in want.items():
        written = torch.load(tmp_path / "core" / "iter_0000020" / F.rank_dir(t, p, 1, e, 2) / "model_optim_rng.pt",
                             weights_only=False)
        tensors = {k: v for k, v in written["model"].items() if "_extra_state" not in k}
        assert tensors.keys() == {k for k in model if "_extra_state" not in k}, (t, e)
        for key, value in tensors.items():
            np.testing.assert_array_equal(value.numpy(), model[key], err_msg=key)
        args = written["args"]
        assert args.use_mcore_models and args.num_experts == 4 and args.expert_model_parallel_size == 2
        assert args.moe_layer_freq == cfg.moe_config.moe_layer_freq and not args.moe_grouped_gemm
    convert_checkpoint(tmp_path / "core", tmp_path / "back", 1, 1)
    assert_same_weights(read_checkpoint(tmp_path / "back"), weights)

    report = convert_checkpoint(tmp_path / "mid", tmp_path / "dist", 2, 1, target_format="megatron-torch-dist",
                                target_ep=2, verify=True)
    assert report.target_experts == (2, 2)
    keys = FileSystemReader(str(tmp_path / "dist" / "iter_0000020")).read_metadata().state_dict_metadata
    if name == "mixtral":  # every layer MoE: stacked over layers, experts by global index
        assert tuple(keys["decoder.layers.mlp.experts.experts.linear_fc1.weight"].size) == (2, 4, 48, 32)
        assert "decoder.layers.pre_mlp_layernorm.weight" in keys
        assert "decoder.layers.mlp.experts.experts.linear_fc2._extra_state/shard_1.3_2.4" in keys
    else:  # a dense first layer: Megatron-Core's per-layer keys
        assert tuple(keys["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"].size) == (4, 32, 32)
        assert tuple(keys["decoder.layers.1.mlp.router.expert_bias"].size) == (4,)
        assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys
        assert "decoder.layers.1.mlp.shared_experts.linear_fc1._extra_state/shard_0_1" in keys
    convert_checkpoint(tmp_path / "dist", tmp_path / "dist_back", 1, 1, target_ep=2)
    assert_same_weights(read_checkpoint(tmp_path / "dist_back"), weights)


def test_moe_tensors_that_cannot_be_placed_are_named(tmp_path):
    def beyond(key, model):  # expert rank 1's file holds a third local expert: global index 6 of 4
        if key == (0, 0, 1):
            model["decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight"] = \
                model["decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]

    src = megatron_moe_checkpoint(tmp_path / "beyond", "mixtral", 1, 1, 2, edit=beyond)[2]
    with pytest.raises(ValueError, match=r"mp_rank_00_001/model_optim_rng.pt: decoder.layers.0.mlp.experts."
                                         r"local_experts.2.linear_fc1.weight is local expert 2, but each expert-"
                                         r"parallel rank holds 2 experts"):
        convert_checkpoint(src, tmp_path / "dst")

    def unknown(key, model):
        model["decoder.layers.1.mlp.router.qb_beta"] = np.zeros(4, np.float32)

    src = megatron_moe_checkpoint(tmp_path / "unknown", "mixtral", 1, 1, 2, edit=unknown)[2]
    with pytest.raises(ValueError, match=r"cannot place 1 tensor\(s\) \['decoder.layers.1.mlp.router.qb_beta'\]"):
        convert_checkpoint(src, tmp_path / "dst")

    def lost(key, model):
        if key == (0, 0, 0):
            del model["decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight"]

    src = megatron_moe_checkpoint(tmp_path / "lost", "mixtral", 1, 1, 2, edit=lost)[2]
    with pytest.raises(ValueError, match=r"local experts \[0\] of language_model.encoder.layers.1.mlp.experts."
                                         r"dense_4h_to_h.weight are missing"):
        convert_checkpoint(src, tmp_path / "dst")
    (src / "iter_0000020" / "mp_rank_00_001" / "model_optim_rng.pt").unlink()
    (src / "iter_0000020" / "mp_rank_00_001").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lacks \['mp_rank_XX_001'\]"):
        convert_checkpoint(src, tmp_path / "dst")

    good = megatron_moe_checkpoint(tmp_path / "good", "mixtral", 1, 1, 2)[2]
    with pytest.raises(ValueError, match="--num-experts 4 is not divisible by --target-expert-parallel-size 3"):
        convert_checkpoint(good, tmp_path / "dst", target_ep=3)
    with pytest.raises(ValueError, match="legacy model has no Mixture-of-Experts.*megatron-core"):
        convert_checkpoint(good, tmp_path / "dst", target_format="megatron-legacy")
    with pytest.raises(ValueError, match="--target-expert-tensor-parallel-size 2 must divide"):
        convert_checkpoint(good, tmp_path / "dst", target_format="megatron-core", target_etp=2)
    dense = F.build_checkpoint(tmp_path / "dense", "gpt2", 1, 1)[2]
    with pytest.raises(ValueError, match="--target-expert-parallel-size > 1 needs an MoE model"):
        convert_checkpoint(dense, tmp_path / "dst", target_ep=2)
    assert not (tmp_path / "dst").exists()


def test_torch_dist_expert_keys_of_every_layout_name_each_expert():
    """torch_dist keys stacked over layers and experts, per layer (non-homogeneous layers) and per expert
    (singleton_local_shards) all become the per-layer, per-expert names of the torch format."""
    from mindtron.convert.names_dist import unstack

    stack = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    got = dict(unstack("decoder.layers.mlp.experts.experts.linear_fc1.weight", stack, [0, 1]))
    np.testing.assert_array_equal(got["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"], stack[1, 2])
    assert len(got) == 8
    got = dict(unstack("decoder.layers.3.mlp.experts.experts.linear_fc2.bias", stack[0], [0]))
    np.testing.assert_array_equal(got["decoder.layers.3.mlp.experts.local_experts.3.linear_fc2.bias"], stack[0, 3])
    assert len(got) == 4
    got = dict(unstack("decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight", stack[0, 0], [0]))
    assert list(got) == ["decoder.layers.3.mlp.experts.local_experts.5.linear_fc1.weight"]
    got = dict(unstack("decoder.layers.3.mlp.router.weight", stack[0], [0]))
    assert list(got) == ["decoder.layers.3.mlp.router.weight"]
