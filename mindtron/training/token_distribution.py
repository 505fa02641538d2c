"""Document 000's MoE token distribution files, and the pictures `tools/moe_token_distribution.py` draws.

Files (written by moe_callbacks.TokenDistributionMonitor, --save-token-distribution): one per MoE layer and
saved iteration, `<dir>/layer-<layer>_<iteration>.npy` (layer: global 0-based index, as document 000 names
them; iteration: 1-based), each an int64 array [2, num_experts]: row 0 the (token, expert) pairs routed to
each expert before capacity dropping, row 1 the pairs kept, summed over the iteration's micro-batches and
every rank. Any directory tree holding such files can be read (subdirectories are searched).

    python tools/moe_token_distribution.py --num-layers 4 --hot-expert-num 2 \\
        --npy-files-load-path ckpt/token_distribution --save-path-prefix plots/

draws for each MoE layer `<prefix>layer-<L>_token_distribution.png`: routed pairs per expert over the
saved iterations as a heat map, and the distribution at chosen iterations (--steps; default the first,
middle and last) as bars of routed and kept pairs. The `hot_expert_num` experts with the most routed pairs
over all saved iterations are marked (and printed, per layer: the experts a ColdHotExpertMonitor measuring
the whole run would make hot). Drawing needs matplotlib: `pip install -e ".[plot]"`.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["token_distribution_file", "load_token_distribution", "hottest_experts", "plot_layer", "main"]

_NAME = re.compile(r"^layer-(\d+)_(\d+)\.npy$")


def token_distribution_file(directory: str, layer: int, iteration: int) -> str:
    """The file of `layer` (global, 0-based) at `iteration` (1-based) under `directory`."""
    return os.path.join(directory, f"layer-{layer}_{iteration}.npy")


def load_token_distribution(path: str) -> Dict[int, Tuple[np.ndarray, np.ndarray]]:
    """{layer: (iterations [S], counts [S, 2, E])} from every `layer-<L>_<iteration>.npy` under `path`,
    iterations ascending. A file saved as a plain [E] vector of routed pairs (MindFormers' export) counts as
    routed = kept."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--npy-files-load-path {path}: no such directory")
    found: Dict[int, Dict[int, str]] = {}
    for root, _, files in os.walk(path):
        for name in files:
            match = _NAME.match(name)
            if match:
                found.setdefault(int(match.group(1)), {})[int(match.group(2))] = os.path.join(root, name)
    out = {}
    for layer, by_step in found.items():
        steps = sorted(by_step)
        arrays = []
        for step in steps:
            counts = np.load(by_step[step])
            if counts.ndim == 1:
                counts = np.stack([counts, counts])
            if counts.ndim != 2 or counts.shape[0] != 2:
                raise ValueError(f"{by_step[step]}: expected [2, experts] token counts, got shape {counts.shape}")
            arrays.append(counts.astype(np.int64))
        widths = {a.shape[1] for a in arrays}
        if len(widths) != 1:
            raise ValueError(f"layer {layer}: files under {path} disagree on the number of experts {sorted(widths)}")
        out[layer] = (np.asarray(steps, np.int64), np.stack(arrays))
    return out


def hottest_experts(counts: np.ndarray, hot_expert_num: int) -> List[int]:
    """The `hot_expert_num` experts with the most routed pairs over all iterations of counts [S, 2, E],
    ascending (ties: the lower index), as parallel_core.moe.hot_experts chooses them."""
    total = counts[:, 0, :].sum(0)
    order = np.argsort(-total, kind="stable")
    return sorted(int(e) for e in order[:hot_expert_num])


def _pick_steps(steps: np.ndarray, wanted: Optional[Sequence[int]]) -> List[int]:
    if not wanted:
        picks = [steps[0], steps[len(steps) // 2], steps[-1]]
        return sorted({int(s) for s in picks})
    missing = [s for s in wanted if s not in set(steps.tolist())]
    if missing:
        raise ValueError(f"--steps {missing}: no saved iteration (saved: {steps[0]}..{steps[-1]}, "
                         f"{len(steps)} files)")
    return [int(s) for s in wanted]


def plot_layer(layer: int, steps: np.ndarray, counts: np.ndarray, hot: Sequence[int], path: str,
               at_steps: Optional[Sequence[int]] = None) -> str:
    """Draw one layer's picture into `path` (PNG); returns the path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = _pick_steps(steps, at_steps)
    E = counts.shape[2]
    fig, (heat, bars) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    image = heat.imshow(counts[:, 0, :].T, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, E - 0.5))
    fig.colorbar(image, ax=heat, label="routed pairs")
    heat.set_xlabel("iteration")
    heat.set_ylabel("expert")
    heat.set_yticks(range(E))
    heat.set_yticklabels([f"{e} (hot)" if e in hot else str(e) for e in range(E)])
    for label in heat.get_yticklabels():
        if "hot" in label.get_text():
            label.set_color("tab:red")
            label.set_fontweight("bold")
    heat.set_title(f"layer-{layer}: routed pairs per expert")
    width = 0.8 / len(picks)
    index = {int(s): i for i, s in enumerate(steps)}
    for j, step in enumerate(picks):
        x = np.arange(E) + (j - (len(picks) - 1) / 2) * width
        routed, kept = counts[index[step], 0], counts[index[step], 1]
        bars.bar(x, routed, width, color=f"C{j}", alpha=0.35, label=f"iteration {step} routed")
        bars.bar(x, kept, width * 0.5, color=f"C{j}", label=f"iteration {step} kept")
    for e in hot:
        bars.axvspan(e - 0.45, e + 0.45, color="tab:red", alpha=0.08)
    bars.set_xticks(range(E))
    bars.set_xlabel(f"expert (shaded: the {len(hot)} hot experts)")
    bars.set_ylabel("pairs")
    bars.set_title(f"layer-{layer}: distribution at chosen iterations")
    bars.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    """The command line of tools/moe_token_distribution.py; returns the PNG paths written."""
    parser = argparse.ArgumentParser(description="Draw the MoE token distribution saved by "
                                                 "--save-token-distribution (document 000's tool).")
    parser.add_argument("--num-layers", "--num_layers", dest="num_layers", type=int, required=True,
                        help="layers of the model; layers without files (dense ones) are skipped")
    parser.add_argument("--hot-expert-num", "--hot_expert_num", dest="hot_expert_num", type=int, default=2,
                        help="how many of each layer's most loaded experts to mark as hot")
    parser.add_argument("--npy-files-load-path", "--npy_files_load_path", dest="npy_files_load_path",
                        required=True, help="directory holding the layer-<L>_<iteration>.npy files")
    parser.add_argument("--save-path-prefix", "--save_path_prefix", dest="save_path_prefix",
                        default="./token_distribution/", help="prefix of the PNG files (a directory ends in /)")
    parser.add_argument("--steps", type=lambda t: [int(s) for s in t.split(",") if s],
                        help="comma-separated iterations for the distribution bars (default first, middle, last)")
    args = parser.parse_args(argv)
    if args.num_layers < 1 or args.hot_expert_num < 0:
        parser.error("--num-layers must be >= 1 and --hot-expert-num >= 0")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit('moe_token_distribution: drawing needs matplotlib, which is not installed: '
                         'pip install -e ".[plot]" (or pip install matplotlib)') from None
    data = load_token_distribution(args.npy_files_load_path)
    layers = [layer for layer in range(args.num_layers) if layer in data]
    if not layers:
        raise SystemExit(f"moe_token_distribution: no layer-<L>_<iteration>.npy files for layers 0..{args.num_layers - 1}"
                         f" under {args.npy_files_load_path}")
    written, hot_all = [], []
    for layer in range(args.num_layers):
        if layer not in data:
            print(f"layer-{layer}: no files (a dense layer?), skipped")
            continue
        steps, counts = data[layer]
        if args.hot_expert_num > counts.shape[2]:
            raise SystemExit(f"--hot-expert-num {args.hot_expert_num} exceeds the {counts.shape[2]} experts of "
                             f"layer {layer}")
        hot = hottest_experts(counts, args.hot_expert_num)
        path = plot_layer(layer, steps, counts, hot, f"{args.save_path_prefix}layer-{layer}_token_distribution.png",
                          args.steps)
        written.append(path)
        hot_all.append(hot)
        print(f"layer-{layer}: {len(steps)} iterations ({steps[0]}..{steps[-1]}), hot experts {hot} -> {path}")
    print("hot_expert_index:", hot_all)
    return written
