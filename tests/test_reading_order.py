"""The README's reading order tells the truth: in its first pass a file imports only files of the rows
above it (the op table alone also reaches the second pass), and every file it names exists."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reading_tables():
    """The README's two reading tables as lists of rows, each row the module names of its files."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Reading minitensor to learn backprop"):text.index("Then follow one whole")]
    tables, rows = [], None
    for line in section.splitlines():
        if line.startswith("| file |"):
            rows = []
            tables.append(rows)
        elif line.startswith("| `") and rows is not None:
            cell = line.split("|")[1]
            names = re.findall(r"`([^`]+)`", cell)
            folder = os.path.dirname(names[0])
            paths = [names[0]] + [os.path.join(folder, name) for name in names[1:]]
            rows.append([path[:-3].replace("/", ".").removesuffix(".__init__") for path in paths])
    return tables


def imports_of(module):
    """The minitensor and unet modules that ``module``'s file imports, resolved to dotted names."""
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    if not os.path.exists(path):
        path = os.path.join(ROOT, *module.split("."), "__init__.py")
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            name = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            if node.module:                   # "from .. import backend" names backend, not the package
                found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)    # from pkg import module
    known = {m for table in reading_tables() for row in table for m in row}
    return {name for name in found if name in known or name in ("minitensor", "minitensor.layers")}


def test_every_file_of_the_reading_order_exists():
    for table in reading_tables():
        for row in table:
            for module in row:
                assert os.path.exists(os.path.join(ROOT, *module.split(".")) + ".py") or \
                    os.path.exists(os.path.join(ROOT, *module.split("."), "__init__.py")), module


def test_the_first_pass_imports_only_what_is_above_it():
    first, second = reading_tables()
    fast = {module for row in second for module in row}
    table_row = next(row for row in first if "minitensor.kernels.table" in row)
    above = set()
    for row in first:
        allowed = above | set(row) | (fast if row is table_row else set())
        for module in row:
            # a unet file may use minitensor's public API: everything of the first pass is above it
            extra = {"minitensor", "minitensor.layers"} if module.startswith("unet.") else set()
            outside = imports_of(module) - allowed - extra
            assert not outside, f"{module} imports {sorted(outside)}, which the README lists below it"
        above |= set(row)
        layers = {m for r in first for m in r if m.startswith("minitensor.layers.")}
        if layers <= above:
            above.add("minitensor.layers")        # the package, once every layer file is above
