"""Checkpoint options end to end (single process): keep-checkpoint-max, CRC check, --no-save-optim /
--no-load-optim, --finetune, a crash mid-save leaving the previous checkpoint loadable, and
--exit-duration-in-mins."""
from pathlib import Path

import numpy as np
import pytest

from mindtron.training import checkpointing
from workers import training_checks as tc


def _iterations(root: Path):
    return sorted(int(p.name[5:]) for p in root.glob("iter_*") if p.name[5:].isdigit())


def test_keep_checkpoint_max_keeps_the_newest(tmp_path):
    tc.train(tc.make_config(steps=6, output_dir=str(tmp_path), save_interval=2, keep_checkpoint_max=2))
    assert _iterations(tmp_path) == [4, 6]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "6"


def _fake_iteration(root: Path, iteration: int, complete: bool = True) -> None:
    rank = root / f"iter_{iteration:07d}" / ("mp_rank_00" if complete else "mp_rank_00.tmp")
    rank.mkdir(parents=True)
    (rank / "meta.json").write_text('{"layout": {"tp": 1, "pp": 1}}')


def test_keep_checkpoint_max_counts_complete_iterations_only(tmp_path):
    """A crashed save (iteration 3, still .tmp) neither counts towards the kept ones nor survives; the
    iteration just saved is always kept."""
    for iteration, complete in ((1, True), (2, True), (3, False), (4, True)):
        _fake_iteration(tmp_path, iteration, complete)
    checkpointing._remove_old(str(tmp_path), 2, current=4)
    assert _iterations(tmp_path) == [2, 4]
    checkpointing._remove_old(str(tmp_path), 1, current=2)  # an older iteration saved again: never removed
    assert _iterations(tmp_path) == [2, 4]


def test_saving_an_existing_iteration_again_replaces_it(tmp_path):
    tc.train(tc.make_config(steps=3, output_dir=str(tmp_path)))
    first = (tmp_path / "iter_0000003" / "mp_rank_00" / "model.safetensors").read_bytes()
    tc.train(tc.make_config(steps=3, output_dir=str(tmp_path), seed=7))
    rank_dirs = sorted(p.name for p in (tmp_path / "iter_0000003").iterdir())
    assert rank_dirs == ["mp_rank_00"]  # no .tmp or .old left behind
    assert (tmp_path / "iter_0000003" / "mp_rank_00" / "model.safetensors").read_bytes() != first


def test_crc_check_detects_a_corrupt_file(tmp_path):
    tc.train(tc.make_config(steps=4, output_dir=str(tmp_path)))
    model_file = tmp_path / "iter_0000004" / "mp_rank_00" / "model.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor's bytes
    model_file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="CRC mismatch in .*model.safetensors"):
        tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path), crc_check=True))


def test_no_save_optim_then_load_needs_no_load_optim(tmp_path):
    first = tc.train(tc.make_config(steps=4, output_dir=str(tmp_path), no_save_optim=True))
    assert not (tmp_path / "iter_0000004" / "mp_rank_00" / "optimizer.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="--no-load-optim"):
        tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path)))
    resumed = tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path), no_load_optim=True, no_load_rng=True))
    assert len(resumed["loss"]) == 4  # iterations 5-8: the iteration count came from the checkpoint
    assert abs(resumed["loss"][0] - first["loss"][-1]) < 0.1  # trained weights, not a fresh model


def test_finetune_loads_weights_and_starts_at_iteration_zero(tmp_path):
    fresh = tc.train(tc.make_config(steps=4))
    tc.train(tc.make_config(steps=4, output_dir=str(tmp_path)))
    tuned = tc.train(tc.make_config(steps=4, load_checkpoint=str(tmp_path), finetune=True))
    assert len(tuned["loss"]) == 4  # all iterations again
    assert tuned["loss"][0] < fresh["loss"][0] - 0.02  # but from the trained weights


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    tc.train(tc.make_config(steps=8, output_dir=str(tmp_path), save_interval=2, exit_interval=4))
    assert _iterations(tmp_path) == [2, 4]
    real_save = checkpointing.save_file

    def crash(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):  # the model file is written, then the process dies
            raise KeyboardInterrupt("killed mid-save")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path), output_dir=str(tmp_path), save_interval=2))
    monkeypatch.setattr(checkpointing, "save_file", real_save)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (tmp_path / "iter_0000006" / "mp_rank_00").exists()  # only a temporary directory was left
    resumed = tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path), crc_check=True))
    full = tc.train(tc.make_config(steps=8))
    np.testing.assert_array_equal(resumed["loss"], full["loss"][4:])


def test_exit_duration_in_mins_stops_training(tmp_path):
    result = tc.train(tc.make_config(steps=8, exit_duration_in_mins=1e-9, output_dir=str(tmp_path)))
    assert len(result["loss"]) == 1  # the time check runs after each iteration
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"  # saved on exit


@pytest.mark.parametrize("layout", ["torch", "torch_dist", "release"])
def test_loading_a_megatron_checkpoint_says_how_to_convert_it(tmp_path, layout):
    """--load of a Megatron-LM checkpoint fails at once with the conversion command, not deep in the loader."""
    if layout == "release":
        (tmp_path / "latest_checkpointed_iteration.txt").write_text("release")
        rank_dir = tmp_path / "release" / "mp_rank_00"
    else:
        (tmp_path / "latest_checkpointed_iteration.txt").write_text("20")
        rank_dir = tmp_path / "iter_0000020" / ("mp_rank_00" if layout == "torch" else "")
    rank_dir.mkdir(parents=True, exist_ok=True)
    (rank_dir / ("model_optim_rng.pt" if layout != "torch_dist" else "__0_0.distcp")).write_bytes(b"x")
    kind = "torch_dist" if layout == "torch_dist" else "torch"
    with pytest.raises(ValueError, match=rf"Megatron-LM checkpoint \({kind} format\).*python -m mindtron.convert "
                                         rf"--load-dir {tmp_path} --save-dir {tmp_path}-mindtron"):
        tc.train(tc.make_config(steps=8, load_checkpoint=str(tmp_path)))
