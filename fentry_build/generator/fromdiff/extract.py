"""extract.py - a translation unit read with libclang: its functions' source and what each needs.

The unit is parsed with its own compile line (include paths, macros, language) and a
detailed preprocessing record, so macro definitions and expansions are cursors too.
For each function definition of the main file this module gives its text and byte
range, and every name it uses: functions and variables of the program (with whether the
use is a direct call), the function's static locals, the types and enumerators it
names, and the macros it expands.  Nothing here decides what the patch does with them
(plan.py does); nothing here reads C text by hand: every position comes from libclang.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import clang.cindex as ci  # type: ignore[import-untyped]

from fentry_build.errors import FentryError

K = ci.CursorKind
TYPE_DECLS = frozenset({K.STRUCT_DECL, K.UNION_DECL, K.ENUM_DECL, K.TYPEDEF_DECL})
WRAPPERS = frozenset({K.UNEXPOSED_EXPR, K.PAREN_EXPR})

Cursor = Any  # clang.cindex.Cursor: the bindings carry no types


@dataclass(frozen=True)
class Symbol:
    """A function or variable a piece of code uses, as the unit declares it."""

    name: str
    kind: str             # "function", "variable", "static local"
    static: bool          # internal linkage (static at file scope, or a static local)
    system: bool          # declared in a system header
    defined_here: bool    # the unit defines it (in its main file)
    type: str             # its type as C spells it: `int (const char *)`, `long [4]`
    const: bool           # a read-only variable
    owner: str | None = None  # the function of a static local

    @property
    def key(self) -> str:
        return f"{self.owner}/{self.name}" if self.owner else self.name


@dataclass(frozen=True)
class Use:
    """One use of a Symbol in a function: where its name is, and how it is used."""

    symbol: Symbol
    start: int            # byte offsets of the name in the main file
    end: int
    call: bool            # the callee of a direct call
    in_text: bool         # False: the name comes from a macro's expansion


@dataclass(frozen=True)
class Piece:
    """A top-level declaration of the main file: a type, a variable, a macro, an include."""

    kind: str             # "type", "variable", "macro", "include", "function"
    name: str
    start: int
    end: int
    text: str


@dataclass
class Needs:
    """What a piece of code uses besides itself."""

    uses: list[Use] = field(default_factory=list)
    types: dict[str, Cursor] = field(default_factory=dict)    # by USR: type declarations
    macros: dict[str, Cursor] = field(default_factory=dict)   # by name: macro definitions
    static_locals: list[tuple[Symbol, int, int]] = field(default_factory=list)  # decl stmt range


@dataclass
class FunctionSource:
    """A function definition of the main file."""

    name: str
    static: bool
    type: str
    start: int
    end: int
    body_start: int
    name_start: int
    cursor: Cursor
    needs: Needs


def _offset(location: Any) -> int:
    return int(location.offset)


def _file_of(cursor: Cursor) -> str | None:
    f = cursor.location.file
    return str(f.name) if f is not None else None


def _is_const(t: Any) -> bool:
    while t.kind == ci.TypeKind.CONSTANTARRAY or t.kind == ci.TypeKind.INCOMPLETEARRAY:
        t = t.element_type
    return bool(t.is_const_qualified())


class UnitSource:
    """One translation unit parsed by libclang."""

    def __init__(self, path: Path, args: Sequence[str]) -> None:
        self.path = path
        index = ci.Index.create()
        options = (ci.TranslationUnit.PARSE_DETAILED_PROCESSING_RECORD
                   | ci.TranslationUnit.PARSE_INCOMPLETE)
        try:
            self.tu = index.parse(str(path), args=list(args), options=options)
        except ci.TranslationUnitLoadError as e:
            raise FentryError(f"libclang cannot parse {path}: {e}") from None
        errors = [d for d in self.tu.diagnostics if d.severity >= ci.Diagnostic.Error]
        if errors:
            d = errors[0]
            where = f"{d.location.file}:{d.location.line}" if d.location.file else str(path)
            raise FentryError(f"libclang cannot parse {path.name} as gcc compiles it: {where}: "
                              f"{d.spelling}")
        self.data = path.read_bytes()
        self._main = str(self.tu.spelling)
        self.functions: dict[str, FunctionSource] = {}
        self.pieces: list[Piece] = []
        self._top: list[Cursor] = []
        self._macro_defs: dict[str, list[Cursor]] = {}
        self._instantiations: list[Cursor] = []
        self._read_top_level()

    # ---- the main file's top level -----------------------------------------------------------

    def text(self, start: int, end: int) -> str:
        return self.data[start:end].decode("utf-8", "surrogateescape")

    def in_main(self, cursor: Cursor) -> bool:
        return _file_of(cursor) == self._main

    def _read_top_level(self) -> None:
        for c in self.tu.cursor.get_children():
            if c.kind == K.MACRO_DEFINITION:
                self._macro_defs.setdefault(c.spelling, []).append(c)
            if not self.in_main(c):
                continue
            start, end = _offset(c.extent.start), _offset(c.extent.end)
            if c.kind == K.MACRO_INSTANTIATION:
                self._instantiations.append(c)
            elif c.kind == K.MACRO_DEFINITION:
                self.pieces.append(Piece("macro", c.spelling, start, end,
                                         "#define " + self.text(start, end)))
            elif c.kind == K.INCLUSION_DIRECTIVE:
                self.pieces.append(Piece("include", c.spelling, start, end, self.text(start, end)))
            else:
                self._top.append(c)
                if c.kind == K.FUNCTION_DECL and c.is_definition():
                    self.functions[c.spelling] = self._function(c)

    def includes(self) -> list[tuple[Piece, Path | None]]:
        """The main file's #include lines, each with the file it included."""
        found = []
        for c in self.tu.cursor.get_children():
            if c.kind == K.INCLUSION_DIRECTIVE and self.in_main(c):
                start, end = _offset(c.extent.start), _offset(c.extent.end)
                included = c.get_included_file()
                found.append((Piece("include", c.spelling, start, end, self.text(start, end)),
                              Path(included.name) if included is not None else None))
        return found

    def leading_macros(self) -> list[Piece]:
        """Macros the main file defines before its first #include (feature test macros)."""
        first = min((p.start for p in self.pieces if p.kind == "include"), default=len(self.data))
        return [p for p in self.pieces if p.kind == "macro" and p.start < first]

    def declaration_of(self, cursor: Cursor) -> Piece | None:
        """The whole top-level declaration of the main file holding `cursor` (a type or a
        variable): `typedef struct x {...} x_t;` is one piece with its struct."""
        at = _offset(cursor.extent.start)
        group = [c for c in self._top if _offset(c.extent.start) <= at < _offset(c.extent.end)]
        if not group:
            return None
        start = min(_offset(c.extent.start) for c in group)
        end = max(_offset(c.extent.end) for c in group)
        changed = True
        while changed:  # declarations sharing text (a typedef and its struct) are one
            changed = False
            for c in self._top:
                s, e = _offset(c.extent.start), _offset(c.extent.end)
                if s < end and e > start and (s < start or e > end):
                    start, end, changed = min(s, start), max(e, end), True
        text = self.text(start, end)
        kind = "type" if cursor.kind in TYPE_DECLS else "variable"
        return Piece(kind, cursor.spelling, start, end, text if text.rstrip().endswith(";") else text + ";")

    def macro_definition(self, name: str, before: int | None = None) -> Cursor | None:
        """The definition of macro `name` in effect (the last one, or the last before `before`
        in the main file)."""
        defs = self._macro_defs.get(name, [])
        if before is not None:
            defs = [d for d in defs if not self.in_main(d) or _offset(d.extent.start) < before]
        return defs[-1] if defs else None

    def macro_text(self, definition: Cursor) -> str:
        """`NAME(args) body` of a macro definition, from its file."""
        f = definition.location.file
        data = self.data if str(f.name) == self._main else Path(f.name).read_bytes()
        return data[_offset(definition.extent.start):_offset(definition.extent.end)].decode(
            "utf-8", "surrogateescape")

    def macro_tokens(self, definition: Cursor) -> list[str]:
        return [t.spelling for t in definition.get_tokens()]

    def variable(self, name: str) -> Cursor | None:
        """The file-scope variable `name` of the main file (its definition when it has one)."""
        found = [c for c in self._top if c.kind == K.VAR_DECL and c.spelling == name]
        defs = [c for c in found if c.is_definition()]
        return (defs or found or [None])[-1]

    # ---- functions ---------------------------------------------------------------------------

    def _function(self, c: Cursor) -> FunctionSource:
        body = next((ch for ch in c.get_children() if ch.kind == K.COMPOUND_STMT), None)
        start, end = _offset(c.extent.start), _offset(c.extent.end)
        return FunctionSource(
            c.spelling, c.storage_class == ci.StorageClass.STATIC, c.type.spelling, start, end,
            _offset(body.extent.start) if body is not None else end, _offset(c.location), c,
            self.needs_of(c, start, end))

    def needs_of(self, root: Cursor, start: int, end: int) -> Needs:
        """What the code of `root` (main-file bytes start..end) uses."""
        needs = Needs()
        callees = self._callees(root)
        for d in root.walk_preorder():
            if d.kind == K.DECL_REF_EXPR and d.referenced is not None:
                self._use(needs, d, callees)
            elif d.kind == K.TYPE_REF and d.referenced is not None:
                self._type(needs, d.referenced)
            elif d.kind == K.VAR_DECL and d is not root and self._is_static_local(d):
                stmt = self._statement_range(root, d)
                symbol = self.symbol(d)
                if symbol is not None and stmt is not None:
                    needs.static_locals.append((symbol, *stmt))
        for m in self._instantiations:
            at = _offset(m.extent.start)
            if start <= at < end and m.referenced is not None:
                needs.macros.setdefault(m.spelling, m.referenced)
        return needs

    @staticmethod
    def _callees(root: Cursor) -> set[int]:
        """Start offsets of the names that are the callee of a direct call."""
        found: set[int] = set()
        for d in root.walk_preorder():
            if d.kind != K.CALL_EXPR:
                continue
            callee = next(iter(d.get_children()), None)
            while callee is not None and callee.kind in WRAPPERS:
                callee = next(iter(callee.get_children()), None)
            if callee is not None and callee.kind == K.DECL_REF_EXPR:
                found.add(_offset(callee.extent.start))
        return found

    def _use(self, needs: Needs, d: Cursor, callees: set[int]) -> None:
        ref = d.referenced
        if ref.kind == K.ENUM_CONSTANT_DECL:
            self._type(needs, ref.semantic_parent)
            return
        symbol = self.symbol(ref)
        if symbol is None:
            return
        start, end = _offset(d.extent.start), _offset(d.extent.end)
        in_text = self.in_main(d) and self.data[start:end] == symbol.name.encode()
        needs.uses.append(Use(symbol, start, end, start in callees, in_text))

    def _type(self, needs: Needs, decl: Cursor) -> None:
        if decl is None or decl.kind not in TYPE_DECLS:
            return
        definition = decl.get_definition() or decl
        needs.types.setdefault(definition.get_usr() or definition.spelling, definition)

    @staticmethod
    def _is_static_local(d: Cursor) -> bool:
        parent = d.semantic_parent
        return (d.storage_class == ci.StorageClass.STATIC and parent is not None
                and parent.kind == K.FUNCTION_DECL)

    @staticmethod
    def _statement_range(root: Cursor, var: Cursor) -> tuple[int, int] | None:
        for d in root.walk_preorder():
            if d.kind == K.DECL_STMT and any(ch == var for ch in d.get_children()):
                return _offset(d.extent.start), _offset(d.extent.end)
        return None

    def symbol(self, ref: Cursor) -> Symbol | None:
        """The function or variable `ref` declares, if it has static storage; None for locals,
        parameters and anything else."""
        system = bool(ref.location.is_in_system_header) or ref.location.file is None
        if ref.kind == K.FUNCTION_DECL:
            definition = ref.get_definition()
            static = any(r.storage_class == ci.StorageClass.STATIC for r in self._redeclarations(ref))
            return Symbol(ref.spelling, "function", static, system,
                          definition is not None and self.in_main(definition), ref.type.spelling, True)
        if ref.kind != K.VAR_DECL:
            return None
        parent = ref.semantic_parent
        if parent is not None and parent.kind == K.TRANSLATION_UNIT:
            definition = ref.get_definition()
            static = ref.storage_class == ci.StorageClass.STATIC
            return Symbol(ref.spelling, "variable", static, system,
                          definition is not None and self.in_main(definition) or static,
                          ref.type.spelling, _is_const(ref.type))
        if self._is_static_local(ref):
            return Symbol(ref.spelling, "static local", True, False, True, ref.type.spelling,
                          _is_const(ref.type), owner=parent.spelling)
        return None

    def _redeclarations(self, ref: Cursor) -> Iterator[Cursor]:
        yield ref
        definition = ref.get_definition()
        if definition is not None:
            yield definition
        for c in self._top:
            if c.kind == K.FUNCTION_DECL and c.spelling == ref.spelling:
                yield c

    # ---- types -------------------------------------------------------------------------------

    def type_file(self, decl: Cursor) -> tuple[Path | None, bool]:
        """The file declaring a type (None: built in) and whether it is a system header."""
        f = decl.location.file
        if f is None:
            return None, True
        return Path(f.name), bool(decl.location.is_in_system_header)

    def type_needs(self, decl: Cursor) -> Needs:
        """What a type declaration of the main file uses (other types, macros)."""
        piece = self.declaration_of(decl)
        if piece is None:
            return Needs()
        needs = Needs()
        for c in self._top:
            s = _offset(c.extent.start)
            if piece.start <= s < piece.end:
                for d in c.walk_preorder():
                    if d.kind == K.TYPE_REF and d.referenced is not None:
                        self._type(needs, d.referenced)
                    elif d.kind == K.DECL_REF_EXPR and d.referenced is not None:
                        self._use(needs, d, set())
        for m in self._instantiations:
            at = _offset(m.extent.start)
            if piece.start <= at < piece.end and m.referenced is not None:
                needs.macros.setdefault(m.spelling, m.referenced)
        return needs

    def declaration_needs(self, ref: Cursor) -> Needs:
        """The types a declaration's type names (a FENTRY_REF's type must be spelled)."""
        needs = Needs()
        for d in ref.walk_preorder():
            if d.kind == K.TYPE_REF and d.referenced is not None:
                self._type(needs, d.referenced)
            if d.kind == K.COMPOUND_STMT:
                break
        return needs

    def cursor_of(self, symbol: Symbol) -> Cursor | None:
        """The declaration of a file-scope symbol in this unit (its definition if here)."""
        for c in self.tu.cursor.get_children():
            if c.spelling == symbol.name and c.kind in (K.FUNCTION_DECL, K.VAR_DECL):
                d = c.get_definition()
                if d is not None:
                    return d
        for c in self.tu.cursor.get_children():
            if c.spelling == symbol.name and c.kind in (K.FUNCTION_DECL, K.VAR_DECL):
                return c
        return None


# ---- types of two versions of a unit -----------------------------------------------------------


def _fields(decl: Cursor) -> list[tuple[str, str, int]]:
    t = decl.type
    return [(f.spelling, f.type.spelling, int(t.get_offset(f.spelling)))
            for f in decl.get_children() if f.kind == K.FIELD_DECL]


def type_layouts(unit: UnitSource) -> dict[str, tuple[str, str, Cursor]]:
    """Each named struct, union, enum and typedef the unit's project files define:
    name -> (kind, a description of its layout, the declaration)."""
    found: dict[str, tuple[str, str, Cursor]] = {}
    for c in unit.tu.cursor.get_children():
        if c.location.file is None or c.location.is_in_system_header or not c.spelling:
            continue
        if c.kind in (K.STRUCT_DECL, K.UNION_DECL) and c.is_definition():
            kind = "struct" if c.kind == K.STRUCT_DECL else "union"
            layout = f"size {c.type.get_size()}; " + "; ".join(
                f"{n} {t} @{o}" for n, t, o in _fields(c))
            found[f"{kind} {c.spelling}"] = (kind, layout, c)
        elif c.kind == K.ENUM_DECL and c.is_definition():
            layout = ", ".join(f"{e.spelling}={e.enum_value}" for e in c.get_children())
            found[f"enum {c.spelling}"] = ("enum", layout, c)
        elif c.kind == K.TYPEDEF_DECL:
            found[f"typedef {c.spelling}"] = ("typedef", c.underlying_typedef_type.get_canonical().spelling, c)
    return found


def names_in(cursor: Cursor) -> set[str]:
    """The type names (`struct x`, `typedef t`, `enum e`) a function's code or a declaration uses."""
    found: set[str] = set()
    for d in cursor.walk_preorder():
        if d.kind == K.TYPE_REF and d.referenced is not None:
            r = d.referenced
            prefix = {K.STRUCT_DECL: "struct", K.UNION_DECL: "union", K.ENUM_DECL: "enum",
                      K.TYPEDEF_DECL: "typedef"}.get(r.kind)
            if prefix:
                found.add(f"{prefix} {r.spelling}")
    return found


def top_level_variables(unit: UnitSource) -> list[Cursor]:
    return [c for c in unit.tu.cursor.get_children() if c.kind == K.VAR_DECL and unit.in_main(c)]
