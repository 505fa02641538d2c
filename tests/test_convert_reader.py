"""The torch.save reader and writer: files written byte by byte from the format's description (no PyTorch), files
written by torch.save itself, damaged files, and pickles that try to run code."""
import argparse
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from convert_bytes import BFloat16, Call, Global, Obj, write_torch_zip
from mindtron.convert.spec import spec_from_megatron_args
from mindtron.convert.torch_reader import (CheckpointFormatError, TorchDtype, UnsafeCheckpointError, is_placeholder,
                                           load_torch_file, read_torch_file, read_torch_file_with_report)
from mindtron.convert.torch_writer import write_torch_file


def test_byte_level_file_reads_without_torch(tmp_path):
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    halves = np.linspace(-2, 2, 6).astype(np.float16)
    wide = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
    obj = {"args": argparse.Namespace(num_layers=2, params_dtype=Global("torch", "bfloat16"), name="x", flag=True),
           "checkpoint_version": 3.0, "iteration": 7,
           "model": {"a": {"weight": weight, "half": halves, "bf16": BFloat16(wide), "ids": np.arange(5)},
                     "empty": {}, "list": [1, 2.5, None, False]}}
    write_torch_zip(tmp_path / "f.pt", obj)
    got = read_torch_file(tmp_path / "f.pt")
    assert vars(got["args"]) == {"num_layers": 2, "params_dtype": TorchDtype("bfloat16"), "name": "x", "flag": True}
    assert got["checkpoint_version"] == 3.0 and got["iteration"] == 7
    np.testing.assert_array_equal(got["model"]["a"]["weight"], weight)
    np.testing.assert_array_equal(got["model"]["a"]["half"], halves)
    assert got["model"]["a"]["half"].dtype == np.float16
    bf16 = (wide.view(np.uint32) & 0xFFFF0000).view(np.float32)  # what bfloat16 keeps of each value
    np.testing.assert_array_equal(got["model"]["a"]["bf16"], bf16)
    np.testing.assert_array_equal(got["model"]["a"]["ids"], np.arange(5))
    assert got["model"]["empty"] == {} and got["model"]["list"] == [1, 2.5, None, False]


def test_writer_round_trips_through_the_reader_without_torch(tmp_path):
    obj = {"args": argparse.Namespace(num_layers=3, params_dtype=TorchDtype("float16")), "iteration": 3,
           "model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3).T, "h": np.ones(4, np.float16),
                     "z": np.zeros((0, 3), np.float32)}}
    write_torch_file(obj, tmp_path / "w.pt")
    got = read_torch_file(tmp_path / "w.pt")
    assert vars(got["args"]) == vars(obj["args"])
    for key, value in obj["model"].items():
        np.testing.assert_array_equal(got["model"][key], value)
        assert got["model"][key].dtype == value.dtype
    with zipfile.ZipFile(tmp_path / "w.pt") as zf:  # storages start on 64-byte boundaries, as PyTorch writes them
        for info in zf.infolist():
            if "/data/" in info.filename and info.file_size:
                with open(tmp_path / "w.pt", "rb") as f:
                    f.seek(info.header_offset + 26)
                    name_len, extra_len = np.frombuffer(f.read(4), "<u2")
                assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0


def test_torch_save_files_read_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 3
    state = {"contiguous": base, "transposed": base.t(), "slice": base[1:3, 2:5], "step": base[:, ::2],
             "shared": base[2], "half": base.half(), "bf16": (base / 7).bfloat16(), "long": torch.arange(5),
             "bool": torch.tensor([True, False]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3),
             "param": torch.nn.Parameter(torch.ones(2, 2)), "double": base.double()}
    torch.save(state, tmp_path / "t.pt")
    got = read_torch_file(tmp_path / "t.pt")
    for key, tensor in state.items():
        want = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        np.testing.assert_array_equal(got[key], want, err_msg=key)
        assert got[key].shape == tuple(tensor.shape), key
    assert got["half"].dtype == np.float16 and got["long"].dtype == np.int64 and got["bf16"].dtype == np.float32
    for reader in ("torch", "auto"):  # PyTorch's loader, where installed, gives the same arrays
        obj, _ = load_torch_file(tmp_path / "t.pt", reader)
        np.testing.assert_array_equal(obj["transposed"], got["transposed"])


def test_files_written_without_torch_load_in_torch(tmp_path):
    torch = pytest.importorskip("torch")
    obj = {"args": argparse.Namespace(num_layers=2, params_dtype=TorchDtype("bfloat16")), "checkpoint_version": 3.0,
           "iteration": 5, "model": {"language_model": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                        "h": np.ones(3, np.float16), "i": np.arange(4)}}}
    write_torch_file(obj, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert loaded["args"].num_layers == 2 and loaded["args"].params_dtype == torch.bfloat16
    assert torch.equal(loaded["model"]["language_model"]["w"], torch.arange(6.0).reshape(2, 3))
    assert loaded["model"]["language_model"]["h"].dtype == torch.float16
    with torch.serialization.safe_globals([argparse.Namespace]):  # PyTorch's restricted loader, memory-mapped
        safe = torch.load(tmp_path / "m.pt", weights_only=True, mmap=True)
    assert torch.equal(safe["model"]["language_model"]["i"], torch.arange(4))


class _Exploit:
    """Pickles as a call to os.system, as a malicious checkpoint would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec", "subprocess.Popen", "nested", "signal.signal",
                                     "importlib.import_module", "types.FunctionType"])
def test_malicious_pickles_are_refused_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    path = tmp_path / "evil.pt"
    if payload == "os.system":
        torch = pytest.importorskip("torch")
        torch.save({"model": {"w": torch.ones(2)}, "args": _Exploit(command)}, path)
    elif payload == "builtins.exec":
        write_torch_zip(path, {"model": Call(Global("builtins", "exec"), f"import os; os.system('{command}')")})
    elif payload == "subprocess.Popen":
        write_torch_zip(path, {"args": Call(Global("subprocess", "Popen"), ("touch", str(marker)))})
    elif payload == "nested":  # hidden inside a harmless-looking call's arguments
        write_torch_zip(path, {"model": {"w": np.ones(2, np.float32)},
                               "x": Call(Global("collections", "OrderedDict"),
                                         (Call(Global("posix", "system"), command),))})
    else:  # functions of modules whose enum classes are allowed (signal.Signals) stay refused
        module, name = payload.split(".")
        write_torch_zip(path, {"args": argparse.Namespace(
            exit_signal=Call(Global("signal", "Signals"), 15), x=Call(Global(module, name), 15, command))})
    for reader in ("python", "torch"):
        if reader == "torch" and "torch" not in sys.modules:
            continue
        with pytest.raises(UnsafeCheckpointError, match="refusing to load .*evil.pt.*Nothing from it was executed"):
            load_torch_file(path, reader)
    assert not marker.exists()


def test_unknown_classes_become_inert_placeholders(tmp_path):
    write_torch_zip(tmp_path / "p.pt", {
        "model": {"w": np.ones(2, np.float32)},
        "counter": Call(Global("collections", "Counter"), ("abc",)),
        "custom": Call(Global("my_private_package.sub", "Thing"), 1, "two")})
    obj, placeholders = read_torch_file_with_report(tmp_path / "p.pt")
    assert is_placeholder(obj["counter"]) and is_placeholder(obj["custom"])
    assert obj["custom"].args == (1, "two") and "my_private_package.sub.Thing" in repr(obj["custom"])
    assert placeholders == {"collections.Counter": 1, "my_private_package.sub.Thing": 1}
    assert "my_private_package" not in sys.modules  # nothing was imported


def _small_file(path: Path) -> Path:
    write_torch_zip(path, {"model": {"w": np.arange(4096, dtype=np.float32)}})
    return path


def test_truncated_and_corrupted_files_give_clear_errors(tmp_path):
    data = _small_file(tmp_path / "ok.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="half.pt is not a complete PyTorch checkpoint.*truncated"):
        read_torch_file(tmp_path / "half.pt")
    flipped = bytearray(data)
    flipped[data.index(b"archive/data/0") + 600] ^= 0xFF  # inside the tensor's bytes
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointFormatError, match="flip.pt: entry archive/data/0 is damaged"):
        read_torch_file(tmp_path / "flip.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty.pt is not a PyTorch checkpoint"):
        read_torch_file(tmp_path / "empty.pt")
    (tmp_path / "old.pt").write_bytes(b"\x80\x02\x8a\x0a" + b"\x00" * 20)
    with pytest.raises(CheckpointFormatError, match="pre-1.6 serialization"):
        read_torch_file(tmp_path / "old.pt")
    with zipfile.ZipFile(tmp_path / "nopkl.pt", "w") as zf:
        zf.writestr("x/other", b"1")
    with pytest.raises(CheckpointFormatError, match="not a torch.save archive"):
        read_torch_file(tmp_path / "nopkl.pt")
    with zipfile.ZipFile(tmp_path / "short.pt", "w") as zf:  # a storage with fewer bytes than its tensor needs
        src = zipfile.ZipFile(tmp_path / "ok.pt")
        for info in src.infolist():
            body = src.read(info.filename)
            zf.writestr(info.filename, body[:100] if info.filename.endswith("data/0") else body)
    with pytest.raises(CheckpointFormatError, match="holds 100 bytes but its tensors need 16384.*truncated"):
        read_torch_file(tmp_path / "short.pt")
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "missing.pt")


def test_enum_signal_path_and_dataclass_arguments_load_as_inert_values(tmp_path):
    """What Megatron-Core 0.19 stores in `args` and beside it: signal.Signals and Megatron's enums (a call of the
    class with the value), a path, a dataclass-like object (NEWOBJ + BUILD) and a SimpleNamespace. They load
    as data without importing or calling anything; enum values are readable, also by the model settings."""
    megatron = "megatron.core.enums"
    args = argparse.Namespace(
        num_layers=2, hidden_size=32, num_attention_heads=4, exit_signal=Call(Global("signal", "Signals"), 15),
        model_type=Call(Global(megatron, "ModelType"), 1), fp8_recipe=Call(Global(megatron, "Fp8Recipe"), "delayed"),
        attention_backend=Call(Global("megatron.core.transformer.enums", "AttnBackend"), 5),
        position_embedding_type=Call(Global("my_project.enums", "Positions"), "rope"),
        save=Call(Global("pathlib", "PosixPath"), "/ckpt", "run1"),
        heterogeneous=Obj(Global("types", "SimpleNamespace"), {"num_layers": 2}))
    write_torch_zip(tmp_path / "m.pt", {"args": args, "optimizer": {
        "config": Obj(Global("megatron.core.optimizer", "OptimizerConfig"), {"lr": 3e-4, "optimizer": "adam"})}})
    got, placeholders = read_torch_file_with_report(tmp_path / "m.pt")
    stored = got["args"]
    assert is_placeholder(stored.exit_signal) and stored.exit_signal.value == 15
    assert (stored.model_type.value, stored.fp8_recipe.value, stored.attention_backend.value) == (1, "delayed", 5)
    assert stored.save.args == ("/ckpt", "run1") and stored.heterogeneous.num_layers == 2
    config = got["optimizer"]["config"]
    assert is_placeholder(config) and config.fields == {"lr": 3e-4, "optimizer": "adam"} and config.value is None
    assert placeholders == {"signal.Signals": 1, f"{megatron}.ModelType": 1, f"{megatron}.Fp8Recipe": 1,
                            "megatron.core.transformer.enums.AttnBackend": 1, "my_project.enums.Positions": 1,
                            "pathlib.PosixPath": 1, "megatron.core.optimizer.OptimizerConfig": 1}
    assert not any(m.startswith(("megatron", "my_project")) for m in sys.modules)  # nothing was imported
    spec = spec_from_megatron_args(vars(stored), {})  # an enum-valued model argument counts by its value
    assert spec.fields["position_embedding_type"] == "rope"
