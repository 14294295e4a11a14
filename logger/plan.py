"""Which parameters form which logged layer, and how each layer's per-example gradient is observed.

A *layer* is a set of trainable parameters reported as one row of the store. Modules with a rule (``nn.Linear``,
``nn.Conv2d``, ...) contribute their calls; modules without one contribute their *own* parameters (``cls_token``,
layer-scale ``gamma``, a custom norm's ``weight``), observed op by op by :class:`~gradcoh.logger.uses.UseTracker`
while their children keep their own rules and rows. Parameters shared by several modules (tied input and output
embeddings) make those modules one layer, named after the first of them, whose per-example gradient is the sum over
all uses, cross terms included.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from .layers import LayerRules, Rule


@dataclass
class Source:
    """A module whose rule gives per-example gradients of some of a layer's parameters.

    Attributes:
        name: Qualified module name.
        module: The module.
        rule: Its rule.
        params: The parameters the rule covers, in the rule's order (the module's own, or its subtree's).
    """

    name: str
    module: nn.Module
    rule: Rule
    params: list[nn.Parameter]


@dataclass
class LayerPlan:
    """One logged layer.

    Attributes:
        name: The layer's name in the store (the first module's qualified name; ``"root"`` for the model itself).
        params: Its trainable parameters, in ``model.named_parameters()`` order.
        param_names: Their qualified names (the first name of a tied parameter).
        sources: Modules whose rules cover some of the parameters.
        loose: Modules whose own parameters are observed op by op (no rule), by name.
        loose_modules: The same modules.
        types: Type names of the modules involved.
    """

    name: str
    params: list[nn.Parameter] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    loose: list[str] = field(default_factory=list)
    loose_modules: list[nn.Module] = field(default_factory=list)
    types: list[str] = field(default_factory=list)

    @property
    def rule_names(self) -> list[str]:
        """The rules used, by name (``"uses"`` for parameters observed op by op)."""
        names = [getattr(s.rule, "__name__", type(s.rule).__name__) for s in self.sources]
        return list(dict.fromkeys(names + (["uses"] if self.loose else [])))


def plan_layers(model: nn.Module, rules: LayerRules, select: tuple[str, ...] = (), fallback: bool = True) -> list[
        LayerPlan]:
    """The layers of ``model``: every trainable parameter in exactly one layer (unless ``select`` leaves it out).

    Args:
        model: The model.
        rules: The layer rules.
        select: Layer names, glob patterns or module type names (empty: every layer).
        fallback: Observe modules without a rule op by op; False raises for them instead.

    Raises:
        ValueError: A module without a rule when ``fallback`` is False.
    """
    order = {id(p): (i, name) for i, (name, p) in enumerate(model.named_parameters())}
    layers = _merge(_units(model, rules, fallback))
    for plan in layers:
        plan.params.sort(key=lambda p: order[id(p)][0])
        plan.param_names = [order[id(p)][1] for p in plan.params]
    out = [plan for plan in layers if not select or any(
        _selected(name, t, select) for name, t in zip([s.name for s in plan.sources] + plan.loose, plan.types,
                                                        strict=True))]
    out.sort(key=lambda plan: order[id(plan.params[0])][0])
    if not out:
        raise ValueError("the model has no trainable parameters to log (or layers=... selected none)")
    return out


_Unit = tuple[str, nn.Module, Rule | None, list[nn.Parameter]]


def _units(model: nn.Module, rules: LayerRules, fallback: bool) -> list[_Unit]:
    """Every module with trainable parameters it is responsible for: its own, or its subtree's for subtree rules."""
    units: list[_Unit] = []
    covered: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in covered):
            continue
        rule = rules.lookup(module)
        subtree = rule is not None and rules.owns_subtree(module)
        if subtree:
            covered.append(f"{name}." if name else "")
        params = [p for p in module.parameters(recurse=subtree) if p.requires_grad]
        if not params:
            continue
        qualified = name or "root"
        if rule is None and not fallback:
            raise ValueError(
                f"module '{qualified}' ({type(module).__name__}) has parameters but no layer rule; register one "
                "with LayerRules.register, exclude it with layers=..., or pass fallback=True"
            )
        units.append((qualified, module, rule, params))
    return units


def _merge(units: list[_Unit]) -> list[LayerPlan]:
    """Units sharing a parameter form one layer (union-find on parameter ids), named after the first."""
    parent = list(range(len(units)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_unit: dict[int, int] = {}
    for i, (_, _, _, params) in enumerate(units):
        for p in params:
            parent[find(i)] = find(first_unit.setdefault(id(p), i))
    layers: dict[int, LayerPlan] = {}
    for i, (name, module, rule, params) in enumerate(units):
        plan = layers.setdefault(find(i), LayerPlan(name))
        if rule is not None:
            plan.sources.append(Source(name, module, rule, params))
        else:
            plan.loose.append(name)
            plan.loose_modules.append(module)
        plan.types.append(type(module).__name__)
        known = {id(p) for p in plan.params}
        plan.params += [p for p in params if id(p) not in known]
    return list(layers.values())


def _selected(name: str, type_name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or type_name == p for p in patterns)
