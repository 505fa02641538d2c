"""Document 002's YAML configuration for Megatron flags: `--yaml-cfg FILE` (or `--config FILE`).

Two layouts, mixable: the sections `model_config`, `training_config`, `dataset_config`, `optimizer_config`,
`parallel_config` keyed by the config field names (read through config_mapping.CONFIG_MAP backwards), and flat
`dest: value` pairs with Megatron's names. Values are converted and checked like command-line text. The
`moe_config` section of documents 000/001 (top level, or inside model_config) uses MindFormers' key names
(moe_yaml.py); the top-level `callbacks:` (or `callback:`) list of documents 000/001 sets --callbacks.
"""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Dict, List, Optional, Tuple

from mindtron.training import megatron_flags as mf
from mindtron.training.config_mapping import CONFIG_MAP, SECTIONS

__all__ = ["load_yaml_config", "FIELD_TO_DEST", "FIELD_SPECIAL"]


def suggest(name: str, candidates) -> str:
    """'; did you mean X or Y?' for the closest candidates, or ''."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _field_to_dest() -> Dict[Tuple[str, str], str]:
    # "section.field" -> the flag a YAML value for it sets (the first CONFIG_MAP row for the field).
    reverse: Dict[Tuple[str, str], str] = {}
    for dest, target in CONFIG_MAP:
        section, field = target.split(".", 1)
        reverse.setdefault((section, field.split(".")[0]), dest)
    return reverse


FIELD_TO_DEST = _field_to_dest()
# Fields whose YAML value does not copy onto one flag.
FIELD_SPECIAL = {("optimizer_config", "betas"), ("model_config", "fa_config"), ("parallel_config", "order"),
                 ("model_config", "moe_config"), ("model_config", "jit_layers")}
_FA_KEYS = {"pre_tokens": "pre_tockens", "next_tokens": "next_tockens", "input_layout": "shape_order"}
_ORDERS = {"tp-cp-ep-dp-pp": False, "tp-cp-ep-pp-dp": True}


def load_yaml_config(path: str, parser: Optional[argparse.ArgumentParser] = None,
                     ignore_unknown: bool = False) -> Dict[str, Any]:
    """Read a YAML file into {dest: value} for the parser's flags.

    Two layouts, mixable: document 002's sections `model_config`, `training_config`, `dataset_config`,
    `optimizer_config`, `parallel_config` keyed by the config field names (Megatron dest names are accepted
    inside them too), and flat `dest: value` pairs with Megatron's names (`num_layers: 24`,
    `tensor-model-parallel-size: 2`). Values are converted and checked like command-line text; null means
    "not set". Unknown keys raise ValueError with the closest known name, unless `ignore_unknown`.
    """
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--yaml-cfg {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--yaml-cfg {path}: expected a mapping of sections or flags at the top level")
    if parser is None:
        from mindtron.training.arguments import build_parser
        parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}  # noqa: SLF001
    options = {o: a for a in actions.values() for o in a.option_strings}
    out: Dict[str, Any] = {}
    problems: List[str] = []

    def put(dest: str, value: Any, where: str) -> None:
        if value is None:
            return
        action = actions[dest]
        try:
            out[dest] = _convert(action, value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
            raise ValueError(f"--yaml-cfg {path}: {where}: {err}") from None

    def put_moe(section: Any, where: str) -> None:
        from mindtron.training.moe_yaml import moe_section_to_flags

        if not isinstance(section, dict):
            raise ValueError(f"--yaml-cfg {path}: {where} must be a mapping of MoE options")
        try:
            pairs, unknown = moe_section_to_flags(section, lambda k: k in actions)
        except (ValueError, TypeError) as err:
            raise ValueError(f"--yaml-cfg {path}: {where}: {err}") from None
        for dest, v in pairs:
            put(dest, v, f"{where}")
        problems.extend(f"{where}.{k}" for k in unknown)

    for key, value in data.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name == "callback":  # document 001's example spells the list `callback:`
            name = "callbacks"
        if name == "moe_config":
            if value is not None:
                put_moe(value, name)
            continue
        if name in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"--yaml-cfg {path}: section {name} must be a mapping of field: value")
            for field, item in value.items():
                field = str(field).replace("-", "_")
                where = f"{name}.{field}"
                if (name, field) == ("model_config", "moe_config"):
                    if item is not None:
                        put_moe(item, where)
                elif (name, field) in FIELD_SPECIAL:
                    for dest, v in _special_yaml(name, field, item, where):
                        put(dest, v, where)
                elif (name, field) in FIELD_TO_DEST:
                    put(FIELD_TO_DEST[(name, field)], item, where)
                elif field in actions:
                    put(field, item, where)
                else:
                    known = [f for (s, f) in FIELD_TO_DEST if s == name] + [f for (s, f) in FIELD_SPECIAL
                                                                              if s == name]
                    problems.append(f"{where}{suggest(field, known)}")
        elif name in actions:
            put(name, value, name)
        elif "--" + name.replace("_", "-") in options:
            # an option spelled as a key, e.g. `disable_bias_linear: true` (dest add_bias_linear)
            action = options["--" + name.replace("_", "-")]
            if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
                if mf.str_to_bool(value):
                    out[action.dest] = action.const
            else:
                put(action.dest, value, name)
        else:
            problems.append(f"{key}{suggest(name, list(actions) + list(SECTIONS))}")
    if problems and not ignore_unknown:
        raise ValueError(f"--yaml-cfg {path}: unknown key(s): " + "; ".join(problems))
    return out


def _special_yaml(section: str, field: str, value: Any, where: str) -> List[Tuple[str, Any]]:
    if value is None:
        return []
    if (section, field) == ("optimizer_config", "betas"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ValueError(f"{where}: betas must be a pair [beta1, beta2], got {value!r}")
        return [("adam_beta1", value[0]), ("adam_beta2", value[1])]
    if (section, field) == ("model_config", "jit_layers"):  # on by default: false is --no-jit-layers
        return [("no_jit_layers", not mf.str_to_bool(value))]
    if (section, field) == ("model_config", "fa_config"):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: fa_config must be a mapping of pre_tokens/next_tokens/input_layout")
        unknown = set(value) - set(_FA_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_FA_KEYS)}")
        return [(_FA_KEYS[k], v) for k, v in value.items()]
    if value not in _ORDERS:  # parallel_config.order
        raise ValueError(f"{where}: order {value!r} is not one of {sorted(_ORDERS)}")
    return [("use_tp_pp_dp_mapping", _ORDERS[value])]


def _convert(action: argparse.Action, value: Any) -> Any:
    """A YAML value as argparse would have produced it from text (types, nargs, choices)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,  # noqa: SLF001
                           argparse.BooleanOptionalAction, mf.BoolOptionalAction)):
        return mf.str_to_bool(value)
    convert = action.type

    def one(item):
        if isinstance(item, bool) and convert in (int, float):
            raise ValueError(f"expected a number, got {item!r}")
        if convert is None:
            out = item
        elif convert is str:
            out = str(item)
        elif convert is int and isinstance(item, float):
            if not item.is_integer():
                raise ValueError(f"expected an integer, got {item!r}")
            out = int(item)
        else:  # text through the flag's own converter; the table's converters also take parsed values
            out = convert(item)
        if action.choices is not None and out not in action.choices:
            raise ValueError(f"invalid choice {out!r} (choose from {', '.join(map(repr, action.choices))})")
        return out

    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [one(v) for v in items]
    return one(value)
