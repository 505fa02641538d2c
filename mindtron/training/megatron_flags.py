"""Megatron-LM's command-line flags as data: name, aliases, dest, type, default, nargs, choices and group.

Provenance: `megatron_flags_core_r0.19.tsv` (package data next to this module) lists every flag of the
argument parser of Megatron-LM at branch core_r0.19.0 (github.com/NVIDIA/Megatron-LM,
megatron/training/arguments.py and the dataclass-generated "transformer configuration" group), 807 flags,
one a line: `flag`, `aliases`, `dest`, `type` (argparse type name, or store_true / store_false),
`default` (JSON where possible), `nargs`, `choices`, `const`, `group`, and whether the flag also exists in
core_v0.15.3 and in a later main. It is the project's copy of shared/megatron/flags_core_r0.19.tsv, read
here as is; to follow a newer Megatron, replace the file and rerun tests/test_arguments.py (it walks every
row). Defaults are the parser's: Megatron's `validate_args` derives more (see validate_arguments.py).

mindtron's own options (the names of document 002's mapping tables that Megatron has no flag for, and
documents 000/001's clipping, accumulation and adaptive loss-scale parameters) are written below as Python
rows, in groups titled "mindtron: ...". Where mindtron deliberately departs from a Megatron row it is listed
in `MINDTRON_CHANGES` with the reason (an extra alias, an extra choice).

What mindtron does with each flag (implemented, accepted and ignored, refused) is `flag_policy.py`'s job;
this module only describes the flags and builds the argparse parser.
"""
from __future__ import annotations

import argparse
import ast
import csv
import enum
import json
import os
import re
import signal
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["Flag", "GROUPS", "ALL_FLAGS", "MEGATRON_FLAGS", "FLAGS_BY_DEST", "FLAGS_BY_OPTION", "MEGATRON_DESTS",
           "MINDTRON_GROUPS", "MINDTRON_CHANGES", "TABLE_PATH", "read_table", "build_parser", "add_flags",
           "AttnBackend", "CudaGraphModule"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_flags_core_r0.19.tsv")
"""The flag table of Megatron-LM core_r0.19.0 (see the module docstring)."""


@dataclass(frozen=True)
class Flag:
    """One option: its option strings, where argparse stores it and how it converts the text."""

    options: Tuple[str, ...]
    """Option strings, the canonical one first (e.g. ("--save-interval", "--persistent-save-interval"))."""
    dest: str
    """Attribute on the parsed namespace."""
    action: str = "store"
    """"store", "store_true", "store_false", "append" or "bool_optional" (`--x` / `--no-x`)."""
    type: Optional[Callable[[str], Any]] = None
    default: Any = None
    choices: Optional[Tuple[Any, ...]] = None
    nargs: Any = None
    const: Any = None
    group: str = ""
    type_name: str = ""
    """Megatron's name for the type (the table's `type` column: "int", "store_true", "tuple_type", ...)."""
    in_core_v0_15: Optional[bool] = None
    """Whether Megatron-Core 0.15.3's parser had the flag too (None for mindtron's own options)."""

    @property
    def all_options(self) -> Tuple[str, ...]:
        """Every option string argparse accepts for this flag."""
        return self.options

    @property
    def name(self) -> str:
        """The canonical `--kebab-case` option."""
        return self.options[0]

    @property
    def megatron(self) -> bool:
        """True for a flag of Megatron's parser, False for mindtron's own options."""
        return not self.group.startswith("mindtron:")

    def kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for `argparse.ArgumentParser.add_argument`."""
        kw: Dict[str, Any] = {"dest": self.dest, "default": self.default}
        if self.action == "bool_optional":
            kw["action"] = BoolOptionalAction
            return kw
        kw["action"] = self.action
        if self.action in ("store", "append"):
            if self.type is not None:
                kw["type"] = self.type
            if self.choices is not None:
                kw["choices"] = self.choices
            if self.nargs is not None:
                kw["nargs"] = self.nargs
            if self.nargs == "?":
                kw["const"] = self.const
        return kw


class BoolOptionalAction(argparse.Action):
    """Megatron's BooleanOptionalAction rows: `--x` sets True, the `--no-x` alias sets False."""

    def __init__(self, option_strings, dest, default=None, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=default, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


# ---------------------------------------------------------------------------------------------------------
# Value converters for Megatron's non-builtin option types (same accepted text, written for mindtron)
# ---------------------------------------------------------------------------------------------------------
class AttnBackend(enum.Enum):
    """Megatron-Core's attention backends (--attention-backend takes a member's name)."""

    flash = 1
    fused = 2
    unfused = 3
    local = 4
    auto = 5


class CudaGraphModule(enum.Enum):
    """Megatron-Core's per-layer CUDA-graph capture regions (--cuda-graph-modules takes members' names)."""

    attn = 1
    mlp = 2
    moe = 3
    moe_router = 4
    moe_preprocess = 5
    mamba = 6


def _enum_member(enum_class):
    # Megatron takes the member's name (--exit-signal SIGTERM); a number is accepted for integer enums too
    # (--exit-signal 15), as schedulers document signals by number.
    def convert(text):
        if isinstance(text, enum_class):
            return text
        try:
            if issubclass(enum_class, int) and str(text).lstrip("-").isdigit():
                return enum_class(int(text))
            return enum_class[str(text)]
        except (KeyError, ValueError):
            names = ", ".join(m.name for m in enum_class)
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {names})") from None
    convert.__name__ = f"{enum_class.__name__}_name"
    return convert


attn_backend = _enum_member(AttnBackend)
signal_name = _enum_member(signal.Signals)


def cuda_graph_module(text):
    """--cuda-graph-modules / --cuda-graph-scope: a CudaGraphModule name, or Megatron's deprecated whole-layer
    spellings "full", "full_iteration", "full_iteration_inference" (kept as text)."""
    if text in ("full", "full_iteration", "full_iteration_inference"):
        return text
    return _enum_member(CudaGraphModule)(text)


_PATTERN = re.compile(r"^[\d,\[\]\(\)\+\*\s]+$")


def _eval_list_pattern(text: str) -> list:
    # Patterns such as "([1]*3+[0]*1)*3": only digits, brackets, commas, + and * are allowed, so the
    # expression is evaluated on a tiny arithmetic grammar instead of eval().
    if not _PATTERN.match(text):
        raise argparse.ArgumentTypeError(f"invalid layer pattern {text!r}: use digits, [], (), +, * and commas")
    return _eval_node(ast.parse(text, mode="eval").body)


def _eval_node(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.List):
        return [_eval_node(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_eval_node(e) for e in node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _eval_node(node.left), _eval_node(node.right)
        return left + right if isinstance(node.op, ast.Add) else left * right
    raise argparse.ArgumentTypeError("invalid layer pattern")


def layer_freq(text):
    """An int N (one special layer every N) or a list pattern such as "([1]*3+[0])*2" (Megatron's
    moe_freq_type, la_freq_type and no_rope_freq_type)."""
    if text is None or isinstance(text, (int, list)):
        return text
    return _eval_list_pattern(text) if "[" in text else int(text)


def int_tuple(text):
    """"1,2,3" or "(1,2,3)" -> (1, 2, 3) (Megatron's tuple_type)."""
    if text is None or isinstance(text, tuple):
        return text
    if isinstance(text, list):
        return tuple(int(i) for i in text)
    return tuple(int(i) for i in str(text).strip("()").split(","))


def str_to_bool(text) -> bool:
    """"true"/"false" (any case), "1"/"0", "yes"/"no"."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def truthy_text(text) -> bool:
    """Megatron declares --onnx-safe with type=bool: any non-empty text is True."""
    return bool(text)


# Megatron's type names (the table's `type` column) -> mindtron's converters.
_TYPES: Dict[str, Callable] = {
    "int": int, "float": float, "str": str, "bool": truthy_text, "tuple_type": int_tuple,
    "moe_freq_type": layer_freq, "la_freq_type": layer_freq, "no_rope_freq_type": layer_freq,
    "_parse_cuda_graph_modules_arg": cuda_graph_module,
}
# enum_type_handler converts a member's name; which enum depends on the flag.
_ENUMS: Dict[str, Tuple[Callable, Tuple[Any, ...]]] = {
    "attention_backend": (attn_backend, tuple(AttnBackend)),
    "exit_signal": (signal_name, tuple(signal.Signals)),
}
# Megatron computes these defaults from the environment when the parser is built.
ENV_DEFAULTS: Dict[str, str] = {"inprocess_active_world_size": "WORLD_SIZE", "local_rank": "LOCAL_RANK"}


def _cell(text: str) -> Any:
    """A JSON cell of the table; plain text where it is not JSON (e.g. a str default "torch_dist")."""
    if text == "":
        return ""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _row_default(row: Dict[str, str], dest: str, type_name: str) -> Any:
    if dest in ENV_DEFAULTS:
        return int(os.getenv(ENV_DEFAULTS[dest], _cell(row["default"])))
    if type_name == "enum_type_handler":
        convert, _ = _ENUMS[dest]
        text = row["default"]
        if dest == "attention_backend":  # written as "<AttnBackend.auto: 5>"
            return convert(text.split(".", 1)[1].split(":", 1)[0])
        return signal.Signals(int(text))
    value = _cell(row["default"])
    if type_name == "str" and value is not None and not isinstance(value, (str, list)):
        return row["default"]  # a str option's default that happens to look like a number
    return value


def _flag_from_row(row: Dict[str, str]) -> Flag:
    name, dest, type_name = row["flag"], row["dest"], row["type"]
    options = (name, *[a for a in row["aliases"].split(",") if a])
    default = _row_default(row, dest, type_name)
    common = dict(dest=dest, default=default, group=row["group"], type_name=type_name,
                  in_core_v0_15=row["in_core_v0.15.3"] == "yes")
    if type_name in ("store_true", "store_false"):
        return Flag(options, action=type_name, const=_cell(row["const"]), **common)
    if row["nargs"] == "0":  # BooleanOptionalAction: `--x` / `--no-x`
        if not any(o == "--no-" + name[2:] for o in options):
            raise ValueError(f"{TABLE_PATH}: {name} takes no value but has no --no-{name[2:]} alias")
        return Flag(options, action="bool_optional", **common)
    if type_name == "enum_type_handler":
        convert, choices = _ENUMS[dest]
    else:
        if type_name not in _TYPES:
            raise ValueError(f"{TABLE_PATH}: {name} has type {type_name!r}, which mindtron cannot convert")
        convert = _TYPES[type_name]
        raw_choices = _cell(row["choices"])
        choices = tuple(raw_choices) if raw_choices is not None else None
    nargs = _cell(row["nargs"])
    return Flag(options, type=convert, choices=choices, nargs=nargs, **common)


def read_table(path: str = TABLE_PATH) -> List[Flag]:
    """The flags of a Megatron flag table (see the module docstring), in the table's order."""
    with open(path, encoding="utf-8", newline="") as handle:
        return [_flag_from_row(row) for row in csv.DictReader(handle, delimiter="\t")]


# ---------------------------------------------------------------------------------------------------------
# mindtron's own options. Defaults follow the mindtron config fields they map to (None where mindtron
# derives the value, see validate_arguments.py).
# ---------------------------------------------------------------------------------------------------------
def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def val(option: str, type: Optional[Callable] = str, default: Any = None, *, choices: Optional[Sequence] = None,
        nargs: Any = None, dest: Optional[str] = None, aliases: Sequence[str] = (), const: Any = None) -> Flag:
    """A mindtron option that takes a value."""
    return Flag((option, *aliases), dest or _dest(option), "store", type, default,
                tuple(choices) if choices is not None else None, nargs, const,
                type_name=getattr(type, "__name__", ""))


def switch(option: str, default: bool) -> Flag:
    """A boolean that reads `--x` (True), `--x false` or `--x true`; for mindtron options whose default
    is True, where a Megatron-style store_true could not turn them off."""
    return val(option, str_to_bool, default, nargs="?", const=True)


def on(option: str, dest: Optional[str] = None) -> Flag:
    """A mindtron store_true switch."""
    return Flag((option,), dest or _dest(option), "store_true", None, False, const=True, type_name="store_true")


def layer_list(text):
    """--num-layer-list: "4,4,4,2", "[4,4,4,2]" or nested per virtual stage "[[2,2],[2,2]]"."""
    if text is None or isinstance(text, list):
        return text
    stripped = str(text).strip()
    if not stripped:
        return None
    if not stripped.startswith("["):
        stripped = f"[{stripped}]"
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
        raise argparse.ArgumentTypeError(f"--num-layer-list {text!r}: write counts like 4,4,4,2 or "
                                         "[[2,2],[2,2]] (one list per virtual stage)") from None
    return [list(v) if isinstance(v, (list, tuple)) else v for v in value]


_CP_ALGOS = {"ring": "ring", "megatron_cp_algo": "ring", "ulysses": "ulysses", "ulysses_cp_algo": "ulysses",
             "hybrid": "hybrid", "hybrid_cp_algo": "hybrid"}


def cp_algo(text) -> str:
    """"ring", "ulysses" or "hybrid"; MindSpeed's names (megatron_cp_algo, ulysses_cp_algo,
    hybrid_cp_algo) are read as the same algorithms."""
    try:
        return _CP_ALGOS[str(text)]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown context-parallel algorithm {text!r}; use ring, ulysses or "
                                         "hybrid") from None


def callback_list(value) -> list:
    """--callbacks: a JSON list of {"type": Name, argument: value, ...} mappings (in YAML, the `callbacks:`
    list of document 000/001's layout)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--callbacks {value!r} is not JSON ({err}); write a list such as "
                                             '\'[{"type": "MoEDropRateCallback"}]\'') from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, dict) and "type" in v for v in value):
        raise argparse.ArgumentTypeError(f"callbacks must be a list of mappings, each with a 'type', got {value!r}")
    return [dict(v) for v in value]


_DTYPE_NAMES = ("float32", "fp32", "float16", "fp16", "bfloat16", "bf16")

_MINDTRON_MODEL = [
    on("--add-dense-bias"),
    on("--use-sandwich-norm"),
    val("--attn-post-norm-scale", float, 1.0),
    val("--ffn-post-norm-scale", float, 1.0),
    val("--pre-tockens", int, 65536),
    val("--next-tockens", int, 0),
    val("--shape-order", str, "SBH", choices=("SBH", "BSH", "BSND", "BNSD")),
    val("--params-dtype", str, choices=_DTYPE_NAMES),
    val("--compute-dtype", str, choices=_DTYPE_NAMES),
    val("--embedding-dtype", str, choices=_DTYPE_NAMES),
    on("--use-fused-swiglu"),
    on("--use-fused-rope"),
    on("--use-fused-rmsnorm"),
    val("--hidden-act", str, choices=("gelu", "gelu_tanh", "swiglu", "squared_relu", "silu", "quick_geglu")),
    # compiled transformer layers (TransformerConfig.jit_layers) are the default; this runs them eagerly
    on("--no-jit-layers"),
]

_MINDTRON_TRAINING = [
    on("--resume-training"),
    on("--resume-crc-check"),
    val("--ckpt-prefix", str, "network"),
    val("--keep-checkpoint-max", int),
    switch("--wrap-with-ddp", True),
    val("--bucket-size", int),
    on("--enable-mem-align"),
    switch("--delay-grad-reduce", True),
    on("--new-dataset"),
    val("--profile-save-path", str, "./profile"),
    val("--profile-level", str, "level0", choices=("level0", "level1", "level2")),
    on("--profile-with-stack"),
    on("--profile-memory"),
    val("--profile-framework", str, choices=("all", "time")),
    on("--profile-communication"),
    on("--profile-parallel-strategy"),
    val("--profile-aicore-metrics", int, 0),
    on("--profile-l2-cache"),
    on("--profile-hbm-ddr"),
    on("--profile-pcie"),
    on("--profile-data-process"),
    on("--profile-data-simplification"),
    switch("--profile-op-time", True),
    on("--profile-offline-analyse"),
    val("--profile-dynamic-profiler-config-path", str, ""),
    # documents 000/001: clipping, accumulation, adaptive loss scaling
    on("--use-clip-grad"),
    val("--max-grad-norm", float),
    val("--gradient-accumulation-steps", int),
    on("--use-adaptive-loss-scale"),
    val("--loss-scale-value", float),
    val("--scale-factor", float, 2.0),
    val("--scale-window", int),
    val("--max-scale-window", int, 1000),
    val("--min-scale-window", int, 20),
    # callbacks (YAML `callbacks:`) and where the MoE token distribution goes
    val("--callbacks", callback_list),
    val("--token-distribution-dir", str),
    val("--token-distribution-interval", int, 1),
    on("--log-token-distribution"),
]

_MINDTRON_DATASET = [
    val("--pad-token-id", int),
    val("--eos-token-id", int),
    switch("--drop-remainder", True),
    val("--micro-batch-num", int),
]

_MINDTRON_MOE = [
    on("--enable-gmm-safe-tokens"),
    val("--first-k-dense-replace", int),
    # documents 000/001's MoE tools (moe_config keys of the same names; update_step -> --hot-expert-update-step)
    on("--save-token-distribution"),
    on("--callback-moe-droprate"),
    on("--enable-cold-hot-expert"),
    val("--hot-expert-num", int, 0),
    val("--cold-token-percent", float, 1.0),
    val("--moe-module-name", str),
    val("--hot-expert-update-step", int, 10000),
]

_MINDTRON_PARALLEL = [
    val("--context-parallel-algo", cp_algo, "ring"),
    val("--ulysses-degree-in-cp", int),
    val("--virtual-pipeline-model-parallel-size", int),
    val("--num-layer-list", layer_list),
    on("--recompute"),
    on("--select-recompute"),
    on("--select-comm-recompute"),
]

# Where mindtron departs from a row of Megatron's table on purpose: option -> (change, reason). The
# whole-table test checks that these are the only differences.
MINDTRON_CHANGES: Dict[str, Tuple[Dict[str, Any], str]] = {
    "--yaml-cfg": ({"options": ("--yaml-cfg", "--config")},
                   "document 002 reads its configuration with --config FILE; --config is an extra spelling"),
    "--ckpt-format": ({"choices": ("torch", "torch_dist", "torch_dcp", "fsdp_dtensor", "safetensors")},
                      "mindtron writes its own safetensors checkpoints and accepts naming that format"),
}


def _apply_changes(flag: Flag) -> Flag:
    change = MINDTRON_CHANGES.get(flag.name)
    return replace(flag, **change[0]) if change else flag


MEGATRON_FLAGS: Tuple[Flag, ...] = tuple(_apply_changes(f) for f in read_table())
"""Megatron-LM core_r0.19.0's flags, in the table's order (with MINDTRON_CHANGES applied)."""


# Options sharing a dest: argparse keeps the default of the one registered first. The table is sorted by
# name, so the option Megatron registers first is named here.
_REGISTERED_FIRST = ("--yarn-correction-range-round-to-int",)


def _groups() -> Dict[str, List[Flag]]:
    groups: Dict[str, List[Flag]] = {}
    ordered = sorted(MEGATRON_FLAGS, key=lambda f: f.name not in _REGISTERED_FIRST)
    for flag in ordered:
        groups.setdefault(flag.group, []).append(flag)
    for title, flags in (("mindtron: model (document 002)", _MINDTRON_MODEL),
                         ("mindtron: training (documents 000-002)", _MINDTRON_TRAINING),
                         ("mindtron: dataset (document 002)", _MINDTRON_DATASET),
                         ("mindtron: parallel (document 002)", _MINDTRON_PARALLEL),
                         ("mindtron: moe (documents 000-001)", _MINDTRON_MOE)):
        groups[title] = [replace(f, group=title) for f in flags]
    return groups


GROUPS: Dict[str, List[Flag]] = _groups()
"""Flags by argparse group: Megatron's groups (as the table names them), then mindtron's."""
MINDTRON_GROUPS = tuple(title for title in GROUPS if title.startswith("mindtron:"))
ALL_FLAGS: Tuple[Flag, ...] = tuple(f for flags in GROUPS.values() for f in flags)
FLAGS_BY_OPTION: Dict[str, Flag] = {o: f for f in ALL_FLAGS for o in f.all_options}
FLAGS_BY_DEST: Dict[str, Flag] = {}
for _f in ALL_FLAGS:
    FLAGS_BY_DEST.setdefault(_f.dest, _f)
MEGATRON_DESTS = frozenset(f.dest for f in MEGATRON_FLAGS)


def _check_table() -> None:
    # mindtron's options must not collide with Megatron's (a name or a dest used twice would shadow one).
    seen: Dict[str, str] = {}
    for flag in ALL_FLAGS:
        for option in flag.options:
            if option in seen:
                raise ValueError(f"option {option} is defined twice (groups {seen[option]!r} and {flag.group!r})")
            seen[option] = flag.group
    clash = sorted(f.dest for flags in GROUPS.values() for f in flags
                   if not f.megatron and f.dest in MEGATRON_DESTS)
    if clash:
        raise ValueError(f"mindtron options reuse Megatron dests: {clash}")


_check_table()


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register every flag of the table on `parser`, one argparse group per Megatron group."""
    for title, flags in GROUPS.items():
        group = parser.add_argument_group(title=title)
        for flag in flags:
            group.add_argument(*flag.options, **flag.kwargs())
    return parser


def build_parser(parser_class=argparse.ArgumentParser, **parser_kwargs) -> argparse.ArgumentParser:
    """A parser with all of Megatron's flags and mindtron's additions (no abbreviations, as Megatron)."""
    parser_kwargs.setdefault("description", "mindtron (Megatron-LM core_r0.19.0 arguments)")
    parser_kwargs.setdefault("allow_abbrev", False)
    return add_flags(parser_class(**parser_kwargs))
