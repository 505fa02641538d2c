"""What a conversion did (the summary the command prints)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class ConversionReport:
    """Everything a conversion decided: read, placed, ignored, written, and what to watch out for."""

    source: str = ""
    source_format: str = ""
    source_layout: Tuple[int, int, int] = (1, 1, 1)  # tp, pp, virtual chunks
    source_experts: Optional[Tuple[int, int]] = None
    """Expert parallel and expert tensor parallel sizes of an MoE source (None for a dense model)."""
    checkpoint_version: Optional[int] = None
    iteration: int = 0
    files_read: int = 0
    placed: int = 0
    """Source tensors that became (part of) a model parameter."""
    ignored: Dict[str, List[str]] = field(default_factory=dict)
    """reason -> source entries skipped for it."""
    not_converted: List[str] = field(default_factory=list)
    """Top-level checkpoint entries that are not model weights (optimizer state, RNG, ...)."""
    placeholders: Dict[str, int] = field(default_factory=dict)
    """Classes the safe reader did not load (kept inert), with counts."""
    warnings: List[str] = field(default_factory=list)
    model: str = ""
    parameters: int = 0
    values: int = 0
    vocab_rows: Tuple[int, int] = (0, 0)  # source, target
    target: str = ""
    target_format: str = ""
    target_layout: Tuple[int, int] = (1, 1)
    target_experts: Optional[Tuple[int, int]] = None
    """Expert parallel and expert tensor parallel sizes written (MoE models)."""
    experts: Dict[str, int] = field(default_factory=dict)
    """MoE tensors of the whole model by kind (router, experts, shared experts), counted in the summary."""
    written: List[str] = field(default_factory=list)
    verify: Optional[Dict[str, float]] = None
    started: float = field(default_factory=time.time)
    seconds: float = 0.0

    def ignore(self, reason: str, entry: str) -> None:
        """Record a skipped source entry."""
        self.ignored.setdefault(reason, []).append(entry)

    def warn(self, message: str) -> None:
        """Record something the user should know."""
        self.warnings.append(message)

    def summary(self) -> str:
        """The multi-line summary printed at the end of a conversion."""
        tp, pp, chunks = self.source_layout
        vpp = f" x {chunks} virtual stages" if chunks > 1 else ""
        version = f", checkpoint version {self.checkpoint_version}" if self.checkpoint_version is not None else ""
        lines = [
            f"converted {self.source_format} checkpoint {self.source} (iteration {self.iteration}, "
            f"TP={tp} x PP={pp}{vpp}{_experts(self.source_experts)}{version}, files read: {self.files_read})",
            f"  into {self.target_format} checkpoint {self.target} (TP={self.target_layout[0]} x "
            f"PP={self.target_layout[1]}{_experts(self.target_experts)}, files written: {len(self.written)})",
            f"  model: {self.model}",
            f"  weights: {self.placed} source tensors placed into {self.parameters} parameters "
            f"({self.values:,} values); vocabulary rows {self.vocab_rows[0]} -> {self.vocab_rows[1]}",
        ]
        if self.experts:
            lines.append("  of which Mixture of Experts: " + ", ".join(f"{n} {k}" for k, n in self.experts.items()))
        for reason, entries in sorted(self.ignored.items()):
            lines.append(f"  ignored {len(entries)} entries: {reason} (e.g. {entries[0]})")
        if self.not_converted:
            lines.append(f"  not converted (not model weights): {', '.join(sorted(set(self.not_converted)))}")
        if self.placeholders:
            lines.append("  objects the safe reader kept as inert placeholders (outside the model weights): "
                         + ", ".join(sorted(self.placeholders)))
        for message in self.warnings:
            lines.append(f"  warning: {message}")
        if self.verify is not None:
            v = self.verify
            lines.append(f"  verify: logits of the converted model match the source weights' (max abs diff "
                         f"{v['max_abs_diff']:.3g}, relative {v['relative']:.3g}, {int(v['tokens'])} tokens)")
        lines.append(f"  done in {self.seconds:.1f} s")
        return "\n".join(lines)


def _experts(layout: Optional[Tuple[int, int]]) -> str:
    return "" if layout is None else f" x EP={layout[0]} (expert TP={layout[1]})"
