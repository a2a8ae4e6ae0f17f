"""Plug-in points: what a config can name without an edit of this package.

An environment's config names what builds it with `_target_` (a class or a function, by
import path, as Hydra's `instantiate` takes it) and its own keys, which are that target's
parameters: the schema of an environment is its signature. `seed` is the run's seed (passed
when the target takes it) and `name` a label every environment has. The built-in
environments (conf/env/*.yaml) go the same way as a user's:

    # my_conf/env/qa.yaml, used as: python -m runner --config-dir my_conf env=qa
    _target_: envs.dataset.DatasetEnv
    path: data/qa.jsonl
    reward_funcs: [my_rewards.exact_match]

Installed packages can offer environments under the entry-point group `runner.envs`
(`name = "pkg.module:EnvClass"`); `env=name` then finds them with no YAML at all.

Shapers and clusterers are functions named the same way (`shaper._target_`,
`shaper.cluster`); the built-in ones are in runner.algo.shapers and runner.algo.clustering.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

ENTRY_POINT_GROUP = "runner.envs"
# what the runner passes itself, never a config key
RUNNER_SUPPLIED = ("seed",)

_REQUIRED = object()


class PluginError(ValueError):
    """A config that names a plug-in badly. `str()` is one line naming the key."""


def import_object(path: Any, key: str) -> Any:
    """The object at `pkg.module.attr` (or `pkg.module:attr`), or a PluginError naming `key`."""
    from hydra.utils import get_object

    if not isinstance(path, str) or not path.strip():
        raise PluginError(f"{key}={path!r}: expected an import path like package.module.name")
    try:
        return get_object(path.replace(":", "."))
    except Exception as e:  # ImportError, AttributeError, or the module's own error at import
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1] if lines else type(e).__name__  # Hydra's last line names the cause
        raise PluginError(f"{key}={path!r}: cannot be imported ({why})") from None


@dataclass(frozen=True)
class Param:
    name: str
    type: Any  # the annotation, resolved; Any where there is none
    default: Any  # _REQUIRED where the target has no default

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def parameters(target: Callable) -> tuple[dict[str, Param], bool]:
    """({name: Param}, accepts_any_key): a class's (or dataclass's) constructor parameters,
    or a function's. accepts_any_key: the target takes **kwargs."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else fn)
    except Exception:  # an annotation that does not resolve: treat all as untyped
        hints = {}
    sig = inspect.signature(target)
    factories = {f.name: f.default_factory for f in dataclasses.fields(target)
                 if f.default_factory is not dataclasses.MISSING} if dataclasses.is_dataclass(target) else {}
    params: dict[str, Param] = {}
    any_key = False
    for p in sig.parameters.values():
        if p.kind is p.VAR_KEYWORD:
            any_key = True
            continue
        if p.kind is p.VAR_POSITIONAL:
            continue
        default = _REQUIRED if p.default is p.empty else p.default
        if p.name in factories:  # a dataclass field's default_factory (its signature shows <factory>)
            default = factories[p.name]()
        params[p.name] = Param(p.name, hints.get(p.name, Any), default)
    return params, any_key


# ---------------------------------------------------------------------------------------
# environments


def default_env_name(target: Any, params: Optional[dict] = None) -> str:
    """An environment's name where its YAML sets none: the target's own `name` default, else
    the class or function name in lower case."""
    params = parameters(target)[0] if params is None else params
    d = params.get("name")
    return d.default if d is not None and not d.required else getattr(target, "__name__", "env").lower()


def default_shaper_name(name: str, target: Optional[str]) -> str:
    """A user's shaper (`shaper._target_`) is named after its function, not after the built-in
    whose YAML it extends (`divisor`), unless its YAML names it otherwise."""
    builtin = ("none", "bonus", "divisor")
    return target.rsplit(".", 1)[-1].rsplit(":", 1)[-1] if target and name in builtin else name


def env_settings(node: Any, coerce: Callable[[str, Any, Any], Any]) -> Any:
    """The validated `env` group: a dataclass with `_target_`, `name` and the target's own
    keys (typed by its annotations via `coerce(key, value, type)`), defaults filled in."""
    if not isinstance(node, dict):
        raise PluginError(f"env={node!r}: expected a group of keys with _target_ (e.g. env=even_dice)")
    node = dict(node)
    path = node.pop("_target_", None)
    if path is None:
        raise PluginError("env._target_: missing; an environment's config names the class or function that "
                          "builds it, e.g. _target_: envs.dice.DiceEnv (see README, Write your own environment)")
    target = import_object(path, "env._target_")
    if not callable(target):
        raise PluginError(f"env._target_={path!r}: is not a class or function")
    params, any_key = parameters(target)
    own = [n for n in params if n not in RUNNER_SUPPLIED]
    allowed = ["name"] + [n for n in own if n != "name"]
    for k in node:
        if k in RUNNER_SUPPLIED:
            raise PluginError(f"env.{k}: set by the runner (the top-level `{k}`), not in env")
        if k not in allowed and not any_key:
            raise PluginError(f"env.{k}: unknown key; allowed keys in env ({path}): {', '.join(allowed)}")
    name = node.pop("name", None)
    if name is None:
        name = default_env_name(target, params)
    if not isinstance(name, str) or not name:
        raise PluginError(f"env.name={name!r}: expected a non-empty string")
    values: dict[str, Any] = {}
    for n in own:
        if n == "name":
            continue
        p = params[n]
        if n in node and not (p.required and node[n] is None):  # null in a YAML = not set yet
            values[n] = coerce(f"env.{n}", node.pop(n), p.type)
        elif p.required:
            raise PluginError(f"env.{n}: required by {path} and not set")
        else:
            values[n] = p.default
    extra = dict(node)  # only where the target takes **kwargs
    check = getattr(target, "check_config", None)
    if callable(check):
        try:
            check({**values, **extra})
        except ValueError as e:
            raise PluginError(f"env.{str(e).splitlines()[0]}") from None
    fields = [("_target_", Any, dataclasses.field(default=path)), ("name", Any, dataclasses.field(default=name))]
    fields += [(k, Any, dataclasses.field(default_factory=lambda v=v: v)) for k, v in {**values, **extra}.items()]
    cls = dataclasses.make_dataclass(f"{getattr(target, '__name__', 'Env')}Settings", fields)
    return cls()


def env_target(settings: Any) -> Callable:
    return import_object(settings._target_, "env._target_")


def is_multi_turn(settings: Any) -> bool:
    """Multi-turn environments answer between turns (`new_game`)."""
    return hasattr(env_target(settings), "new_game")


def build_env(settings: Any, seed: int = 0):
    """The environment, built by Hydra's `instantiate` from its validated settings."""
    from hydra.utils import instantiate

    target = env_target(settings)
    params, _ = parameters(target)
    kw = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
    if "name" not in params:
        kw.pop("name")
    if "seed" in params:
        kw["seed"] = seed
    env = instantiate(kw, _convert_="all")
    if getattr(env, "name", None) is None or "name" not in params:
        try:
            env.name = settings.name
        except AttributeError:  # a frozen or slotted object: its own name stands
            pass
    return env


def register_entry_points() -> list[str]:
    """Offer every installed `runner.envs` entry point as `env=<name>`: a Hydra ConfigStore
    node holding its `_target_` and its parameters' defaults (so `env.key=value` overrides
    them as with a YAML); a YAML of the same name in a config dir wins."""
    import logging
    from importlib.metadata import entry_points

    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    names = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        path = ep.value.replace(":", ".")
        node: dict[str, Any] = {"_target_": path, "name": ep.name}
        try:
            params, _ = parameters(ep.load())
            for p in params.values():
                if p.name not in RUNNER_SUPPLIED and p.name != "name":
                    node[p.name] = None if p.required else _plain(p.default)
        except Exception as e:  # a broken plug-in must not stop every other run; validation names it
            logging.getLogger(__name__).warning("entry point %s = %s: %s", ep.name, ep.value, e)
        cs.store(group="env", name=ep.name, node=node, provider=getattr(ep.dist, "name", None) or "entry point")
        names.append(ep.name)
    return names


def _plain(value: Any) -> Any:
    """A default as YAML can hold it (else null: the target's own default applies)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return None


# ---------------------------------------------------------------------------------------
# shapers and clusterers


def shaper_function(target: Optional[str], name: str) -> Callable:
    """The shaper `(rewards, keys, groups) -> shaped`: `shaper._target_` where set, else the
    built-in of that name."""
    return import_object(target or f"runner.algo.shapers.{name}", "shaper._target_" if target else "shaper.name")


def clusterer_function(kind: str) -> Callable:
    """The clusterer `(keys, completions, groups, threshold) -> cluster keys`: a built-in by
    name (exact, normalized, embedding) or a function by import path."""
    from runner.algo import clustering

    if kind in clustering.CLUSTERERS:
        return getattr(clustering, f"cluster_{kind}")
    if "." not in kind:
        raise PluginError(f"shaper.cluster={kind!r}: must be one of {', '.join(clustering.CLUSTERERS)} "
                          f"or an import path to a function (keys, completions, groups, threshold) -> keys")
    return import_object(kind, "shaper.cluster")
