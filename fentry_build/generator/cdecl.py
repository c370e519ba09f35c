"""generator/cdecl.py - C declarations of DWARF types: a function's exact prototype, a variable's type.

new-patch writes the replacement's prototype with it (typedef names kept, as the program
spells them); the prototype check (protocheck.py) writes the program's types with
typedefs resolved (CanonicalTypeWriter), so that the check needs no header the patch
does not include.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from elftools.dwarf.die import DIE

from fentry_build.binary.dwarf import attribute, die_name, origin_chain

REPLACEMENT_SUFFIX = "_fixed"

QUALIFIERS = {
    "DW_TAG_const_type": "const",
    "DW_TAG_volatile_type": "volatile",
    "DW_TAG_restrict_type": "restrict",
    "DW_TAG_atomic_type": "_Atomic",
}
TAG_KEYWORDS = {
    "DW_TAG_structure_type": "struct",
    "DW_TAG_union_type": "union",
    "DW_TAG_enumeration_type": "enum",
}
NAMED_TYPE_TAGS = frozenset({"DW_TAG_typedef", *TAG_KEYWORDS})

# GCC's DWARF names of base types, spelled as C programs usually spell them (or must).
BASE_TYPE_SPELLINGS = {
    "short int": "short",
    "short unsigned int": "unsigned short",
    "long int": "long",
    "long unsigned int": "unsigned long",
    "long long int": "long long",
    "long long unsigned int": "unsigned long long",
    "__int128 unsigned": "unsigned __int128",
    "complex float": "_Complex float",
    "complex double": "_Complex double",
    "complex long double": "_Complex long double",
}


# ---- C declarators from DWARF types -----------------------------------------------------------


class CTypeWriter:
    """Writes C declarations of DWARF types, inside out as C's declarator syntax demands.

    Every typedef, struct, union and enum it names is remembered in `named` (in the order
    first met), and in `complete` when the declaration needs its whole definition (used
    by value, not through a pointer), so that the skeleton can include or repeat them.
    """

    def __init__(self) -> None:
        self.named: dict[int, DIE] = {}
        self.complete: set[int] = set()
        self.builtin_includes: dict[str, list[str]] = {}  # header -> types (va_list)

    def declare(self, t: DIE | None, inner: str = "", *, by_value: bool = True) -> str:
        """`inner` (a name, or more declarator around one) declared with type `t` (None: void)."""
        if t is None:
            return _join("void", inner)
        tag = t.tag
        if tag in QUALIFIERS:
            quals, target = _qualifiers(t)
            if target is not None and target.tag == "DW_TAG_pointer_type":
                return self.declare(target, _join(quals, inner), by_value=by_value)  # char *const p
            return quals + " " + self.declare(target, inner, by_value=by_value)     # const char *p
        if tag == "DW_TAG_pointer_type":
            target = type_of(t)
            if target is not None and die_name(target) == VA_LIST_TAG:
                # A va_list parameter: the array type decayed to a pointer to its element.
                self.builtin_includes.setdefault("<stdarg.h>", ["va_list"])
                return _join("va_list", inner)
            inner = "*" + inner
            if target is not None and target.tag in ("DW_TAG_array_type", "DW_TAG_subroutine_type"):
                inner = f"({inner})"
            return self.declare(target, inner, by_value=False)
        if tag == "DW_TAG_array_type":
            return self.declare(type_of(t), inner + "".join(_dimensions(t)), by_value=by_value)
        if tag == "DW_TAG_subroutine_type":
            return self.declare(type_of(t), f"{inner}({self.parameter_types(t)})", by_value=False)
        return _join(self._name(t, by_value), inner)

    def _name(self, t: DIE, by_value: bool) -> str:
        tag, name = t.tag, die_name(t)
        if tag == "DW_TAG_base_type":
            return BASE_TYPE_SPELLINGS.get(name or "", name or "int")
        if tag == "DW_TAG_unspecified_type":
            return "void"
        if tag in NAMED_TYPE_TAGS and name:
            self.named.setdefault(t.offset, t)
            if by_value:
                self.complete.add(t.offset)
            return name if tag == "DW_TAG_typedef" else f"{TAG_KEYWORDS[tag]} {name}"
        if tag in TAG_KEYWORDS:
            return f"void /* an anonymous {TAG_KEYWORDS[tag]}: name it in the program */"
        return f"void /* {tag} */"

    def parameter_types(self, t: DIE) -> str:
        """The parameter list of a function type or function, types only: `int, const char *`."""
        params = parameters(t)
        types = [self.declare(type_of(p)) for p in params.dies]
        if params.variadic:
            types.append("...")
        return ", ".join(types) if types else ("void" if params.prototyped else "")

    def record_definition(self, t: DIE) -> str:
        """`struct X { ... };` from the DWARF of a struct or union (members, bit-fields)."""
        return f"{self._record_body(t, 0)};"

    def _record_body(self, t: DIE, depth: int) -> str:
        keyword = TAG_KEYWORDS[str(t.tag)]
        name = die_name(t)
        pad = "\t" * (depth + 1)
        lines = []
        for m in t.iter_children():
            if m.tag != "DW_TAG_member":
                continue
            mtype = type_of(m)
            mname = die_name(m) or ""
            if mtype is not None and mtype.tag in TAG_KEYWORDS and not die_name(mtype):
                decl = _join(self._record_body(mtype, depth + 1), mname)  # anonymous member
            else:
                decl = self.declare(mtype, mname)
            bits = m.attributes.get("DW_AT_bit_size")
            lines.append(f"{pad}{decl}{f' : {bits.value}' if bits is not None else ''};")
        head = f"{keyword} {name}" if name else keyword
        return head + " {\n" + "\n".join(lines) + "\n" + "\t" * depth + "}"


VA_LIST_TAG = "__va_list_tag"
QUALIFIER_ORDER = ("const", "volatile", "restrict", "_Atomic")


def _qualifiers(t: DIE) -> tuple[str, DIE | None]:
    """The run of qualifiers starting at t, in the usual order, and the type they qualify."""
    found: set[str] = set()
    target: DIE | None = t
    while target is not None and target.tag in QUALIFIERS:
        found.add(QUALIFIERS[target.tag])
        target = type_of(target)
    return " ".join(q for q in QUALIFIER_ORDER if q in found), target


def _join(base: str, inner: str) -> str:
    if not inner:
        return base
    return base + inner if inner.startswith("[") else f"{base} {inner}"


def type_of(die: DIE) -> DIE | None:
    """The DIE that die's DW_AT_type names (None: void), through its origin chain."""
    for d in origin_chain(die):
        if "DW_AT_type" in d.attributes:
            return d.get_DIE_from_attribute("DW_AT_type")
    return None


def _dimensions(array: DIE) -> Iterator[str]:
    for sub in array.iter_children():
        if sub.tag != "DW_TAG_subrange_type":
            continue
        count = sub.attributes.get("DW_AT_count")
        upper = sub.attributes.get("DW_AT_upper_bound")
        if count is not None and isinstance(count.value, int):
            yield f"[{count.value}]"
        elif upper is not None and isinstance(upper.value, int):
            yield f"[{upper.value + 1}]"
        else:
            yield "[]"


@dataclass
class Parameters:
    dies: list[DIE] = field(default_factory=list)
    variadic: bool = False
    prototyped: bool = False


def parameters(die: DIE) -> Parameters:
    """The formal parameters of a function or function type: the first DIE of its origin
    chain that lists them (a concrete body, its abstract instance, its declaration)."""
    found = Parameters(prototyped=bool(attribute(die, "DW_AT_prototyped")))
    for d in origin_chain(die):
        children = list(d.iter_children())
        dies = [c for c in children if c.tag == "DW_TAG_formal_parameter"]
        variadic = any(c.tag == "DW_TAG_unspecified_parameters" for c in children)
        if dies or variadic:
            found.dies, found.variadic = dies, variadic
            return found
    return found


# ---- the prototype --------------------------------------------------------------------------


@dataclass(frozen=True)
class Prototype:
    """F's prototype, ready for the template."""

    function: str
    replacement: str
    signature: str        # the replacement's declarator: `int compute_fixed(int x)`
    pointer_type: str     # `int (*)(int)`, for FENTRY_ORIGINAL
    pointer_decl: str     # `int (*orig)(int)`
    call: str             # `orig(x)`
    returns_void: bool
    variadic: bool


def _parameter_names(params: list[DIE]) -> list[str]:
    names: list[str] = []
    for i, p in enumerate(params, 1):
        name = die_name(p) or f"arg{i}"
        names.append(name if name not in names else f"{name}_{i}")
    return names


def prototype_of(die: DIE, function: str, writer: CTypeWriter) -> Prototype:
    """The prototype of the function whose DW_TAG_subprogram (concrete or abstract) is `die`."""
    params = parameters(die)
    names = _parameter_names(params.dies)
    decls = [writer.declare(type_of(p), n) for p, n in zip(params.dies, names)]
    if params.variadic:
        decls.append("...")
    param_list = ", ".join(decls) if decls else "void"
    types = writer.parameter_types(die) or "void"
    ret = type_of(die)
    replacement = function + REPLACEMENT_SUFFIX
    local = "orig"
    while local in names:
        local += "_"
    return Prototype(
        function=function, replacement=replacement,
        signature=writer.declare(ret, f"{replacement}({param_list})"),
        pointer_type=writer.declare(ret, f"(*)({types})"),
        pointer_decl=writer.declare(ret, f"(*{local})({types})"),
        call=f"{local}({', '.join(names)})",
        returns_void=ret is None, variadic=params.variadic,
    )


class CanonicalTypeWriter(CTypeWriter):
    """CTypeWriter with typedefs resolved to what they name (compatible types by C's rules),
    so a type can be written where the typedef is not declared.  A typedef of an anonymous
    struct, union or enum keeps its name (nothing else can name it); `unspellable` says
    whether a type could not be written at all (an anonymous type used directly)."""

    def __init__(self) -> None:
        super().__init__()
        self.unspellable = False

    def declare(self, t: DIE | None, inner: str = "", *, by_value: bool = True) -> str:
        if t is not None and t.tag == "DW_TAG_typedef":
            target = type_of(t)
            if target is None:
                return _join("void", inner)
            anonymous = target.tag in TAG_KEYWORDS and not die_name(target)
            if not anonymous:
                return self.declare(target, inner, by_value=by_value)
        if t is not None and t.tag == "DW_TAG_pointer_type":
            target = type_of(t)
            if target is not None and die_name(target) == VA_LIST_TAG:
                return _join("__builtin_va_list", inner)
        if t is not None and t.tag in TAG_KEYWORDS and not die_name(t):
            self.unspellable = True
        return super().declare(t, inner, by_value=by_value)


def function_type(die: DIE, writer: CTypeWriter, *, pointer: bool) -> str:
    """The type of the function whose DW_TAG_subprogram is `die`: `int (const char *)`, or
    with `pointer` `int (*)(const char *)`."""
    types = writer.parameter_types(die) or "void"
    return writer.declare(type_of(die), f"(*)({types})" if pointer else f"({types})")


__all__ = ["BASE_TYPE_SPELLINGS", "CTypeWriter", "CanonicalTypeWriter", "NAMED_TYPE_TAGS",
           "Parameters", "Prototype", "QUALIFIERS", "REPLACEMENT_SUFFIX", "TAG_KEYWORDS",
           "VA_LIST_TAG", "function_type", "parameters", "prototype_of", "type_of"]
