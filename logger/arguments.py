"""A call's arguments: the tensors among them, and the arguments by the names of the op's signature.

Hooks see a call as ``(args, kwargs)``. Tensors are looked for one level deep and inside lists/tuples (``torch.cat``'s
``tensors``), which is where ops and modules take them; :func:`bind` names every argument as the op's signature
does, so that handlers read ``bound["weight"]`` instead of assuming a position.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch

KEYWORD = -1
"""The position :func:`tensor_args` gives a tensor passed by keyword or inside a list/tuple."""


def tensor_args(args: tuple, kwargs: dict) -> list[tuple[int, torch.Tensor]]:
    """``(position in args, tensor)`` of every tensor argument (:data:`KEYWORD` for keyword or nested ones)."""
    out = []
    for pos, value in [*enumerate(args), *((KEYWORD, v) for v in kwargs.values())]:
        if isinstance(value, torch.Tensor):
            out.append((pos, value))
        elif isinstance(value, list | tuple):
            out += [(KEYWORD, v) for v in value if isinstance(v, torch.Tensor)]
    return out


def tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors among a call's arguments (see :func:`tensor_args`)."""
    return [t for _, t in tensor_args(args, kwargs)]


def map_tensors(args: tuple, kwargs: dict, fn: Callable[[torch.Tensor], Any]) -> tuple[tuple, dict]:
    """``fn`` applied to every tensor argument (one level deep, and inside lists/tuples)."""
    def one(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return fn(value)
        if isinstance(value, list | tuple):
            items = [fn(v) if isinstance(v, torch.Tensor) else v for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)  # namedtuples too
        return value

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


# Ops implemented in C, which have no Python signature: their parameters as the documentation names them.
_BUILTIN = {
    "linear": "input, weight, bias=None",
    "addmm": "input, mat1, mat2, *, beta=1, alpha=1",
    "matmul": "input, other",
    "__matmul__": "input, other",
    **{f"conv{d}d": "input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1" for d in (1, 2, 3)},
}


@functools.cache
def _builtin_signature(spec: str) -> inspect.Signature:
    params = []
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    for item in spec.split(", "):
        if item == "*":
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        name, _, default = item.partition("=")
        value = inspect.Parameter.empty if not default else (None if default == "None" else int(default))
        params.append(inspect.Parameter(name, kind, default=value))
    return inspect.Signature(params)


def signature(name: str, func: Callable) -> inspect.Signature | None:
    """The signature of op ``func`` (called ``name``), or None when it has none gradcoh knows.

    Read once per function: :func:`inspect.signature` of a Python function costs 20–150 µs (45 Python calls), and
    every parameter use is bound once per step (EfficientNet: 49 ``F.batch_norm`` uses). Unhashable callables are
    read every time.
    """
    if name in _BUILTIN:
        return _builtin_signature(_BUILTIN[name])
    try:
        hash(func)
    except TypeError:
        return _inspected.__wrapped__(func)
    return _inspected(func)


@functools.lru_cache(maxsize=512)
def _inspected(func: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def bind(name: str, func: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """Every argument of a call of op ``func`` by its parameter name, defaults included (None: unknown signature)."""
    sig = signature(name, func)
    if sig is None:
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def op_name(func: Callable) -> str:
    """The name of an op as the layout rules know it (``linear``, ``__add__``, ``T`` for the property ``.T``)."""
    name = getattr(func, "__name__", str(func))
    if name == "__get__":  # properties such as .T / .mT
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def bind_op(func: Callable | None, args: Sequence, kwargs: dict) -> dict[str, Any] | None:
    """The op's arguments by name, positional or keyword alike, or None when its signature is not known.

    Python functions (``F.normalize``, ``F.softmax``) are bound through :func:`inspect.signature`; torch's builtins
    (``torch.diff``, ``Tensor.sum``) through their ATen schemas, choosing the overload whose positional arguments
    fit (tensor where the schema takes a tensor). The first argument is named ``input`` either way.
    """
    if func is None:
        return None
    names = _python_names(func)
    if names is None:
        kinds = tuple("t" if torch.is_tensor(a) else "n" if a is None else "o" for a in args)
        names = _schema_names(getattr(func, "__name__", ""), kinds, frozenset(kwargs))
    if names is None or len(args) > len(names):
        return None
    bound = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        bound["input" if key == "self" else key] = value
    return bound


@functools.lru_cache(maxsize=512)
def _python_names(func: Callable) -> tuple[str, ...] | None:
    if not isinstance(func, types.FunctionType):
        return None
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


@functools.lru_cache(maxsize=2048)
def _schema_names(name: str, kinds: tuple[str, ...], keys: frozenset[str]) -> tuple[str, ...] | None:
    name = name.rstrip("_") if name.endswith("_") and not name.startswith("__") else name
    if not name or name.startswith("__"):
        return None
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    except RuntimeError:
        return None
    for schema in schemas:
        pos = [a for a in schema.arguments if not a.kwarg_only]
        if len(pos) < len(kinds) or not keys <= {a.name for a in schema.arguments} | {"input"}:
            continue
        if all(kind == "n" or (kind == "t") == str(a.type).startswith(("Tensor", "Optional[Tensor]"))
               for kind, a in zip(kinds, pos, strict=False)):
            return tuple("input" if a.name == "self" else a.name for a in pos)
    return None
