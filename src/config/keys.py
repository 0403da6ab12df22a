"""Keys added on the command line (`+group.key=value`) that no part of the program reads. Hydra accepts any
added key, so a typo (`+stats.every_n_step=5`) would train with the setting silently ignored; here each added
key must be read: by the callable its node is passed to (the Trainer, the model's builder, a callback's class:
checked against its signature), or by our code (the keys it reads with a default, below)."""
from __future__ import annotations

import difflib
import inspect
import sys

from hydra.experimental.callback import Callback
from hydra.utils import get_object
from omegaconf import OmegaConf

# keys our code reads with a default when the option's YAML does not set them
OPTIONAL = {"data": {"val_fraction", "limit_train", "standardize"},
            "model": {"widths", "norm", "residual", "head_activation"}}


def added(overrides: list[str]) -> list[str]:
    """The keys of `+key=value` and `++key=value` overrides (not deletions `~key`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)
            if o.is_add() or o.is_force_add()]


def _parameters(target: str) -> set[str] | None:
    """The keyword parameters of `target`'s callable (its __init__ for a class); None when it takes **kwargs or
    cannot be inspected (then anything may be read)."""
    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except (ImportError, ValueError, TypeError, AttributeError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params}


def _readers(cfg, key: str) -> set[str] | None:
    """The names that may follow `key`'s parent node; None when anything may (not ours to check)."""
    parts = key.split(".")
    if parts[0] == "hydra":
        return None  # Hydra checks its own keys
    if parts[0] == "trainer" and len(parts) == 2:
        return _parameters("lightning.Trainer")
    if parts[0] == "callbacks" and len(parts) >= 3:
        node = OmegaConf.select(cfg, ".".join(parts[:2]))
        target = node.get("_target_") if node is not None else None
        return None if target is None or parts[2] == "_target_" else _parameters(str(target))
    if parts[0] == "callbacks":
        return None  # a callback of the user's own: its _target_ is checked when it is built
    if parts[0] == "model" and len(parts) == 2:
        target = OmegaConf.select(cfg, "model._target_")
        found = _parameters(str(target)) if target else None
        return None if found is None else found | OPTIONAL["model"]
    if len(parts) == 1:
        return set()  # nothing reads a top-level key the root config does not define
    return OPTIONAL.get(parts[0], set())


def problems(cfg, overrides: list[str]) -> list[str]:
    """One line per added key that nothing reads, with the nearest key that exists."""
    out = []
    for key in added(overrides):
        readers = _readers(cfg, key)
        if readers is None or key.rsplit(".", 1)[-1] in readers:
            continue
        parent, _, name = key.rpartition(".")
        existing = [k for k in _flat(cfg) if k != key]
        siblings = {k.rpartition(".")[2] for k in existing if k.rpartition(".")[0] == parent} | readers
        # a misspelt name among its siblings first; else a key anywhere (a misspelt group)
        near = [f"{parent}.{n}" if parent else n for n in difflib.get_close_matches(name, siblings, 1, 0.75)] or \
            difflib.get_close_matches(key, existing, 1, 0.85)
        hint = f"; did you mean `{near[0]}`?" if near else ""
        out.append(f"+{key}: no part of the program reads this key{hint}")
    return out


def _flat(cfg) -> list[str]:
    """Every key of the composed config, dotted (unresolved: a multirun's config has values known only later)."""
    def walk(node, prefix: str) -> list[str]:
        keys = []
        for k, v in node.items():
            keys.append(f"{prefix}{k}")
            if isinstance(v, dict):
                keys += walk(v, f"{prefix}{k}.")
        return keys

    return walk(OmegaConf.to_container(cfg, resolve=False), "")


class AddedKeysCheck(Callback):
    """The same check for a multirun, before any job, study or parent run exists (a single run is checked by
    train(), through src.config.validate)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        found = problems(config, list(config.hydra.overrides.task))
        if found:
            print("config error:\n  " + "\n  ".join(found), file=sys.stderr)
            sys.exit(2)
