"""The package installs, imports and exposes the layout the other modules rely on; its import graph runs one
way (docs/architecture.md)."""

import ast
import importlib
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bot_keras"
# The run readers: they hand a run to its task module and never import a training command.
READERS = ("bot_keras.run_dir", "bot_keras.model_files", "bot_keras.evaluate", "bot_keras.export",
           "bot_keras.predict")
COMMANDS = ("bot_keras.train", "bot_keras.finetune", "bot_keras.trainer")


def test_public_api_names_other_modules_rely_on():
    # docs/architecture.md's contract: each name resolves to a callable in the module it promises.
    contract = {
        "bot_keras.models": ("build_model", "build_backbone", "load_classifier_weights"),
        "bot_keras.data": ("make_dataset", "dataset_info", "read_class_names", "write_class_names"),
        "bot_keras.schedules": ("build_lr_schedule", "scaled_learning_rate", "training_steps"),
        "bot_keras.optimizers": ("build_optimizer", "decayed_variables"),
        "bot_keras.losses": ("classification_loss", "distillation_loss"),
        "bot_keras.data.mixup": ("sample_mixup_lambda", "mixup"),
        "bot_keras.distribute": ("create_strategy", "set_precision", "per_replica_batch_size"),
        "bot_keras.run_dir": ("read_run", "read_flags", "save_model", "write_run_info"),
        "bot_keras.model_files": ("load_model", "load_keras_model", "load_backbone", "copy_weights"),
        "bot_keras.atomic_write": ("write_atomic", "write_error"),
    }
    missing = [f"{module}.{name}" for module, names in contract.items() for name in names
               if not callable(getattr(importlib.import_module(module), name, None))]
    assert missing == []


def test_no_tensorflow_addons_dependency():
    from importlib.metadata import requires

    deps = " ".join(requires("bot-keras") or [])
    assert "tensorflow-addons" not in deps and "tensorflow_addons" not in deps


def import_graph(package):
    """{module: the package's modules it imports}, read from the source of every module under the folder
    `package`, every import statement counted: module level and inside functions, absolute and relative."""
    files = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def owner(name):  # the module that defines `name` (a module, or a name inside one)
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(up + [base] * bool(base))
                imported.update(owner(f"{base}.{alias.name}") for alias in node.names)
        graph[module] = imported - {"", module}
    return graph


def cycles(graph):
    """Each import cycle of `graph` found by a depth-first walk, as [m1, m2, ..., m1]."""
    found, state, path = [], {}, []

    def visit(module):
        state[module] = "open"
        path.append(module)
        for child in sorted(graph.get(module, ())):
            if state.get(child) == "open":
                found.append(path[path.index(child):] + [child])
            elif child not in state:
                visit(child)
        path.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    return found


def reachable(graph, module):
    seen, todo = set(), [module]
    while todo:
        for child in graph.get(todo.pop(), ()):
            if child not in seen:
                seen.add(child)
                todo.append(child)
    return seen


def test_the_import_graph_has_no_cycle_function_level_imports_included(tmp_path):
    graph = import_graph(PACKAGE)
    assert {"bot_keras.train", "bot_keras.data.decode", "bot_keras.detection.task"} <= set(graph)
    assert "bot_keras.tasks" in graph["bot_keras.evaluate"]  # edges are read, not just modules listed
    assert cycles(graph) == []
    # Negative control: a cycle closed by an import inside a function, through a relative import.
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def load():\n    from .. import a\n    return a\n")
    assert cycles(import_graph(pkg)) == [["pkg.a", "pkg.sub.b", "pkg.a"]]


def test_run_readers_reach_no_training_command_at_any_depth():
    graph = import_graph(PACKAGE)
    for reader in READERS:
        assert reader in graph
        assert not reachable(graph, reader) & set(COMMANDS), reader
    assert "bot_keras.trainer" in reachable(graph, "bot_keras.train")  # the check sees what is there
