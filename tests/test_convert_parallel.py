"""Converted checkpoints loaded at tensor-parallel 2 and at two pipeline stages (one 2-rank msrun launch): a
Megatron TP=2 x PP=2 checkpoint converted to TP=1, and from there back to TP=2 (and to PP=2), computes the
same logits as the TP=1 model and as the float64 reference of the source weights; so do a Megatron-Core
checkpoint whose arguments hold signal.Signals and Megatron's enums, and a torch_dist checkpoint of TP=2
shards, each converted straight to TP=2; and Megatron-Core MoE checkpoints (TP=2 x EP=2 SequentialMLP files,
PP=2 x EP=2 Transformer Engine grouped files) converted to EP=2 (TP=1, and TP=2 + sequence parallel with
expert tensor parallel 1), which the loaded models save again as training does and which read back whole."""
import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest

import convert_fixtures as F
from multiproc import run_on_ranks
from numerics import rel_err
from reference_gpt import reference_logits
from mindtron.convert import convert_checkpoint
from mindtron.convert.verify import model_logits
from mindtron.convert import read_checkpoint

pytest.importorskip("torch")


def test_tp1_and_back_to_tp2_and_pp2_give_the_same_logits(tmp_path: Path):
    cases, expected, tp1 = [], {}, {}
    for name, scheme in (("llama", "core"), ("gpt2", "legacy")):
        cfg, weights, src = F.build_checkpoint(tmp_path / f"{name}_megatron", name, 2, 2, scheme, seed=3)
        tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, cfg.seq_length))
        expected[name] = reference_logits(cfg, weights, tokens)
        one = tmp_path / f"{name}_tp1"
        convert_checkpoint(src, one, 1, 1)
        tp1[name] = model_logits(cfg, read_checkpoint(one).tensors, tokens)
        for tp, pp in ((2, 1), (1, 2)):
            out = tmp_path / f"{name}_tp{tp}_pp{pp}"
            convert_checkpoint(one, out, tp, pp)  # mindtron -> mindtron: the resharding path
            cases.append({"name": f"{name}/tp{tp}_pp{pp}", "model": name, "dir": str(out), "tp": tp, "pp": pp,
                          "tokens": tokens.tolist()})
    import convert_dist as D  # PyTorch's DCP writes the torch_dist checkpoint

    cfg = F.config("llama")
    for kind in ("enum_args", "torch_dist"):
        weights = F.random_weights(cfg, 4)
        src = tmp_path / f"{kind}_megatron"
        with F.megatron_enum_modules() as enums:
            args = F.megatron_core_args(cfg, 2, 1, enums)
            if kind == "enum_args":
                shards = F.megatron_shards(cfg, weights, 2, 1)
                F.save_with_torch(src, {k: F.core_model_state(v) for k, v in shards.items()}, args)
            else:
                whole = {k: v for k, v in F.core_model_state(weights).items() if "_extra_state" not in k}
                common = {"args": argparse.Namespace(**args), "checkpoint_version": 3.0, "iteration": 20}
                D.write_single(src, whole, cfg.num_layers, True, D.saved_bytes([common]).getvalue(), tp=2)
        out = tmp_path / f"{kind}_tp2"
        convert_checkpoint(src, out, 2, 1)
        tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (2, cfg.seq_length))
        expected[kind] = tp1[kind] = reference_logits(cfg, weights, tokens)
        cases.append({"name": f"{kind}/tp2_pp1", "model": kind, "config_name": "llama", "dir": str(out), "tp": 2,
                      "pp": 1, "tokens": tokens.tolist()})
    moe_weights = {}
    for name, src_layout, layout in (("mixtral", (2, 1, 2, 2, "sequential"), dict(tp=1, ep=2)),
                                     ("deepseek", (1, 2, 2, 1, "te_grouped"), dict(tp=2, ep=2, etp=1))):
        cfg = F.moe_config(name)
        weights = moe_weights[name] = F.random_weights(cfg, 7)
        tp_, pp_, ep_, etp_, kind = src_layout
        src = tmp_path / f"{name}_megatron"
        F.save_with_torch(src, F.megatron_moe_models(cfg, weights, tp_, pp_, ep_, etp_, kind),
                          F.megatron_moe_args(cfg, tp_, pp_, ep_, etp_, kind))
        out = tmp_path / f"{name}_ep2"
        convert_checkpoint(src, out, layout["tp"], 1, target_ep=layout["ep"], target_etp=layout.get("etp"))
        tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, cfg.seq_length))
        expected[name] = tp1[name] = reference_logits(cfg, weights, tokens)
        moe = dataclasses.asdict(cfg.moe_config)
        cases.append({"name": f"{name}/ep2", "model": name, "config_name": "llama", "dir": str(out), "pp": 1,
                      "overrides": {"moe_config": moe, "sequence_parallel": layout["tp"] > 1}, **layout,
                      "tokens": tokens.tolist(), "save_to": str(tmp_path / f"{name}_saved")})
    per_rank = run_on_ranks(2, "tests/convert_worker.py:main", {"cases": cases}, timeout=600)
    for name, weights in moe_weights.items():  # saved by training's save_checkpoint at EP=2, read back whole
        full = read_checkpoint(tmp_path / f"{name}_saved")
        assert set(full.tensors) == set(weights)
        for key, value in weights.items():
            np.testing.assert_array_equal(full.tensors[key], value, err_msg=key)
    for case in cases:
        name = case["model"]
        results = [r[case["name"]] for r in per_rank if r[case["name"]] is not None]
        assert len(results) == (2 if case["pp"] == 1 else 1), case["name"]
        for logits in results:
            assert rel_err(logits, tp1[name]) < 1e-5, case["name"]       # same as the TP=1 model
            assert rel_err(logits, expected[name]) < 1e-5, case["name"]  # and as the source weights' reference
