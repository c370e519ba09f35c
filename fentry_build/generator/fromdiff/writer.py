"""writer.py - the patch source: the plan's functions with their uses respelled, in a template.

Each carried function is copied byte for byte from the fixed .c file, with these edits
only, each at a position libclang gave:

- a replaced function gets its new name (and `static`);
- a use of the program's function or variable becomes FENTRY_VAR(name);
- a direct call of another replaced function calls the patch's copy by its new name;
- the declaration of a static local that is the program's state goes (FENTRY_REF).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fentry_build import jinja

from fentry_build.generator.fromdiff import refusals
from fentry_build.generator.fromdiff.extract import Piece, UnitSource
from fentry_build.generator.fromdiff.plan import Emitted, PatchPlan, Planner, Unit
from fentry_build.generator.fromdiff.trees import SourceTrees

TEMPLATE = "patch_from_diff.c.j2"
HIDDEN = '__attribute__((visibility("hidden"))) '

Edit = tuple[int, int, str]


def _apply(text: str, base: int, edits: list[Edit]) -> str:
    """`text` (the bytes base.. of a file) with `edits` (file offsets) made."""
    data = text.encode("utf-8", "surrogateescape")
    for start, end, new in sorted(edits, key=lambda e: e[0], reverse=True):
        data = data[:start - base] + new.encode("utf-8", "surrogateescape") + data[end - base:]
    return data.decode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class FunctionText:
    prototype: str
    definition: str


class PatchWriter:
    """Renders a PatchPlan as the text of patches/NAME.c."""

    def __init__(self, planner: Planner, plan: PatchPlan, trees: SourceTrees, patch_dir: Path) -> None:
        self.planner = planner
        self.plan = plan
        self.trees = trees
        self.patch_dir = patch_dir

    # ---- functions -----------------------------------------------------------------------

    def _edits(self, e: Emitted) -> list[Edit]:
        f = e.function
        removed = self.plan.removed_locals.get((e.unit.index, f.name), [])
        edits: list[Edit] = [(s, end, "/* " + e.unit.fixed.text(s, end).replace("*/", "* /")
                              + " (the program's own: FENTRY_REF above) */") for s, end in removed]
        for use in f.needs.uses:
            if not use.in_text or any(s <= use.start < end for s, end in removed):
                continue
            how = self.planner.resolution(e.unit, use.symbol)
            if how == "ref":
                edits.append((use.start, use.end, f"FENTRY_VAR({use.symbol.name})"))
            elif how == "replace":
                target = self.planner._emitted_function(e.unit, use.symbol)
                assert target is not None
                new = target.name if use.call else f"FENTRY_VAR({use.symbol.name})"
                edits.append((use.start, use.end, new))
        if e.replaces is not None:
            edits.append((f.name_start, f.name_start + len(f.name.encode()), e.name))
            if not f.static:
                edits.append((f.start, f.start, "static "))
        elif not f.static:
            edits.append((f.start, f.start, HIDDEN))
        return edits

    def function_text(self, e: Emitted) -> FunctionText:
        f = e.function
        edits = self._edits(e)
        text = e.unit.fixed.text(f.start, f.end)
        definition = _apply(text, f.start, edits)
        head = [ed for ed in edits if ed[0] < f.body_start]
        prototype = _apply(e.unit.fixed.text(f.start, f.body_start), f.start, head).rstrip() + ";"
        return FunctionText(prototype, definition)

    # ---- macros ----------------------------------------------------------------------------

    def _rewrites(self) -> dict[str, str]:
        return {name: f"FENTRY_VAR({name})" for name in self.plan.refs}

    def _macro(self, unit: UnitSource, definition: object) -> str | None:
        """The definition of a macro with the program's names respelled, or None if it names none."""
        rewrites = self._rewrites()
        tokens = list(definition.get_tokens())  # type: ignore[attr-defined]
        if not tokens:
            return None
        start = int(tokens[0].extent.start.offset)
        skip: set[int] = {0}
        if len(tokens) > 1 and tokens[1].spelling == "(" and \
                int(tokens[1].extent.start.offset) == int(tokens[0].extent.end.offset):
            for i, t in enumerate(tokens[1:], 1):  # the parameters are not the program's names
                skip.add(i)
                if t.spelling == ")":
                    break
        params = {tokens[i].spelling for i in skip}
        edits: list[Edit] = [(int(t.extent.start.offset), int(t.extent.end.offset), rewrites[t.spelling])
                             for i, t in enumerate(tokens) if i not in skip
                             and t.spelling in rewrites and t.spelling not in params]
        if not edits:
            return None
        return "#define " + _apply(unit.macro_text(definition), start, edits)

    def _piece_text(self, unit: Unit, piece: Piece) -> str:
        if piece.kind == "macro":
            definition = unit.fixed.macro_definition(piece.name)
            rewritten = self._macro(unit.fixed, definition) if definition is not None else None
            return rewritten or piece.text
        return piece.text

    def overrides(self) -> list[str]:
        """Header macros whose bodies name the program's statics: redefined for the patch."""
        out: list[str] = []
        seen: set[str] = set()
        for e in self.plan.functions:
            for name in e.function.needs.macros:
                definition = e.unit.fixed.macro_definition(name)
                if definition is None or name in seen or \
                        str(definition.location.file.name) == str(e.unit.fixed.path) or \
                        definition.location.is_in_system_header:
                    continue
                seen.add(name)
                text = self._macro(e.unit.fixed, definition)
                if text is not None:
                    out.append(f"#undef {name}\n{text}")
        return out

    # ---- includes ----------------------------------------------------------------------------

    def _header(self, included: Path) -> str | None:
        """How the patch includes a project header of the fixed tree ("../x.h"), or None
        when `included` is not the project's."""
        fixed = self.trees.fixed
        if not included.is_relative_to(fixed):
            return None
        relative = included.relative_to(fixed)
        if self.trees.fixed_on_disk:
            on_disk = fixed / relative
        elif self.trees.same_file(relative):
            on_disk = self.trees.project / relative
        else:
            raise refusals.unsupported(
                f"the fix changes {relative}, which the patch includes, and the project folder "
                "holds the old version", "apply the fix to the sources first (the diff is then "
                "taken in reverse), or pass --fixed-tree with the fixed sources")
        return '"' + os.path.relpath(on_disk, self.patch_dir) + '"'

    def includes(self) -> list[str]:
        lines: list[str] = []
        for u in self.plan.units:
            if not any(e.unit is u for e in self.plan.functions):
                continue
            for piece, included in u.fixed.includes():
                header = self._header(included) if included is not None else None
                line = f"#include {header}" if header is not None else piece.text
                if line not in lines:
                    lines.append(line)
        return lines

    def leading(self) -> list[str]:
        out: list[str] = []
        for u in self.plan.units:
            if not any(e.unit is u for e in self.plan.functions):
                continue
            for piece in u.fixed.leading_macros():
                block = f"#ifndef {piece.name}\n{piece.text}\n#endif"
                if block not in out:
                    out.append(block)
        return out

    # ---- the file ----------------------------------------------------------------------------

    def render(self, *, name: str, program: str, build_id: str, how: str) -> str:
        texts = [(e, self.function_text(e)) for e in self.plan.functions]
        pieces = [(u, p, self._piece_text(u, p)) for u, p in self.plan.pieces]
        return jinja.environment().get_template(TEMPLATE).render(
            name=name, program=program, build_id=build_id, how=how,
            leading=self.leading(), includes=self.includes(), overrides=self.overrides(),
            declarations=[(u.file_name, t) for u, p, t in pieces if p.kind != "variable"],
            variables=[(u.file_name, t) for u, p, t in pieces if p.kind == "variable"],
            refs=sorted(self.plan.refs.values(), key=lambda r: (r.file is None, r.file or "", r.name)),
            functions=texts, replaced=self.plan.replaced(),
            carried=[e for e in self.plan.functions if e.replaces is None],
            notes=self.plan.notes,
        )
