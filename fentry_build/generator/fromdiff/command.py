"""command.py - patch-from-diff: the fix as a source change in, a readable live patch source out.

    fentry-build patch-from-diff NAME (--diff FILE | --fixed-tree DIR) --binary BIN
        [--project DIR] [--build-dir DIR]

1. the two source trees (trees), the running binary's units and their compile lines
   (units, compile_db);
2. each unit that includes a file the fix changes is compiled in both trees with one
   section per function, and the objects compared (objdiff);
3. the changed units are parsed with libclang in both trees (extract);
4. the plan (plan) and the patch source (writer), written to patches/NAME.c and added to
   the project's patch list as new-patch does (patchlist);
5. the generator's own checks run on it (fentry_build.gen), so what it prints is what the
   build will say.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fentry_build.generator import main as gen
from fentry_build.binary.program import Program
from fentry_build.errors import FentryError
from fentry_build.generator.inline import CopyFinder
from fentry_build.generator.newpatch import PATCH_NAME
from fentry_build.generator.scan import PatchCompile
from fentry_build.build import patchlist
from fentry_build.generator import compile_db
from fentry_build.generator.compile_db import CompileEntry, CompileLine, PathMover
from fentry_build.generator.fromdiff import trees, units
from fentry_build.generator.fromdiff.extract import UnitSource
from fentry_build.generator.fromdiff.objdiff import diff_objects
from fentry_build.generator.fromdiff.plan import Planner, Unit
from fentry_build.generator.fromdiff.writer import PatchWriter


@dataclass
class Result:
    path: Path
    replaced: list[str]
    carried: list[str]
    refs: list[str]
    registration: patchlist.Registration  # the patch list it was added to, the commands
    notes: list[str] = field(default_factory=list)

    @property
    def build_file(self) -> Path:  # meson.build or SConstruct
        return self.registration.build_file

    @property
    def registered(self) -> bool:  # the entry was added to it
        return self.registration.updated


class UnitCompiler:
    """Compiles one unit in both trees (objects and dependency lists) in a work folder."""

    def __init__(self, source_trees: trees.SourceTrees, keep: Sequence[Path], work: Path) -> None:
        self.trees = source_trees
        self.movers = {
            "original": PathMover(source_trees.project, source_trees.original, keep),
            "fixed": PathMover(source_trees.project, source_trees.fixed, keep),
        }
        self.work = work
        self._builtin: dict[str, Path] = {}

    def line(self, entry: CompileEntry, side: str) -> CompileLine:
        return CompileLine(entry, self.movers[side])

    def _stem(self, entry: CompileEntry, side: str) -> Path:
        relative = entry.file.relative_to(self.trees.project) if entry.file.is_relative_to(
            self.trees.project) else Path(entry.file.name)
        return self.work / side / str(relative).replace("/", "__")

    def changed_inputs(self, entry: CompileEntry) -> list[Path]:
        """The files of the project (relative) this unit reads that differ between the trees."""
        changed: set[Path] = set()
        for side in ("original", "fixed"):
            mover = self.movers[side]
            depfile = self._stem(entry, side).with_suffix(".d")
            depfile.parent.mkdir(parents=True, exist_ok=True)
            compile_db.run_compiler(self.line(entry, side).depend_command(depfile), entry.directory,
                                    f"preprocessing {entry.file.name} ({side} sources)")
            for dep in compile_db.dependencies(depfile, entry.directory):
                project_path = mover.back(dep)
                if project_path.is_relative_to(self.trees.project):
                    relative = project_path.relative_to(self.trees.project)
                    if not self.trees.same_file(relative):
                        changed.add(relative)
        return sorted(changed)

    def objects(self, entry: CompileEntry) -> tuple[Path, Path]:
        out = []
        for side in ("original", "fixed"):
            obj = self._stem(entry, side).with_suffix(".o")
            compile_db.run_compiler(self.line(entry, side).object_command(obj), entry.directory,
                                    f"compiling {entry.file.name} ({side} sources)")
            out.append(obj)
        return out[0], out[1]

    def parse(self, entry: CompileEntry, side: str) -> UnitSource:
        compiler = entry.compiler
        if compiler not in self._builtin:
            self._builtin[compiler] = compile_db.builtin_include(compiler)
        line = self.line(entry, side)
        return UnitSource(line.source, line.clang_arguments(self._builtin[compiler]))


def _check_name(name: str, project: Path) -> Path:
    if not PATCH_NAME.fullmatch(name):
        raise FentryError(f"{name!r} is not a usable patch name (letters, digits, _ and -; it "
                          "names patches/NAME.c and build/NAME.so); pick another")
    if not project.is_dir():
        raise FentryError(f"{project}: no such directory; pass --project the project's top folder")
    path = project / "patches" / f"{name}.c"
    if path.exists():
        raise FentryError(f"{path} already exists; patch-from-diff never overwrites a patch: pick "
                          "another name or remove it")
    return path


def _generator_findings(binary: Path, patch: Path, unit: CompileEntry, patch_dir: Path) -> list[str]:
    """The generator's warnings on the draft `patch` (errors raise): what `meson compile` will
    print.  The draft is compiled with the line of a unit it comes from, its includes
    (relative to patches/) found from `patch_dir` where the patch will be."""
    line = CompileLine(unit, PathMover(unit.directory, unit.directory)).options()
    compile = PatchCompile(unit.compiler, (*line, f"-iquote{patch_dir}"), unit.directory,
                           str(patch), f"the compile line of {unit.file.name}")
    warnings: list[str] = []
    gen.generate(binary, patch, warnings.append, compile=compile)
    return warnings


def patch_from_diff(name: str, binary: Path, *, diff: Path | None = None,
                    fixed_tree: Path | None = None, project: Path = Path("."),
                    build_dir: Path | None = None) -> Result:
    """Write project/patches/NAME.c, the live patch of `binary` that the fix makes, and add it
    to the project's meson.build; FentryError (one line) for what stops it, a Refusal for
    what a live patch cannot do."""
    if (diff is None) == (fixed_tree is None):
        raise FentryError("pass either --diff FILE or --fixed-tree DIR")
    project = project.resolve()
    path = _check_name(name, project)
    patchlist.check_new_name(project, name)
    with Program.open(binary) as program:  # read once: symbols, build-id, DWARF
        info = program.info
        build_id = gen.check_build_id(info)
        db = compile_db.find_database(build_dir, binary)
        entries = units.binary_entries(program, compile_db.load(db))
        keep = [db.parent.resolve()]
        with tempfile.TemporaryDirectory(prefix="fentry-fromdiff-") as tmp:
            work = Path(tmp)
            if diff is not None:
                source_trees = trees.from_diff(project, diff, work, keep)
            else:
                assert fixed_tree is not None
                source_trees = trees.from_fixed_tree(project, fixed_tree)
            compiler = UnitCompiler(source_trees, keep, work)
            changed_units: list[Unit] = []
            first_unit: CompileEntry | None = None
            headers: set[Path] = set()
            for entry in entries:
                if not entry.file.is_relative_to(project):
                    continue
                inputs = compiler.changed_inputs(entry)
                if not inputs:
                    continue
                headers |= {p for p in inputs if p.suffix != ".c"}
                unit_diff = diff_objects(*compiler.objects(entry))
                if not unit_diff.any:
                    continue
                first_unit = first_unit or entry
                changed_units.append(Unit(len(changed_units), entry.file.relative_to(project), unit_diff,
                                          compiler.parse(entry, "fixed"), compiler.parse(entry, "original")))
            if not changed_units or first_unit is None:
                raise FentryError(f"the fix changes no code of {binary.name} (no function or variable of "
                                  "its units compiles differently); nothing to patch")
            planner = Planner(info, CopyFinder(info, program.dwarf), changed_units, sorted(headers))
            plan = planner.run()
            writer = PatchWriter(planner, plan, source_trees, path.parent)
            text = writer.render(name=name, program=program.name, build_id=build_id.hex(),
                                 how=source_trees.how)
            draft = work / f"{name}.c"
            draft.write_text(text, encoding="utf-8")
            # Its includes are relative to patches/, which must exist for "../x.h" to resolve.
            made = not path.parent.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                notes = list(plan.notes) + _generator_findings(binary, draft, first_unit, path.parent)
            except BaseException:
                if made:
                    path.parent.rmdir()
                raise
    with open(path, "x", encoding="utf-8") as out:
        out.write(text)
    registration = patchlist.register(project, name, binary)
    return Result(path, [f"{e.function.name} ({e.unit.file_name})" for e in plan.replaced()],
                  [e.function.name for e in plan.functions if e.replaces is None],
                  sorted(plan.refs), registration, notes)


def format_result(result: Result) -> str:
    lines = [f"wrote {result.path}: replaces {', '.join(result.replaced)}"]
    if result.carried:
        lines.append(f"  carries its own {', '.join(result.carried)}")
    if result.refs:
        lines.append(f"  references the program's {', '.join(result.refs)}")
    lines += result.registration.entry_lines()
    lines += [f"note: {n}" for n in result.notes]
    lines += ["", *(f"  {c}" for c in result.registration.commands)]
    return "\n".join(lines)
