"""The house's layout: scripts import only libraries (nanoGPT's habit: a script that imports another runs
that one's module-level set-up and ties their flags and names together; what two scripts share lives in a
library module), the layers (packages) import each other without a circle, the two leaves import nothing
of the project, and the root holds only the commands and the names users know."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The commands users run. dataloader.py also has a command line (it prints a data set's statistics) but
# is the data library every script needs, so it is not one of them.
SCRIPTS = ("main", "train_original", "compare", "ablation", "benchmark")


def imported_modules(path):
    """Top-level names of every module `path` imports, at module level or inside a function."""
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_script_imports_another_script():
    found = {script: sorted(imported_modules(os.path.join(REPO, f"{script}.py")) & set(SCRIPTS) - {script})
             for script in SCRIPTS}
    assert {script: others for script, others in found.items() if others} == {}


def test_every_script_is_listed():
    """A new top-level command (one with a __main__ block) must be listed above, or be dataloader.py."""
    commands = set()
    for name in os.listdir(REPO):
        if name.endswith(".py"):
            with open(os.path.join(REPO, name), encoding="utf-8") as handle:
                if 'if __name__ == "__main__":' in handle.read():
                    commands.add(name[:-3])
    assert commands - {"dataloader"} == set(SCRIPTS)


def project_imports():
    """{module: the project modules it imports (at any depth of its code)} for every module of the tree
    (a package counts as one module, `models`), tests left out."""
    modules = {}
    for name in os.listdir(REPO):
        if name.endswith(".py"):
            modules[name[:-3]] = imported_modules(os.path.join(REPO, name))
        elif os.path.isfile(os.path.join(REPO, name, "__init__.py")):
            found = set()
            for inner in os.listdir(os.path.join(REPO, name)):
                if inner.endswith(".py"):
                    found |= imported_modules(os.path.join(REPO, name, inner))
            modules[name] = found
    return {module: (found & set(modules)) - {module} for module, found in modules.items()}


def test_the_imports_have_no_circle_and_the_leaves_import_nothing_of_the_project():
    graph = project_imports()
    project = set(graph)
    # the error class and the flag types: every layer may use them, so they may use nothing of the project
    for leaf in ("common/errors.py", "common/flag_types.py"):
        assert imported_modules(os.path.join(REPO, leaf)) & project == set(), leaf
    state = {}

    def visit(module, path):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "an import circle: " + " -> ".join(path + [module])
        state[module] = "open"
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])


# The root: the commands, the data layer's face and command, and the modules users know by name; every
# other module lives in its layer's folder (common/, ratings/, models/, evaluation/, training/, studies/).
ROOT_MODULES = set(SCRIPTS) | {"dataloader", "options", "inner_loop_optimizers", "meta_learner"}


def test_the_root_holds_only_the_commands_and_the_names_users_know():
    found = {name[:-3] for name in os.listdir(REPO) if name.endswith(".py")}
    assert found == ROOT_MODULES, "a new module belongs in its layer's folder (README, What is where)"
