"""Conversion errors a user can meet, each naming the file, tensor or flag and what to do: tensors with no place
in the model, missing or damaged files, malicious pickles, unsupported features and layouts, mistyped flags."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest

import convert_fixtures as F
from convert_bytes import Call, Global, write_torch_zip
from mindtron.convert import UnsafeCheckpointError, convert_checkpoint
from mindtron.convert.cli import main as cli_main


def write_checkpoint(root: Path, name="gpt2", scheme="legacy", tp=1, edit=None, args_edit=None, seed=0):
    """A Megatron checkpoint written without PyTorch; `edit(rank, model)` may change each rank's model dict."""
    cfg = F.config(name)
    weights = F.random_weights(cfg, seed)
    args = F.megatron_args(cfg, tp, 1)
    args.update(args_edit or {})
    for (t, p), shard in F.megatron_shards(cfg, weights, tp, 1).items():
        model = (F.legacy_model_state(shard) if scheme == "legacy"
                 else F.core_model_state(shard, transformer_engine=False))
        if edit is not None:
            edit(t, model)
        path = root / "iter_0000020" / F.rank_dir(t, p, 1) / "model_optim_rng.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_torch_zip(path, {"args": argparse.Namespace(**args), "checkpoint_version": 3.0, "iteration": 20,
                               "model": model})
    (root / "latest_checkpointed_iteration.txt").write_text("20")
    return root


def test_an_unknown_tensor_is_an_error_naming_it(tmp_path):
    def add_qk_norm(rank, model):
        model["language_model"]["encoder"]["layers.0.self_attention.q_layernorm.weight"] = np.ones(8, np.float32)

    src = write_checkpoint(tmp_path / "src", edit=add_qk_norm)
    with pytest.raises(ValueError, match=r"mp_rank_00/model_optim_rng.pt: cannot place 1 tensor\(s\) "
                                         r"\['language_model.encoder.layers.0.self_attention.q_layernorm.weight'\]"):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()  # nothing written

    def add_router(rank, model):
        model["decoder.layers.1.mlp.router.weight"] = np.ones((4, 32), np.float32)

    src = write_checkpoint(tmp_path / "core", scheme="core", edit=add_router)
    with pytest.raises(ValueError, match=r"unexpected language_model.encoder.layers.1.mlp.router.weight \[4, 32\]: the "
                                         r"settings leave no place for it \(decided by --num-experts"):
        convert_checkpoint(src, tmp_path / "dst")  # an MoE tensor in a dense model is not dropped

    def add_third_projection(rank, model):
        model["decoder.layers.1.mlp.experts.local_experts.0.linear_fc3.weight"] = np.ones((4, 32), np.float32)

    src = write_checkpoint(tmp_path / "core3", scheme="core", edit=add_third_projection)
    with pytest.raises(ValueError, match=r"\['decoder.layers.1.mlp.experts.local_experts.0.linear_fc3.weight'\].*"
                                         r"megatron-core naming scheme"):
        convert_checkpoint(src, tmp_path / "dst")


def test_a_missing_tensor_or_wrong_shape_names_the_flag(tmp_path):
    src = write_checkpoint(tmp_path / "src", edit=lambda r, m: m["language_model"]["encoder"].pop(
        "layers.1.mlp.dense_4h_to_h.bias"))
    with pytest.raises(ValueError, match=r"missing language_model.encoder.layers.1.mlp.dense_4h_to_h.bias "
                                         r"\(decided by --disable-bias-linear\)"):
        convert_checkpoint(src, tmp_path / "dst")
    src = write_checkpoint(tmp_path / "src2", args_edit={"ffn_hidden_size": 64})
    with pytest.raises(ValueError, match=r"dense_h_to_4h.weight has shape \[128, 32\], the settings give \[64, 32\] "
                                         r"\(decided by --ffn-hidden-size"):
        convert_checkpoint(src, tmp_path / "dst")
    report = convert_checkpoint(src, tmp_path / "dst", overrides={"ffn_hidden_size": 128})  # the flag fixes it
    assert "ffn 128" in report.model


def test_missing_and_damaged_files_name_the_file(tmp_path):
    src = write_checkpoint(tmp_path / "src", tp=2)
    victim = src / "iter_0000020" / "mp_rank_01" / "model_optim_rng.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=r"mp_rank_01/model_optim_rng.pt is not a complete PyTorch checkpoint"):
        convert_checkpoint(src, tmp_path / "dst")
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=r"mp_rank_01/model_optim_rng.pt is missing"):
        convert_checkpoint(src, tmp_path / "dst")
    victim.parent.rmdir()
    (src / "iter_0000020" / "mp_rank_02").mkdir()
    (src / "iter_0000020" / "mp_rank_02" / "model_optim_rng.pt").write_bytes(
        (src / "iter_0000020" / "mp_rank_00" / "model_optim_rng.pt").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lacks \['mp_rank_01'\]"):
        convert_checkpoint(src, tmp_path / "dst")
    with pytest.raises(FileNotFoundError, match="has no latest_checkpointed_iteration.txt"):
        convert_checkpoint(tmp_path, tmp_path / "dst")
    (src / "latest_checkpointed_iteration.txt").write_text("30")
    with pytest.raises(FileNotFoundError, match="names iter_0000030, which does not exist"):
        convert_checkpoint(src, tmp_path / "dst")


def test_a_damaged_mindtron_checkpoint_fails_its_crc(tmp_path):
    src = write_checkpoint(tmp_path / "src")
    convert_checkpoint(src, tmp_path / "mid")
    model = tmp_path / "mid" / "iter_0000020" / "mp_rank_00" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-7] ^= 0x40
    model.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"CRC mismatch in .*mp_rank_00/model.safetensors"):
        convert_checkpoint(tmp_path / "mid", tmp_path / "out")


def test_a_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"

    def plant(rank, model):
        model["language_model"]["encoder"]["layers.0.input_norm.weight"] = Call(Global("os", "system"),
                                                                                f"touch {marker}")

    src = write_checkpoint(tmp_path / "src", edit=plant)
    with pytest.raises(UnsafeCheckpointError, match="calls os.system"):
        convert_checkpoint(src, tmp_path / "dst")
    assert cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "dst"), "--no-progress"]) == 1
    assert "error: refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "dst").exists()


def test_features_mindtron_lacks_and_impossible_layouts_are_refused(tmp_path):
    src = write_checkpoint(tmp_path / "moe", args_edit={"num_experts": 8})  # MoE by its args, dense by its tensors
    with pytest.raises(ValueError, match=r"layers \[0, 1\] hold a dense MLP where the settings put Mixture-of-Experts "
                                         r"layers \(decided by --num-experts, --moe-layer-freq\)\n  missing language_"
                                         r"model.encoder.layers.0.mlp.experts.dense_4h_to_h.bias"):
        convert_checkpoint(src, tmp_path / "dst")
    src = write_checkpoint(tmp_path / "glu", args_edit={"num_experts": 8, "moe_mlp_glu_interleave_size": 16})
    with pytest.raises(ValueError, match=r"experts with interleaved GLU rows \(--moe-mlp-glu-interleave-size\).*"
                                         r"cannot be converted"):
        convert_checkpoint(src, tmp_path / "dst")
    src = write_checkpoint(tmp_path / "src")
    with pytest.raises(ValueError, match="--num-attention-heads = 4 is not divisible by --target-tensor-parallel-size 3"):
        convert_checkpoint(src, tmp_path / "dst", target_tp=3)
    with pytest.raises(ValueError, match="--num-layers 2 cannot be split evenly over 4 pipeline stages"):
        convert_checkpoint(src, tmp_path / "dst", target_pp=4)
    with pytest.raises(ValueError, match="--save-dir must differ from --load-dir"):
        convert_checkpoint(src, src)


def test_distributed_checkpoints_that_cannot_be_read_say_why(tmp_path):
    dist = tmp_path / "dist" / "iter_0000001"
    dist.mkdir(parents=True)
    (dist.parent / "latest_checkpointed_iteration.txt").write_text("1")
    (dist / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(FileNotFoundError, match=r"iter_0000001/.metadata is missing: the torch_dist checkpoint is "
                                                r"incomplete"):
        convert_checkpoint(dist.parent, tmp_path / "dst")
    (dist / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
    with pytest.raises(ValueError, match="sharded backend 'zarr'.*--ckpt-convert-format torch_dist"):
        convert_checkpoint(dist.parent, tmp_path / "dst")
    (dist / "metadata.json").unlink()
    (dist / ".metadata").write_bytes(b"\x80\x04N.")
    with pytest.raises(ValueError, match="without Megatron's metadata.json.*torch_dcp"):
        convert_checkpoint(dist, tmp_path / "dst")  # pointed at the iteration directory itself
    (dist / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    with pytest.raises(ValueError, match=r"expected a metadata.Metadata in .metadata, found None"):
        convert_checkpoint(dist.parent, tmp_path / "dst")
    (dist / ".metadata").write_bytes(b"\x80\x04\x8c\x05posix\x8c\x06system\x93\x8c\x04true\x85R.")
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: its pickle calls posix.system"):
        convert_checkpoint(dist.parent, tmp_path / "dst")
    with pytest.raises(ValueError, match="not a torch_dist checkpoint.*drop --source-format megatron-torch-dist"):
        convert_checkpoint(write_checkpoint(tmp_path / "torch"), tmp_path / "dst",
                           source_format="megatron-torch-dist")


def test_cli_flag_errors(tmp_path, capsys):
    src = write_checkpoint(tmp_path / "src")
    assert cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "x"), "--num-layer", "3"]) == 1
    assert "unknown argument(s): --num-layer; did you mean --num-layers" in capsys.readouterr().err
    assert cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "x"), "--target-num-layer-list", "a"]) == 1
    assert "--target-num-layer-list 'a' should be comma-separated" in capsys.readouterr().err
    assert cli_main(["--load-dir", str(src), "--save-dir", str(tmp_path / "x"), "--target-pipeline-parallel-size",
                     "2", "--target-num-layer-list", "2,0", "--no-progress"]) == 0
    stage1 = tmp_path / "x" / "iter_0000020" / "mp_rank_00_001" / "meta.json"
    assert json.loads(stage1.read_text())["args"]["model_config"]["num_layer_list"] == [2, 0]
