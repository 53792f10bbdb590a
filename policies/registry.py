"""Policy registry: name -> policy class, filled by the `register` decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from joulecap.policies.base import Policy
from joulecap.runtime.errors import InvalidRequest

_REGISTRY: dict[str, type[Policy]] = {}
_INSTANCES: dict[str, Policy] = {}

P = TypeVar("P", bound=type[Policy])


def register(name: str) -> Callable[[P], P]:
    """Class decorator: make a policy available under `name`."""

    def deco(cls: P) -> P:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"policy {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_policies() -> list[str]:
    """Registered policy names, sorted."""
    return sorted(_REGISTRY)


def get_policy(name: str) -> type[Policy]:
    """The policy class registered as `name`.

    Raises:
        InvalidRequest: No such policy (the message lists the available ones).

    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise InvalidRequest(
            f"Unknown policy {name!r}; available: {', '.join(available_policies())}.", param="policy"
        ) from None


def policy_instance(name: str) -> Policy:
    """A shared (stateless) instance of the policy `name`."""
    inst = _INSTANCES.get(name)
    if inst is None:
        inst = _INSTANCES[name] = get_policy(name)()
    return inst
