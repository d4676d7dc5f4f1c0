"""Strategies by name: the one registry the builder, the planner and the runtime look them up in."""

from __future__ import annotations

from typing import Any

from hetserve.core.registry import Registry
from hetserve.strategies.base import Deployment
from hetserve.strategies.cronus import CronusDeployment
from hetserve.strategies.dp import DPDeployment
from hetserve.strategies.hetis import HetisDeployment
from hetserve.strategies.pd import PDDeployment
from hetserve.strategies.pp import PPDeployment

# values are Deployment subclasses, called with (plans, link_between, params, **strategy-specific objects)
STRATEGIES: Registry[Any] = Registry("strategy")
for _cls in (DPDeployment, PPDeployment, PDDeployment, CronusDeployment, HetisDeployment):
    STRATEGIES.register(_cls.strategy)(_cls)  # type: ignore[arg-type]  # Registry types zero-arg factories

__all__ = ["STRATEGIES", "Deployment"]
