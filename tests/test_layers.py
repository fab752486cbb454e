"""The package's layers: every import of a project module points down (or within its own layer),
and no two modules import each other, directly or round a longer circle. Imports written inside
functions count too: a lazy import is still a dependency."""
import ast
import os

import jaxrl_entropy

PACKAGE = os.path.dirname(jaxrl_entropy.__file__)

# The layer order, lowest first: the one place it is written down. A module may import modules of
# its own layer or of any layer below. The package root's `__init__` (names kept for moved modules)
# belongs to no layer.
LAYERS = [
    ["kernels"],
    ["parallel", "stats", "chips"],
    ["rundir"],
    ["models"],
    ["rl"],
    ["data"],
    ["config", "presets"],
    ["training"],
    ["aot"],
    ["analyze"],
    ["cli"],
]
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, str]:
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), PACKAGE)[:-3].replace(os.sep, ".")
                name = "jaxrl_entropy" + ("" if rel == "__init__" else "." + rel.removesuffix(".__init__"))
                out[name] = os.path.join(folder, f)
    return out


def _imports(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's `__init__` counts as the package)."""
    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's own package
                    pkg = module.split(".")[:len(module.split(".")) - node.level + (path.endswith("__init__.py"))]
                    base = ".".join(pkg + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {resolve(n) for n in names if n.startswith("jaxrl_entropy.")}
        graph[module] = deps - {module, "", "jaxrl_entropy"}
    return graph


def _unit(module: str) -> str:
    return module.split(".")[1]


def test_every_module_belongs_to_a_layer():
    units = {_unit(m) for m in _modules() if m != "jaxrl_entropy"}
    assert units <= set(LEVEL), f"add these to LAYERS in {__file__}: {sorted(units - set(LEVEL))}"


def test_imports_point_down_only():
    upward = []
    for module, deps in _imports(_modules()).items():
        if module == "jaxrl_entropy":
            continue
        for dep in deps:
            if LEVEL[_unit(dep)] > LEVEL[_unit(module)]:
                upward.append(f"{module} imports {dep} ({_unit(dep)} is above {_unit(module)})")
    assert not upward, "imports that point up:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = _imports(_modules())
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_an_upward_import_and_a_circle(tmp_path, monkeypatch):
    # the checker itself, on a made-up package: rl importing training is upward; a <-> b is a circle
    pkg = tmp_path / "jaxrl_entropy"
    for rel, text in {"__init__.py": "", "rl/__init__.py": "", "training/__init__.py": "",
                      "rl/loss.py": "from jaxrl_entropy.training import trainer\n",
                      "training/trainer.py": "def f():\n    from jaxrl_entropy.training import rollout\n",
                      "training/rollout.py": "from jaxrl_entropy.training.trainer import f\n"}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    monkeypatch.setattr(__import__(__name__), "PACKAGE", str(pkg))
    graph = _imports(_modules())
    assert graph["jaxrl_entropy.rl.loss"] == {"jaxrl_entropy.training.trainer"}
    assert graph["jaxrl_entropy.training.trainer"] == {"jaxrl_entropy.training.rollout"}
    for check, text in ((test_imports_point_down_only, "rl.loss imports"),
                        (test_no_import_circles, "training.trainer -> jaxrl_entropy.training.rollout")):
        try:
            check()
        except AssertionError as e:
            assert text in str(e), str(e)
        else:
            raise AssertionError(f"{check.__name__} passed on a broken package")


def test_old_module_names_keep_working_with_a_warning_naming_the_new_place():
    import importlib
    import warnings

    import jaxrl_entropy as pkg
    for old, new in (("trainer", "training.trainer"), ("checkpoint", "rundir.checkpoint"),
                     ("dryrun", "aot.dryrun"), ("cli_commands", "cli.commands")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = getattr(pkg, old)
        assert module is importlib.import_module(f"jaxrl_entropy.{new}")
        assert any(issubclass(w.category, DeprecationWarning) and f"jaxrl_entropy.{new}" in str(w.message)
                   for w in caught), [str(w.message) for w in caught]


def test_test_modules_have_unique_names():
    # the tests' folders are not packages: pytest imports each module by its bare name, so two
    # test files of one name in different folders fail the whole run with "import file mismatch"
    tests = os.path.dirname(os.path.abspath(__file__))
    seen: dict[str, str] = {}
    for folder, _, files in os.walk(tests):
        for f in files:
            if f.endswith(".py") and f != "conftest.py":
                assert f not in seen, f"{os.path.join(folder, f)} and {seen[f]} share a name"
                seen[f] = os.path.join(folder, f)
