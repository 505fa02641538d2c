"""The benchmark scripts run on a tiny model and print their figures in the documented format (the
timings themselves are not checked: CI machines are too noisy)."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> list:
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--tiny", *args],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]




@pytest.mark.parametrize("jit", [False, True])
def test_step_overhead_prints_both_medians_and_the_ratio_last(jit):
    lines = _run("step_overhead.py", "--steps", "2", "--warmup", "1", "--jit-layers" if jit else "--no-jit-layers")
    assert any(line.endswith(f"jit_layers {'on' if jit else 'off'}") for line in lines), lines
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1]), lines[-1]
    assert float(lines[-1].split()[1]) > 0
    for side in ("plain", "mindtron"):
        assert any(re.match(rf"{side}\s+median step\s+\d+\.\d ms", line) for line in lines), (side, lines)


def test_throughput_prints_the_table():
    lines = _run("throughput.py", "--steps", "2", "--warmup", "1")
    table = [line for line in lines if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "quantity" and set(table[1]) <= {"|", "-"}
    rows = {cells[1].strip(): cells[2].strip() for cells in (line.split("|") for line in table[2:])}
    for key in ("layout", "step time (median)", "tokens/s", "model FLOP/s", "matmul rate, MindSpore fp32",
                "fraction of MindSpore matmul rate"):
        assert key in rows, (key, rows)
    assert float(rows["tokens/s"]) > 0
    assert 0 < float(rows["fraction of MindSpore matmul rate"]) < 1
    assert rows["layout"].startswith("tp 1, pp 1, dp 1")


def test_moe_hot_experts_prints_traffic_and_the_target_line():
    """One process (EP=1): nothing crosses ranks, but the table, the hot share and the ratio line print."""
    lines = _run("moe_hot_experts.py", "--steps", "1", "--warmup", "1")
    rows = {cells[1].strip(): cells[2:] for cells in (line.split("|") for line in lines if line.startswith("| "))}
    assert set(rows) >= {"plain", "hot"} and float(rows["hot"][4]) > 0  # tokens/s
    share = float(re.search(r"computed: (\d\.\d{4})", lines[-2]).group(1))
    assert 0.3 < share < 1.0  # the biased router sends most pairs to the two hot experts
    assert lines[-1].startswith("all-to-all bytes hot / plain: nan (target <= 1 - share")


@pytest.mark.slow
def test_context_parallel_memory_prints_a_row_per_cp_size():
    """CP=1 (one process) and CP=2 (msrun): activation memory per rank, its ratio to CP=1, tokens/s."""
    lines = _run("context_parallel_memory.py")
    rows = [line.split("|") for line in lines if re.match(r"\s+\d+ \|", line)]
    assert [int(r[0]) for r in rows] == [1, 2], lines
    assert float(rows[0][2]) == 1.0 and all(float(r[1]) > 0 and float(r[3]) > 0 for r in rows)


def test_vs_pytorch_prints_both_rates_and_the_ratio_last():
    pytest.importorskip("torch")
    lines = _run("vs_pytorch.py", "--steps", "2", "--warmup", "1")
    assert "mindtron jit_layers on" in lines[0], lines[0]  # compiled layers are the default
    for side in ("pytorch", "mindtron"):
        pattern = rf"{side}\s+median step\s+\d+\.\d ms\s+\d+\.\d tokens/s"
        assert any(re.match(pattern, line) for line in lines), (side, lines)
    assert re.fullmatch(r"ratio: \d+\.\d{3}", lines[-1]) and float(lines[-1].split()[1]) > 0, lines[-1]


def test_vs_pytorch_says_so_without_torch(monkeypatch, capsys):
    import builtins
    import importlib.util

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    spec = importlib.util.spec_from_file_location("vs_pytorch", os.path.join(ROOT, "bench", "vs_pytorch.py"))
    module = importlib.util.module_from_spec(spec)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    spec.loader.exec_module(module)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert module.main(["--tiny"]) is None
    assert "PyTorch is not installed" in capsys.readouterr().out


def test_mindformers_layouts_prints_the_table_and_min_ratio_last():
    lines = _run("mindformers_layouts.py", "--layouts", "single", "pp2", "--steps", "1", "--warmup", "1")
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| ") and not line.startswith("| layout")]
    assert [r[0].strip() for r in rows] == ["single", "pp2"], lines
    for row in rows:
        assert float(row[4]) > 0 and float(row[5]) > 0 and float(row[6]) > 0  # tokens/s, reference, ratio
    assert re.fullmatch(r"min ratio: \d+\.\d{3} \(target 2\.0\)", lines[-1]), lines[-1]
