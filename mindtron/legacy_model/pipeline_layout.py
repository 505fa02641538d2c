"""How transformer layers are spread over pipeline stages and virtual stages (Megatron-Core's rules).

`pipeline_layer_counts` gives, for every model chunk (virtual stage) and pipeline rank, the number of
layers it holds, `counts[chunk][rank]`; model order is chunk 0 of ranks 0..pp-1, then chunk 1, ... One of:

- even split (the default): num_layers / (pp x vpp) per piece;
- `num_layer_list` (document 002): the counts given directly;
- --decoder-first/last-pipeline-num-layers: those counts on the first / last rank (split evenly over its
  virtual stages), the remaining layers evenly over the ranks in between;
- --account-for-embedding/loss-in-pipeline-split: the embedding (loss) counts as one layer of the first
  (last) piece when splitting evenly, so that piece builds one transformer layer fewer;
- --pipeline-model-parallel-layout: an explicit list of stages ("E" embedding, "t" transformer layer,
  "L" loss), whose length pp x vpp fixes the number of virtual stages.
"""
from __future__ import annotations

import re
from typing import List, Optional, Sequence, Union

_CODES = {"E": "embedding", "t": "decoder", "L": "loss", "m": "mtp"}
_NAMES = {"embedding": "E", "decoder": "t", "loss": "L", "mtp": "m"}
_FLAG = "--pipeline-model-parallel-layout"


def parse_layout(layout: Union[str, Sequence[Sequence[str]]]) -> List[List[str]]:
    """A layout string ("Et|(tt|)*2,tL") or list of lists of layer names as a list of stages, each a list of
    codes "E", "t", "L" ("m" for MTP layers). Repeats "(...)*n" and "x*n" are expanded, commas dropped."""
    if isinstance(layout, str):
        text = layout.replace(",", "").replace(" ", "")
        text = re.sub(r"\(([^()]+)\)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
        text = re.sub(r"(.)\*(\d+)", lambda m: m.group(1) * int(m.group(2)), text)
        stages = [list(stage) for stage in text.split("|")]
        bad = sorted({c for stage in stages for c in stage if c not in _CODES})
        if bad:
            raise ValueError(f"{_FLAG} {layout!r}: unknown layer character(s) {bad}; use E (embedding), "
                             "t (transformer layer), L (loss), | between stages, (...)*n or x*n to repeat")
        return stages
    stages = []
    for stage in layout:
        if isinstance(stage, str):
            raise ValueError(f"{_FLAG}: a list layout must be a list of stages, each a list of layer names")
        codes = []
        for name in stage:
            key = str(name).strip().lower()
            if key not in _NAMES:
                raise ValueError(f"{_FLAG}: unknown layer name {name!r}; use {sorted(_NAMES)}")
            codes.append(_NAMES[key])
        stages.append(codes)
    return stages


def layout_virtual_size(layout: Union[str, list], pipeline_size: int) -> Optional[int]:
    """Virtual stages per pipeline rank that a layout describes (None for one), Megatron's derivation."""
    stages = len(parse_layout(layout))
    if stages % pipeline_size:
        raise ValueError(f"{_FLAG} has {stages} stages, which --pipeline-model-parallel-size {pipeline_size} "
                         "does not divide")
    vpp = stages // pipeline_size
    return vpp if vpp > 1 else None


def _layout_counts(layout, num_layers: int, pp: int, vpp: int) -> List[List[int]]:
    stages = parse_layout(layout)
    if len(stages) != pp * vpp:
        raise ValueError(f"{_FLAG} has {len(stages)} stages but the run has --pipeline-model-parallel-size {pp} x "
                         f"{vpp} virtual stages = {pp * vpp}")
    flat = [c for stage in stages for c in stage]
    if "m" in flat:
        raise ValueError(f"{_FLAG}: multi-token prediction layers (m) are not available in mindtron")
    if flat.count("E") != 1 or flat.count("L") != 1:
        raise ValueError(f"{_FLAG} must hold the embedding (E) and the loss (L) exactly once each")
    if stages[0][:1] != ["E"] or stages[-1][-1:] != ["L"]:
        raise ValueError(f"{_FLAG}: the embedding (E) must open the first stage and the loss (L) close the last "
                         "one (mindtron builds them on the first and last pipeline stage)")
    if flat.count("t") != num_layers:
        raise ValueError(f"{_FLAG} places {flat.count('t')} transformer layers (t) but --num-layers is {num_layers}")
    # stage i is virtual stage i // pp of pipeline rank i % pp: the list is already in model order
    return [[stages[chunk * pp + rank].count("t") for rank in range(pp)] for chunk in range(vpp)]


def _even(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(what)
    return total // parts


def pipeline_layer_counts(num_layers: int, pipeline_size: int = 1, virtual_size: Optional[int] = None, *,
                          num_layer_list: Optional[Sequence] = None, first_stage_layers: Optional[int] = None,
                          last_stage_layers: Optional[int] = None, account_for_embedding: bool = False,
                          account_for_loss: bool = False, layout=None) -> List[List[int]]:
    """counts[chunk][rank]: transformer layers held by each virtual stage of each pipeline rank."""
    pp, vpp = pipeline_size, virtual_size or 1
    if layout is not None:
        counts = _layout_counts(layout, num_layers, pp, vpp)
    elif num_layer_list is not None:
        nested = [list(c) for c in num_layer_list] if isinstance(num_layer_list[0], (list, tuple)) \
            else [list(num_layer_list)]
        if len(nested) != vpp or any(len(c) != pp for c in nested):
            raise ValueError(f"--num-layer-list {list(num_layer_list)} must have {pp} entries (one per pipeline "
                             f"stage)" + (f" in each of {vpp} lists (one per virtual stage)" if vpp > 1 else ""))
        counts = nested
    elif first_stage_layers is not None or last_stage_layers is not None:
        counts = _uneven_counts(num_layers, pp, vpp, first_stage_layers, last_stage_layers)
    else:
        total = num_layers + int(account_for_embedding) + int(account_for_loss)
        hint = " (the embedding / loss counted as layers)" if account_for_embedding or account_for_loss else ""
        per_piece = _even(total, pp * vpp, f"--num-layers {num_layers}{hint} cannot be split evenly over {pp} "
                          f"pipeline stages x {vpp} virtual stages; change --num-layers, "
                          "--pipeline-model-parallel-size or the virtual stages, or give --num-layer-list, "
                          "--decoder-first/last-pipeline-num-layers or --pipeline-model-parallel-layout")
        counts = [[per_piece] * pp for _ in range(vpp)]
        if account_for_embedding:
            counts[0][0] -= 1
        if account_for_loss:
            counts[-1][-1] -= 1
    if min(map(min, counts)) < 0 or sum(map(sum, counts)) != num_layers:
        raise ValueError(f"the pipeline stages would hold {counts} layers; they must be non-negative counts "
                         f"summing to --num-layers {num_layers}")
    return counts


def _uneven_counts(num_layers: int, pp: int, vpp: int, first: Optional[int], last: Optional[int]) -> List[List[int]]:
    # Megatron-Core's uneven pipeline: the first/last rank's share is fixed, the middle ranks split the rest.
    middle_layers, middle_ranks = num_layers, pp
    for value, flag in ((first, "--decoder-first-pipeline-num-layers"), (last, "--decoder-last-pipeline-num-layers")):
        if value is None:
            continue
        if value % vpp:
            raise ValueError(f"{flag} {value} must be divisible by the {vpp} virtual pipeline stages")
        middle_layers -= value
        middle_ranks -= 1
    if bool(middle_layers) != bool(middle_ranks):
        raise ValueError(f"--decoder-first/last-pipeline-num-layers leave {middle_layers} layers for {middle_ranks} "
                         f"middle pipeline stages (--num-layers {num_layers}, --pipeline-model-parallel-size {pp})")
    per_middle = _even(middle_layers, middle_ranks, f"the {middle_layers} layers between the first and last stage "
                       f"must divide evenly over the {middle_ranks} middle pipeline stages") if middle_ranks else 0
    per_middle_chunk = _even(per_middle, vpp, f"the {per_middle} layers of each middle pipeline stage must divide "
                             f"evenly over the {vpp} virtual stages")
    per_rank = [per_middle_chunk] * pp
    if first is not None:
        per_rank[0] = first // vpp
    if last is not None:
        per_rank[-1] = last // vpp
    return [list(per_rank) for _ in range(vpp)]
