"""The search file: which config keys a sweep varies, over which ranges, and the sweep's settings.

A search file (or a `search:` section of the config) reads:

    metric: val/loss            # default: the task's monitor metric
    direction: minimize         # default: from the monitor's mode
    sampler: tpe                # tpe | random | grid | cmaes
    pruner: median              # none | median | percentile | threshold | hyperband | asha (or a dict with the pruner's arguments)
    n_trials: 20
    enqueue: [{model.init_args.optimizer.lr: 0.001}]   # values of the first trials (e.g. the config's own)
    params:
      model.init_args.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
      model.init_args.adapter.method: {type: categorical, choices: [none, lora]}
      model.init_args.adapter.r: {type: int, low: 2, high: 16, when: {model.init_args.adapter.method: lora}}

Every key is checked against the resolved base config (`mmtune fit --print_config`) before anything
runs, so a typo fails at once with the nearest real keys instead of after a sweep of failed trials.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mmtune.errors import ConfigError

SAMPLERS = ("tpe", "random", "grid", "cmaes")
PRUNERS = ("none", "median", "percentile", "threshold", "hyperband", "asha")
TYPES = ("float", "int", "categorical")


@dataclasses.dataclass
class Param:
    """One searched key. `when` maps other keys to the value (or list of values) they must have for
    this key to be searched at all (`r` only when `method` is `lora`)."""

    key: str
    type: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[list] = None
    when: dict = dataclasses.field(default_factory=dict)

    def grid_values(self) -> list:
        """The values a grid sampler visits: the choices, or low..high by `step`."""
        if self.type == "categorical":
            return list(self.choices)
        if self.step is None:
            raise ConfigError(f"search: {self.key}: the grid sampler needs `step` (or type: categorical with choices)")
        count = int(math.floor((self.high - self.low) / self.step + 1e-9)) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(round(v)) for v in values] if self.type == "int" else values

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_categorical(self.key, self.choices)


@dataclasses.dataclass
class SearchSpec:
    """A sweep's search space and settings (the search file). Command-line options override these."""

    params: list[Param]
    config: list[str] = dataclasses.field(default_factory=list)  # the config(s) it feeds, relative to the file
    metric: Optional[str] = None
    direction: Optional[str] = None
    sampler: str = "tpe"
    pruner: dict = dataclasses.field(default_factory=lambda: {"type": "none"})
    n_trials: int = 20
    timeout: Optional[float] = None
    seed: Optional[int] = 0
    workers: int = 1
    devices_per_trial: Optional[int] = None
    keep_checkpoints: int = 1
    heartbeat_s: float = 30.0
    max_retries: int = 1
    enqueue: list = dataclasses.field(default_factory=list)  # first trials' values, e.g. the config's own
    source: str = "search"

    def suggest(self, trial, base: dict[str, Any]) -> dict[str, Any]:
        """This trial's values, define-by-run: a conditional key is only suggested when the keys it
        depends on (searched earlier in this trial, or fixed in the base config) have the values named."""
        chosen: dict[str, Any] = {}
        for param in self.params:
            current = {**base, **chosen}
            if all(_matches(current.get(k), v) for k, v in param.when.items()):
                chosen[param.key] = param.suggest(trial)
        return chosen


def _matches(value: Any, wanted: Any) -> bool:
    return value in wanted if isinstance(wanted, list) else value == wanted


SETTINGS = {f.name for f in dataclasses.fields(SearchSpec)} - {"params", "source"}


def read_search(path: Union[str, Path]) -> tuple[dict, Path]:
    """The search section of a file: the file itself, or its `search:` key when it is a config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--search {path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a search file is a mapping with `params:` (and settings)")
    return (raw["search"] if "search" in raw else raw), path


def parse_search(raw: dict, source: str, base_dir: Optional[Path] = None) -> SearchSpec:
    """Checks a search section's shape and ranges (not yet the keys: see `check_keys`)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the search section must be a mapping")
    unknown = sorted(set(raw) - SETTINGS - {"params"})
    if unknown:
        near = difflib.get_close_matches(unknown[0], sorted(SETTINGS | {"params"}), n=1)
        raise ConfigError(f"{source}: unknown search setting {unknown[0]!r}"
                          + (f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(SETTINGS))}, params"))
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{source}: `params` must map config keys to ranges, e.g. "
                          "model.init_args.optimizer.lr: {type: float, low: 1.0e-5, high: 1.0e-2, log: true}")
    settings = {k: v for k, v in raw.items() if k != "params"}
    configs = settings.pop("config", None) or []
    configs = [configs] if isinstance(configs, str) else list(configs)
    if base_dir is not None:
        configs = [str(c) if Path(c).is_absolute() else str((base_dir / c).resolve()) for c in configs]
    spec = SearchSpec(params=[parse_param(k, v, source) for k, v in params_raw.items()], config=configs,
                      source=source, **settings)
    spec.pruner = parse_pruner(spec.pruner, source)
    check_settings(spec)
    return spec


def parse_param(key: str, raw: Any, source: str) -> Param:
    where = f"{source}: params.{key}"
    if isinstance(raw, list):  # a bare list is a categorical
        raw = {"type": "categorical", "choices": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a range is a mapping such as {{type: float, low: 0.0001, high: 0.01}}")
    kind = raw.get("type") or ("categorical" if "choices" in raw else None)
    if kind not in TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}, got {kind!r}")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Param)} - {"type"} | ({"key"} & set(raw)))
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: type, low, high, log, step, choices, when)")
    param = Param(key=key, type=kind, low=raw.get("low"), high=raw.get("high"), log=bool(raw.get("log", False)),
                  step=raw.get("step"), choices=raw.get("choices"), when=dict(raw.get("when") or {}))
    if kind == "categorical":
        if not isinstance(param.choices, list) or not param.choices:
            raise ConfigError(f"{where}: `choices` must be a non-empty list")
        return param
    for name in ("low", "high"):
        value = getattr(param, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: `{name}` must be a number, got {value!r}")
    if kind == "int" and not (float(param.low).is_integer() and float(param.high).is_integer()):
        raise ConfigError(f"{where}: an int range needs whole numbers, got low={param.low}, high={param.high}")
    if param.low >= param.high:
        raise ConfigError(f"{where}: empty range: low ({param.low}) must be below high ({param.high})")
    if param.log and param.low <= 0:
        raise ConfigError(f"{where}: a log range needs low > 0, got {param.low}")
    if param.step is not None and (param.step <= 0 or param.log):
        raise ConfigError(f"{where}: `step` must be > 0 and cannot be combined with log: true")
    return param


def parse_pruner(raw: Any, source: str) -> dict:
    pruner = {"type": raw} if isinstance(raw, str) or raw is None else dict(raw)
    pruner["type"] = pruner.get("type") or "none"
    if pruner["type"] == "successive_halving":
        pruner["type"] = "asha"
    if pruner["type"] not in PRUNERS:
        raise ConfigError(f"{source}: pruner must be one of {', '.join(PRUNERS)}, got {pruner['type']!r}")
    return pruner


def check_settings(spec: SearchSpec) -> None:
    where = spec.source
    if spec.sampler not in SAMPLERS:
        raise ConfigError(f"{where}: sampler must be one of {', '.join(SAMPLERS)}, got {spec.sampler!r}")
    if spec.direction not in (None, "minimize", "maximize"):
        raise ConfigError(f"{where}: direction must be minimize or maximize, got {spec.direction!r}")
    if not isinstance(spec.n_trials, int) or spec.n_trials < 1:
        raise ConfigError(f"{where}: n_trials must be 1 or more, got {spec.n_trials!r}")
    if spec.timeout is not None and spec.timeout <= 0:
        raise ConfigError(f"{where}: timeout must be a positive number of seconds, got {spec.timeout}")
    if spec.workers < 1 or spec.keep_checkpoints < 0 or spec.heartbeat_s <= 0:
        raise ConfigError(f"{where}: workers must be >= 1, keep_checkpoints >= 0 and heartbeat_s > 0")
    if spec.devices_per_trial is not None and spec.devices_per_trial < 1:
        raise ConfigError(f"{where}: devices_per_trial must be 1 or more, got {spec.devices_per_trial}")
    searched = [p.key for p in spec.params]
    for param in spec.params:
        for key in param.when:
            if key == param.key or (key in searched and searched.index(key) > searched.index(param.key)):
                raise ConfigError(f"{where}: params.{param.key}: `when` names {key!r}, which must be searched "
                                  "before it (listed above it) or fixed in the config")
    if not isinstance(spec.enqueue, list) or not all(isinstance(e, dict) for e in spec.enqueue):
        raise ConfigError(f"{where}: enqueue must be a list of {{key: value}} mappings of searched keys")
    for values in spec.enqueue:
        for key in values:
            if key not in searched:
                near = difflib.get_close_matches(key, searched, n=1)
                raise ConfigError(f"{where}: enqueue names {key!r}, which is not searched"
                                  + (f"; did you mean {near[0]!r}?" if near else ""))
    if spec.sampler == "grid":
        if any(p.when for p in spec.params):
            raise ConfigError(f"{where}: the grid sampler cannot search conditional keys (`when`); use tpe or random")
        for param in spec.params:
            param.grid_values()


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """`{'a': {'b': 1}}` -> `{'a': {'b': 1}, 'a.b': 1}`: every dotted key of a resolved config."""
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            dotted = f"{prefix}{key}"
            out[dotted] = value
            out.update(flatten(value, dotted + "."))
    return out


def check_keys(spec: SearchSpec, resolved: dict, config_names: str) -> dict[str, Any]:
    """Every searched key (and every key a `when` names) exists in the resolved base config; returns
    the config's dotted keys and values."""
    keys = flatten(resolved)
    for param in spec.params:
        for key in (param.key, *param.when):
            if key in keys:
                if key == param.key and isinstance(keys[key], dict) and keys[key]:
                    raise ConfigError(f"{spec.source}: params.{key} is a section of {config_names}, not a value; "
                                      f"search one of its keys ({', '.join(sorted(keys[key])[:6])})")
                continue
            near = difflib.get_close_matches(key, list(keys), n=3, cutoff=0.5)
            parent = key.rsplit(".", 1)[0]
            near += [k for k in keys if k.startswith(parent + ".") and k.count(".") == key.count(".") and k not in near][:5]
            hint = f"; nearest keys: {', '.join(near[:6])}" if near else ""
            raise ConfigError(f"{spec.source}: {key!r} is not a key of {config_names}{hint} "
                              "(keys as `mmtune fit --print_config` shows them)")
    return keys


def set_dotted(config: dict, key: str, value: Any) -> None:
    """Sets `a.b.c` in a nested dict, creating the sections on the way."""
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def cli_value(value: Any) -> str:
    """A value as a command-line override: YAML that reads back as the same value (a float such as
    1e-05 reads back as a string in YAML 1.1 without a dot in the mantissa)."""
    if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    if isinstance(value, float):
        text = repr(value)
        if "e" in text and "." not in text.split("e")[0]:
            mantissa, exponent = text.split("e")
            text = f"{mantissa}.0e{exponent}"
        return text
    return str(value)
