"""Megatron's command line for mindtron: parse Megatron-LM's flags (core_r0.19.0) and document 002's YAML.

    args = parse_args()                    # sys.argv, or parse_args(args=[...], world_size=8)
    set_args(args)                         # get_args() from anywhere afterwards
    all_config = init_configs_from_args(args)

This module parses; the other jobs live next to it and are re-exported here:

- megatron_flags.py       the flag table (Megatron's, from its TSV copy, plus mindtron's options)
- flag_policy.py          what mindtron does with each flag: implemented / ignored (warns) / refused (error)
- yaml_arguments.py       `--yaml-cfg FILE` in document 002's layout
- validate_arguments.py   Megatron's validate_args: derived values and checks
- config_mapping.py       CONFIG_MAP and init_configs_from_args (arguments -> typed configs)

A flag Megatron does not have is a ValueError that suggests the nearest real one. Nothing here touches a
device or a process group.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, List, Optional, Sequence

from mindtron.training import megatron_flags as mf
from mindtron.training.config_mapping import CONFIG_MAP, SECTIONS, init_configs_from_args
from mindtron.training.flag_policy import (ARGUMENT_LAYER, NOT_IMPLEMENTED, REFUSED_FLAGS, NotImplementedFlagWarning,
                                           check_flags, policy)
from mindtron.training.validate_arguments import apply_defaults, validate_args
from mindtron.training.yaml_arguments import load_yaml_config, suggest

__all__ = [
    "CONFIG_MAP", "NOT_IMPLEMENTED", "REFUSED_FLAGS", "ARGUMENT_LAYER", "SECTIONS", "NotImplementedFlagWarning",
    "parse_args", "validate_args", "load_yaml_config", "init_configs_from_args", "set_args", "get_args",
    "build_parser", "policy",
]


class MegatronArgumentParser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise ValueError(f"{message} (python <script> --help lists Megatron's flags)")


def build_parser(extra_args_provider: Optional[Callable] = None) -> argparse.ArgumentParser:
    """Megatron's parser (all flags of `megatron_flags`), plus `extra_args_provider(parser)`'s own flags."""
    parser = mf.build_parser(MegatronArgumentParser)
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    return parser


def _option_names(parser: argparse.ArgumentParser) -> List[str]:
    return [o for action in parser._actions for o in action.option_strings]  # noqa: SLF001 - argparse has no API


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """The dests the command line sets itself (a flag given with its default value counts)."""
    actions = parser._actions  # noqa: SLF001
    saved = [a.default for a in actions]
    saved_defaults = parser._defaults  # noqa: SLF001
    try:
        for a in actions:
            a.default = argparse.SUPPRESS
        parser._defaults = {}  # noqa: SLF001
        namespace, _ = parser.parse_known_args(list(argv))
    finally:
        for a, default in zip(actions, saved):
            a.default = default
        parser._defaults = saved_defaults  # noqa: SLF001
    return set(vars(namespace))


def parse_args(extra_args_provider: Optional[Callable] = None, ignore_unknown_args: bool = False,
               args: Optional[Sequence[str]] = None, *, world_size: Optional[int] = None,
               args_defaults: Optional[Dict[str, Any]] = None, validate: bool = True) -> argparse.Namespace:
    """Parse Megatron's flags from `args` (default `sys.argv[1:]`) like Megatron's parse_args + validate_args.

    `extra_args_provider(parser)` adds a script's own flags. A flag Megatron does not have raises ValueError
    naming the closest real flag, unless `ignore_unknown_args`. `--yaml-cfg PATH` (or `--config PATH`)
    loads document 002's YAML layout or a flat `dest: value` file first; flags given on the command line
    win over it. `args_defaults` fills arguments the user left unset (Megatron's `args_defaults`).
    A flag mindtron ignores warns once when set to a non-default value; a flag it refuses (one whose absence
    would change the run) is a ValueError naming it (see flag_policy.py).
    `world_size` defaults to msrun's MS_WORKER_NUM, else 1. With `validate` (default) the derived values
    (data-parallel size, global batch, virtual pipeline size, ffn size, dtypes, ...) are computed and
    invalid combinations raise ValueError; no device or process group is touched.
    """
    import sys

    argv = list(sys.argv[1:] if args is None else args)
    parser = build_parser(extra_args_provider)
    namespace, unknown = parser.parse_known_args(argv)
    unknown_flags = [u.split("=", 1)[0] for u in unknown if u.startswith("--") or
                     (u.startswith("-") and len(u) > 1 and not u[1].isdigit() and u[1] != ".")]
    if unknown_flags and not ignore_unknown_args:
        names = _option_names(parser)
        problems = [f"{u}{suggest(u, names)}" for u in unknown_flags]
        raise ValueError("unknown argument(s), not a Megatron-LM (core_r0.19.0) or mindtron flag: "
                         + "; ".join(problems))
    if unknown and not unknown_flags and not ignore_unknown_args:
        raise ValueError(f"unexpected value(s) {unknown} on the command line: every value follows its flag")

    explicit = _explicit_dests(parser, argv)
    user_set = set(explicit)
    if namespace.yaml_cfg:
        from_yaml = load_yaml_config(namespace.yaml_cfg, parser, ignore_unknown=ignore_unknown_args)
        for dest, value in from_yaml.items():
            if dest not in explicit:  # the command line overrides the file
                setattr(namespace, dest, value)
        user_set |= set(from_yaml)
    namespace.explicit_args = sorted(user_set)
    check_flags(namespace, user_set)
    if validate:
        validate_args(namespace, args_defaults or {}, world_size=world_size)
    elif args_defaults:
        apply_defaults(namespace, args_defaults)
    return namespace


# ---------------------------------------------------------------------------------------------------------
# Global arguments (Megatron's global_vars)
# ---------------------------------------------------------------------------------------------------------
_GLOBAL_ARGS: Optional[argparse.Namespace] = None


def set_args(args: Optional[argparse.Namespace]) -> None:
    """Make `args` the process's arguments for get_args() (None forgets them)."""
    global _GLOBAL_ARGS
    _GLOBAL_ARGS = args


def get_args() -> argparse.Namespace:
    """The arguments set by set_args() / initialize_megatron(); RuntimeError before that."""
    if _GLOBAL_ARGS is None:
        raise RuntimeError("arguments are not parsed yet: call initialize_megatron(), or parse_args() and "
                           "set_args(), first")
    return _GLOBAL_ARGS
