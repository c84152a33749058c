"""The code base's shape: no import cycle between sdtool's modules, and no module or function that has
grown past what can be read in one sitting (about 400 lines a module; 80 lines and 8 parameters a
function). The few exceptions are listed here with their reason."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sdtool"

MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80
MAX_PARAMS = 8

# Modules allowed to be longer, and why.
LONG_MODULES = {
    # Copied into every deployment bundle as one file that needs only numpy and onnxruntime.
    "sdtool/runtime.py",
}
# Functions allowed more parameters, and why.
MANY_PARAMS = {
    # Registered model builders: their parameters are the model's recorded arguments (model.spec).
    ("sdtool/models/resnet.py", "build_resnet"),
    # The loss's hyperparameters, each defaulting to the recipe's sd section.
    ("sdtool/losses.py", "__init__"),
    # The pruning pass: model, input, options, ratio, taylor's batches and loss, and three precomputed
    # inputs the target search reuses across probes (keyword-only).
    ("sdtool/pruner.py", "prune_once"),
    # `sdtool prune` as a library call: the command's options as given (checkpoint, out, options, --eval, --data,
    # --set, --device), plus the keyword-only switches allow_other_data and progress.
    ("sdtool/prune.py", "prune_checkpoint"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _is_typer_command(fn: ast.FunctionDef) -> bool:
    """A CLI command declares one parameter per option (Typer's model): exempt from the parameter limit."""
    return any(
        isinstance(a.annotation, ast.Subscript) and getattr(a.annotation.value, "id", "") == "Annotated"
        for a in fn.args.args
    ) or any(getattr(a.annotation, "id", "").endswith("Opt") for a in fn.args.args)


def _top_level_imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """sdtool modules imported when `name` is imported (function-level and TYPE_CHECKING imports excluded)."""
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            out |= set(subs) if subs else {base}  # `from pkg import submodule` imports the submodule
    return {m for m in out if m in modules and m != name}


def test_no_import_cycle():
    modules = _modules()
    graph = {n: _top_level_imports(p, n, modules) for n, p in modules.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(path[path.index(v) :] + [v])
            elif v not in state:
                visit(v, path + [v])
        state[u] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    assert not cycles, f"import cycles: {cycles}"


def test_modules_stay_readable():
    long = {
        str(p.relative_to(ROOT.parent)): n
        for p in ROOT.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert set(long) <= LONG_MODULES, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_functions_stay_readable():
    too_long, too_many = [], []
    for p in ROOT.rglob("*.py"):
        rel = str(p.relative_to(ROOT.parent))
        for fn in ast.walk(ast.parse(p.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = fn.end_lineno - fn.lineno + 1
            a = fn.args
            params = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
            if lines > MAX_FUNCTION_LINES:
                too_long.append((rel, fn.name, lines))
            if len(params) > MAX_PARAMS and not _is_typer_command(fn) and (rel, fn.name) not in MANY_PARAMS:
                too_many.append((rel, fn.name, len(params)))
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"
    assert not too_many, f"functions over {MAX_PARAMS} parameters: {too_many}"
