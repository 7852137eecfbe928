"""mergekit YAML configs for ``trainkit merge --config CFG.yaml``.

A mergekit user's config file runs unchanged, with mergekit 0.1.5's arithmetic
(``compat="mergekit"``, tensor scope). The file is checked whole before any
tensor is read (mergekit users complain that its errors come after long loads):
an unknown key, a model given as a Hugging Face Hub id, a missing model
directory or a parameter of the wrong type is one line naming the key.

Supported (the rest is refused, naming the key)::

    merge_method: ties            # ties, dare_ties, task_arithmetic, linear, breadcrumbs(_ties),
                                  # dare_linear, della(_linear)
    base_model: ./base            # a local path (required except for linear)
    models:
      - model: ./ft-a
        parameters: {density: 0.2, weight: 1.0}
    parameters: {normalize: true, lambda: 1.0, int8_mask: true, density: 0.2, weight: 1.0}
    dtype: float32                # inputs cast to it, arithmetic in it (mergekit's semantics)
    out_dtype: bfloat16           # the output's dtype (default: dtype)
    tokenizer_source: base

Example::

    spec = load_config("merge.yaml")
    merge_files(spec.base, spec.models, "out", spec.config)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit.merge.methods import METHODS, MergeConfig, make_config

__all__ = ["ConfigError", "YamlMerge", "load_config", "parse_config"]

_TOP_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source"}
_MODEL_KEYS = {"model", "parameters"}
_MODEL_PARAMS = {"density", "weight", "gamma", "epsilon"}
_TOP_PARAMS = {"normalize", "lambda", "int8_mask", "density", "weight", "rescale", "gamma", "epsilon"}
_RESCALED = {"dare_ties", "dare_linear", "della", "della_linear"}
"""Methods whose mergekit default is ``rescale: true`` (the only setting supported)."""
_DTYPES = {"float32", "bfloat16", "float16", "float64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_MERGEKIT_NAMES = {"linear", "ties", "dare_ties", "task_arithmetic"}
"""mergekit method names that trainkit runs (the presets' names are the same)."""


class ConfigError(ValueError):
    """A config file trainkit cannot run; the message is one line naming the key."""


@dataclass(frozen=True, slots=True)
class YamlMerge:
    """What a mergekit config asks for: inputs and a frozen :class:`MergeConfig`."""

    base: str
    models: tuple[str, ...]
    config: MergeConfig
    dtype: str | None
    """mergekit's ``dtype``: inputs are cast to it and the arithmetic runs in it (also ``config.dtype``)."""


def load_config(path: str | Path) -> YamlMerge:
    """Read and validate a mergekit YAML file (PyYAML ``safe_load``); no tensor is read."""
    path = Path(path)
    try:
        import yaml
    except ImportError as exc:  # the CLI root turns this into "install trainkit[merge]"
        raise ModuleNotFoundError("No module named 'yaml'", name="yaml") from exc
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).replace("\n", " ")
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    return parse_config(data, path)


def _fail(where: Path, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{where}: {key}: {problem}")


def _local_model(value: Any, key: str, where: Path) -> str:
    """A model reference must be an existing local path, resolved against the config's folder."""
    if isinstance(value, dict) and set(value) == {"model"}:  # mergekit's long form {model: {path: ...}}
        value = value["model"]
    if isinstance(value, dict):
        value = value.get("path") if set(value) <= {"path", "lora", "override_architecture"} else None
        if value is None:
            raise _fail(where, key, "only a local path is supported (no LoRA or architecture override)")
    if not isinstance(value, str) or not value:
        raise _fail(where, key, f"expected a local path, got {value!r}")
    if "+" in value:
        raise _fail(where, key, f"{value!r}: model+LoRA references are not supported; merge the LoRA first")
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = where.parent / p
    if p.exists():
        return str(p)
    if _HUB_ID.match(value) and not value.startswith("."):
        raise _fail(where, key, f"{value!r} looks like a Hugging Face Hub id; trainkit merge reads local paths "
                                f"only here: download it first (huggingface-cli download {value} --local-dir DIR) "
                                "and give the directory")
    raise _fail(where, key, f"{value!r} does not exist (resolved to {p})")


def _number(value: Any, key: str, where: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a list (gradient)" if isinstance(value, list) else (
            "a filtered setting" if isinstance(value, dict) else repr(value))
        raise _fail(where, key, f"expected a number, got {kind}; per-layer gradients and filters are not supported")
    return float(value)


def _flag(value: Any, key: str, where: Path) -> bool:
    if not isinstance(value, bool):
        raise _fail(where, key, f"expected true or false, got {value!r}")
    return value


def _check_keys(d: Any, allowed: set[str], prefix: str, where: Path) -> dict:
    if not isinstance(d, dict):
        raise _fail(where, prefix or "the file", f"expected a mapping, got {type(d).__name__}")
    for k in d:
        if k not in allowed:
            name = f"{prefix}.{k}" if prefix else str(k)
            raise _fail(where, name, f"not supported by trainkit merge (supported: {', '.join(sorted(allowed))})")
    return d


def parse_config(data: Any, where: str | Path = "<config>") -> YamlMerge:
    """Validate a parsed mergekit config and build the equivalent trainkit merge.

    Mirrors mergekit 0.1.5: per-model ``weight`` is required (top-level
    ``parameters.weight`` is the default), ``density`` defaults to 1, the base
    model listed among ``models`` is the base, not a fine-tune, and ``normalize``
    takes the method's mergekit default.
    """
    where = Path(where)
    top = _check_keys(data, _TOP_KEYS, "", where)
    method = top.get("merge_method")
    if method is None:
        raise _fail(where, "merge_method", "missing")
    if method not in METHODS or method == "average":
        known = ", ".join(sorted(m for m in METHODS if m != "average"))
        raise _fail(where, "merge_method", f"{method!r} is not supported (supported: {known})")
    params = _check_keys(top.get("parameters") or {}, _TOP_PARAMS, "parameters", where)
    if "rescale" in params and _flag(params["rescale"], "parameters.rescale", where) != (method in _RESCALED):
        raise _fail(where, "parameters.rescale", "only the method's mergekit default is supported")
    dtype = top.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise _fail(where, "dtype", f"{dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
    out_dtype = top.get("out_dtype")
    if out_dtype is not None and out_dtype not in _DTYPES:
        raise _fail(where, "out_dtype", f"{out_dtype!r} is not one of {', '.join(sorted(_DTYPES))}")
    tok = top.get("tokenizer_source")
    if tok is not None and tok != "base":
        raise _fail(where, "tokenizer_source", f"{tok!r}: only 'base' is supported (the base's tokenizer files "
                                               "are copied)")
    entries = top.get("models")
    if not isinstance(entries, list) or not entries:
        raise _fail(where, "models", "missing or empty: list the fine-tuned models as '- model: PATH'")
    base_ref = top.get("base_model")
    base = _local_model(base_ref, "base_model", where) if base_ref is not None else None
    linear = METHODS[method].combine == "linear"
    if base is None and not linear:
        raise _fail(where, "base_model", f"missing: {method} needs a base model")
    default_w = params.get("weight")
    default_d = params.get("density")
    models: list[str] = []
    weights: list[float] = []
    densities: list[float] = []
    for i, entry in enumerate(entries):
        key = f"models[{i}]"
        _check_keys(entry, _MODEL_KEYS, key, where)
        if "model" not in entry:
            raise _fail(where, f"{key}.model", "missing")
        path = _local_model(entry["model"], f"{key}.model", where)
        p = _check_keys(entry.get("parameters") or {}, _MODEL_PARAMS, f"{key}.parameters", where)
        if base is not None and Path(path).resolve() == Path(base).resolve() and not linear:
            continue  # mergekit: the base among the models is the base, not a task vector
        w = p.get("weight", default_w)
        if w is None:
            raise _fail(where, f"{key}.parameters.weight", "missing (mergekit requires a weight per model)")
        weights.append(_number(w, f"{key}.parameters.weight", where))
        d = p.get("density", default_d if default_d is not None else 1.0)
        densities.append(_number(d, f"{key}.parameters.density", where))
        models.append(path)
    extra = {}
    for name, default in (("gamma", 0.01), ("epsilon", 0.15)):
        vals = {_number(e.get("parameters", {}).get(name, params.get(name, default)) if isinstance(e, dict) else
                        default, f"parameters.{name}", where) for e in entries if isinstance(e.get("parameters"), dict)
                or name in params}
        if len(vals) > 1:
            raise _fail(where, f"models[].parameters.{name}", "must be the same for every model here")
        extra[name] = vals.pop() if vals else default
    if not models:
        raise _fail(where, "models", "lists only the base model: nothing to merge")
    if linear and base is not None and not any(Path(m).resolve() == Path(base).resolve() for m in models):
        raise _fail(where, "base_model", "linear merges the base as one more input (mergekit then requires its "
                                         "weight): list it under models with a weight, or drop base_model")
    if base is None:
        base = models[0]
    lam = _number(params.get("lambda", 1.0), "parameters.lambda", where)
    normalize = _flag(params["normalize"], "parameters.normalize", where) if "normalize" in params else None
    if "int8_mask" in params:
        _flag(params["int8_mask"], "parameters.int8_mask", where)  # no effect on values: the mask is boolean
    uniform = len(set(densities)) == 1
    try:
        cfg = make_config(method, len(models), density=densities[0] if uniform else None,
                          densities=None if uniform else densities, lam=lam, weights=weights,
                          compat="mergekit", normalize=normalize, dtype=dtype, out_dtype=out_dtype, **extra)
    except ValueError as exc:
        raise ConfigError(f"{where}: " + "; ".join(line.strip(" -") for line in str(exc).splitlines()[1:])) from None
    return YamlMerge(base, tuple(models), cfg, dtype)
