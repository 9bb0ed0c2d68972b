"""The check ``clq.load`` runs on a saved graph file before torch.export's reader sees it.

What loading trusts: the installed torch and clq_compile, the ops they register, and the
pytree types registered with torch. It does not trust the folder: whoever can write it
can also recompute every digest in ``clq.json``. torch.export's JSON reader treats some
of the file's strings as code: it hands each symbolic shape (``expr_str``) to
``sympy.sympify``, which evaluates it; it executes ``guards_code`` as Python when the
graph becomes a module; FX pastes node, argument and input names into the Python source
it generates and runs; a node's ``target`` names the function the graph calls; and the
keys of the pytree specs end up in the generated guard code. So every string in the file
is checked, before the reader sees it, against an allow-list rule for its field:

- symbolic expressions: sympy's printed form only, i.e. calls of the sympy and torch
  functions torch writes (``Symbol``, ``Integer``, ``Mul``, ``FloorDiv``, ...), symbol
  names such as ``s47``, numbers, ``+ - * // %`` and assumption keywords
  (``positive=True``); no attribute access, no other name, no ``__``;
- guards: comparisons and arithmetic on ``L['name'].size()[i]``, the builtins and the
  ``math``/``torch`` functions torch's printer writes (``max``, ``math.trunc``,
  ``torch.sym_float``), ``**`` only by a small number;
- node, argument and input names: Python identifiers; attribute paths: dotted names;
- op targets: ``torch.ops.<namespace>.<op>.<overload>`` resolving to a registered op, or
  one of the symbolic-integer operators torch writes;
- pytree specs: JSON whose type names and keys are dotted names;
- device types, string constants and node metadata: plain text (no quotes where torch
  pastes it into code), or JSON.

A string under a field with no rule is refused, and so is JSON nested deeper than
Python's parser allows. A refusal is a ``LoadError`` naming the file, the field and the
rule; nothing from the file has been evaluated by then.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._export.serde.serialize as serde

from clq_compile.errors import LoadError

Rule = Callable[[str], "str | None"]  # None when the string passes, else why it does not

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_NUMBER = re.compile(r"[-+]?[0-9]+(?:\.[0-9]*)?(?:e[-+]?[0-9]+)?")
_PLAIN = re.compile(r"[^'\"\\\x00-\x1f\x7f]*")  # one line; no quotes, no backslashes
_LINE = re.compile(r"[^\x00-\x1f\x7f]*")
_TEXT = re.compile(r"[^\x00-\x08\x0b-\x1f\x7f]*")  # lines
_OP = re.compile(r"torch\.ops(?:\.[A-Za-z_][A-Za-z0-9_]*){2,3}")
MAX_EXPR = 10_000  # characters; torch's longest for a DiT is a few hundred

# sympy's printed form: the functions torch.export's reader puts in sympify's namespace
# (GraphModuleDeserializer.deserialize) and the sympy classes srepr writes.
SYMPY_FUNCTIONS = frozenset("""
    FloorDiv ModularIndexing Where PythonMod Mod CleanDiv CeilToInt FloorToInt CeilDiv
    LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv
    IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal
    ToFloat Identity
    Symbol Integer Rational Float Add Mul Max Min Abs floor ceiling Equality Unequality
    StrictLessThan StrictGreaterThan LessThan GreaterThan And Or Not
""".split())
_SYMPY_CONSTANTS = frozenset({"true", "false", "oo", "zoo", "nan", "int_oo"})
_ASSUMPTIONS = frozenset("""
    positive negative nonnegative nonpositive integer real finite infinite zero nonzero
    even odd rational commutative extended_real extended_positive extended_negative
    extended_nonnegative extended_nonpositive precision
""".split())
_SYMPY_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Load, ast.Add, ast.Sub,
                ast.Mult, ast.FloorDiv, ast.Mod, ast.USub, ast.UAdd)
_SYMPY_CHARS = re.compile(r"[A-Za-z0-9_ (),=+\-*/%.']*")

# guards: what torch's PythonPrinter writes for export's input guards
_GUARD_CALLS = frozenset({"max", "min", "abs", "round", "int", "float"})
_GUARD_NAMES = _GUARD_CALLS | {"L", "math", "torch"}
_GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})
_GUARD_MODULES = {
    "math": frozenset("""floor ceil trunc sqrt isnan inf nan cos cosh acos sin sinh asin tan
                         tanh atan log2""".split()),
    "torch": frozenset("sym_float sym_int _sym_sqrt sym_max sym_min sym_ite sym_not".split()),
}
MAX_EXPONENT = 64  # ``x ** c`` only for a number c up to this (no 9 ** 9 ** 9)
_GUARD_NODES = (ast.Expression, ast.Compare, ast.BoolOp, ast.BinOp, ast.UnaryOp, ast.IfExp,
                ast.Subscript, ast.Load, ast.And, ast.Or, ast.Not, ast.USub, ast.UAdd,
                ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod, ast.Div, ast.Pow, ast.Eq,
                ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_GUARD_CHARS = re.compile(r"[A-Za-z0-9_ ()\[\]',=<>!+\-*/%.]*")

# the symbolic-integer operators torch serializes by module and name
_SYM_TARGETS = frozenset(f"{op.__module__}.{op.__name__}"
                         for op in getattr(serde, "_SYM_OPS", ()))


def _match(pattern: re.Pattern[str], what: str) -> Rule:
    return lambda s: None if pattern.fullmatch(s) else f"is not {what}"


def _ident(s: str) -> str | None:
    ok = _IDENT.fullmatch(s) and not keyword.iskeyword(s)
    return None if ok else "is not a Python identifier"


def _dotted(s: str) -> str | None:
    return None if s == "" or _DOTTED.fullmatch(s) else "is not a dotted attribute path"


def _parse(s: str, chars: re.Pattern[str]) -> ast.AST | str:
    if len(s) > MAX_EXPR:
        return f"is longer than {MAX_EXPR} characters"
    if not chars.fullmatch(s) or "__" in s:
        return "holds characters outside the grammar"
    try:
        return ast.parse(s, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return "does not parse as an expression"


def _sympy_node(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        ok = isinstance(node.func, ast.Name) and node.func.id in SYMPY_FUNCTIONS
        return None if ok else "calls something other than a sympy function torch writes"
    if isinstance(node, ast.Name):
        ok = (node.id in SYMPY_FUNCTIONS or node.id in _SYMPY_CONSTANTS
              or _SYMBOL.fullmatch(node.id))
        return None if ok else f"names {node.id!r}"
    if isinstance(node, ast.keyword):
        ok = (node.arg in _ASSUMPTIONS and isinstance(node.value, ast.Constant)
              and type(node.value.value) in (bool, int))
        return None if ok else f"passes keyword {node.arg!r}"
    if isinstance(node, ast.Constant):
        v = node.value
        ok = (type(v) in (bool, int, float)
              or isinstance(v, str) and bool(_SYMBOL.fullmatch(v) or _NUMBER.fullmatch(v)))
        return None if ok else f"holds the constant {v!r}"
    return None if isinstance(node, _SYMPY_NODES) else f"uses {type(node).__name__}"


def _check(s: str, chars: re.Pattern[str],
           rule: Callable[[ast.AST], str | None]) -> str | None:
    """Why ``s`` fails: a character outside ``chars``, no parse, or the first node of its
    tree that ``rule`` refuses (None if every node passes)."""
    tree = _parse(s, chars)
    if isinstance(tree, str):
        return tree
    return next(filter(None, map(rule, ast.walk(tree))), None)


def check_sympy(s: str) -> str | None:
    """Why ``s`` is not a symbolic expression in the form torch writes (None if it is)."""
    return _check(s, _SYMPY_CHARS, _sympy_node)


def _guard_node(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return None if node.id in _GUARD_NAMES else f"names {node.id!r}"
    if isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id in _GUARD_MODULES:
            ok = node.attr in _GUARD_MODULES[node.value.id]
        else:
            ok = node.attr in _GUARD_METHODS
        return None if ok else f"reads attribute {node.attr!r}"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        c = node.right
        ok = (isinstance(c, ast.Constant) and type(c.value) in (int, float)
              and abs(c.value) <= MAX_EXPONENT)
        return None if ok else f"raises to a power other than a number up to {MAX_EXPONENT}"
    if isinstance(node, ast.Call):
        ok = not node.keywords and (isinstance(node.func, ast.Attribute) or (
            isinstance(node.func, ast.Name) and node.func.id in _GUARD_CALLS))
        return None if ok else "calls something other than a size or max/min"
    if isinstance(node, ast.Constant):
        v = node.value
        ok = type(v) in (bool, int, float) or isinstance(v, str) and bool(_IDENT.fullmatch(v))
        return None if ok else f"holds the constant {v!r}"
    return None if isinstance(node, _GUARD_NODES) else f"uses {type(node).__name__}"


def check_guard(s: str) -> str | None:
    """Why ``s`` is not an input guard in the form torch writes (None if it is)."""
    return _check(s, _GUARD_CHARS, _guard_node)


def check_target(s: str) -> str | None:
    """Why ``s`` does not name a registered op or a symbolic-integer operator."""
    if s in _SYM_TARGETS:
        return None
    if not _OP.fullmatch(s) or "__" in s:
        return "is not a torch op (torch.ops.<namespace>.<op>.<overload>)"
    obj: Any = torch.ops
    try:
        for part in s.split(".")[2:]:
            obj = getattr(obj, part)
    except (AttributeError, RuntimeError):
        return "names no registered op"
    ok = isinstance(obj, torch._ops.OpOverload | torch._ops.HigherOrderOperator)
    return None if ok else "names no registered op overload"


def _loads(s: str | bytes) -> tuple[Any, str | None]:
    """(document, None), or (None, why not): bad JSON, or nesting beyond the parser's
    depth."""
    try:
        return json.loads(s), None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        return None, f"is not JSON ({type(e).__name__})"


def _json(s: str) -> str | None:
    return _loads(s)[1]


def check_treespec(s: str) -> str | None:
    """Why ``s`` is not a serialized pytree spec with dotted type names and keys."""
    doc, why = _loads(s)
    if why:
        return why
    if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], int)):
        return "is not a [protocol, spec] pair"
    nodes = [doc[1]]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict) or set(node) - {"type", "context", "children_spec"}:
            return "holds a node that is not {type, context, children_spec}"
        context = node.get("context")
        if context is not None and not isinstance(context, str):
            return "holds a context that is not JSON text"
        context, why = _loads(context) if context is not None else (None, None)
        names = [node.get("type"), *_strings(context)]
        if why or any(n is not None and (not isinstance(n, str) or _dotted(n))
                      for n in names):
            return "holds a type name or key that is not a dotted name"
        children = node.get("children_spec", [])
        if not isinstance(children, list):
            return "holds children_spec that is not a list"
        nodes.extend(children)
    return None


def _strings(doc: Any) -> Iterator[Any]:
    """Every string in a JSON document, keys included (iteratively)."""
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            yield v


_STRING_FIELDS: dict[str, Rule] = {
    "expr_str": check_sympy, "guards_code": check_guard,
    "target": check_target, "as_operator": check_target,
    "in_spec": check_treespec, "out_spec": check_treespec,
    "name": _ident, "as_name": _ident, "forward_arg_names": _ident,
    "user_input_name": _ident, "field_names": _ident, "verifiers": _ident, "type": _ident,
    "parameter_name": _dotted, "buffer_name": _dotted, "tensor_constant_name": _dotted,
    "fqn": _dotted,
    "as_string": _match(_PLAIN, "plain text"), "as_strings": _match(_PLAIN, "plain text"),
    "torch_version": _match(_PLAIN, "plain text"),
}
# maps whose keys are data (checked by the rule) rather than field names
_KEYED: dict[str, Rule] = {
    "tensor_values": _ident, "sym_int_values": _ident, "sym_bool_values": _ident,
    "sym_float_values": _ident, "custom_obj_values": _ident, "opset_version": _ident,
    "as_string_to_argument": _ident, "treespec_namedtuple_fields": _dotted,
    "range_constraints": _match(_SYMBOL, "a symbol name"),
}
_METADATA: dict[str, Rule] = {
    "stack_trace": _match(_TEXT, "text"), "nn_module_stack": _match(_LINE, "one line"),
    "source_fn_stack": _match(_LINE, "one line"), "torch_fn": _match(_LINE, "one line"),
    "custom": _json, "from_node": _json,
}


def _show(s: str) -> str:
    return repr(s if len(s) <= 80 else s[:80] + "...")


def _children(d: dict[str, Any], path: str, field: str | None
              ) -> Iterator[tuple[Any, str, str | None, Rule | None]]:
    keys = _METADATA if field == "metadata" else None
    for k, v in d.items():
        if keys is not None:
            rule = keys.get(k)
            if rule is None:
                raise _Refused(f"{path}[{_show(k)}]", "is not a metadata key torch writes")
            yield v, f"{path}.{k}", field, rule
        elif field in _KEYED:
            why = _KEYED[field](k)
            if why:
                raise _Refused(f"{path} key {_show(k)}", why)
            yield v, f"{path}[{k!r}]", None, None
        elif _IDENT.fullmatch(k):
            yield v, f"{path}.{k}" if path else k, k, None
        else:
            raise _Refused(f"{path} key {_show(k)}", "is not a field name")


class _Refused(Exception):
    def __init__(self, field: str, why: str) -> None:
        super().__init__(field, why)
        self.field, self.why = field, why


def _walk(doc: Any) -> None:
    seen: dict[tuple[int, str], str | None] = {}  # (rule, string) -> verdict
    stack: list[tuple[Any, str, str | None, Rule | None]] = [(doc, "", None, None)]
    while stack:
        value, path, field, rule = stack.pop()
        if isinstance(value, dict):
            stack.extend(_children(value, path, field))
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", field, rule) for i, v in enumerate(value))
        elif isinstance(value, str):
            rule = rule or _STRING_FIELDS.get(field or "")
            if rule is None:
                raise _Refused(path, "is a string where torch.export writes none")
            key = (id(rule), value)
            if key not in seen:
                seen[key] = rule(value)
            if seen[key]:
                raise _Refused(f"{path} = {_show(value)}", seen[key])


def check_graph(data: bytes, where: str) -> None:
    """Raise ``LoadError`` naming the field unless every string in the torch.export JSON
    ``data`` (the file ``where``) passes the rule for its field (see the module doc)."""
    doc, why = _loads(data)
    if why:
        raise LoadError(f"{where} {why}: the file is corrupt; save the model again")
    try:
        _walk(doc)
    except _Refused as r:
        raise LoadError(
            f"{where}: field {r.field} {r.why}, so it is not what torch.export writes; "
            "the file was altered after it was saved and is not loaded (nothing in it was "
            "run); save the model again") from None
