"""The repository's dependencies point one way: maths ← model / reward ← train / eval ← world / toy.

The import graph is read from the source (every `import` statement, inside functions too), not from what a
run happens to import. Print it with `pytest tests/test_layout.py -s -k graph`.
"""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATHS = ("sde", "equalizer", "grpo", "trust_region")
# The product: what `train.py` / `eval.py` run on the real model. None of it may import the toy or the world
# (train.py and eval.py import the world only for --world; the 2-D toy imports only the maths).
PRODUCT = MATHS + ("model", "wan", "reward", "videoalign_checkpoint", "tiny", "hub", "distributed", "parallel", "optimizer", "plan",
                   "tracking", "self_check", "run_directory", "meters")
# The entry points and their configuration may import the world, for --world only (lazily, where the flag is read).
ENTRY = ("train", "eval", "config")


def module_names():
    names = [f[:-3] for f in os.listdir(REPO) if f.endswith(".py")]
    for folder in ("toy", "world"):
        names += [f"{folder}.{f[:-3]}" for f in os.listdir(os.path.join(REPO, folder))
                  if f.endswith(".py") and f != "__init__.py"]
    return sorted(names)


def imports_of(name, known):
    """The repository modules `name` imports anywhere in its source."""
    path = os.path.join(REPO, *name.split(".")) + ".py"
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)   # from world import video_world
    return sorted(m for m in found if m in known and m != name)


def graph():
    known = set(module_names())
    return {name: imports_of(name, known) for name in sorted(known)}


def test_the_product_never_imports_the_toy_or_the_world_and_the_maths_import_only_maths():
    edges = graph()
    for name in PRODUCT:
        assert not [m for m in edges[name] if m.startswith(("toy.", "world."))], (name, edges[name])
    for name in ENTRY:  # the world for --world, never the 2-D toy
        assert not [m for m in edges[name] if m.startswith("toy.")], (name, edges[name])
    top_level = {m for m in edges if "." not in m}
    assert top_level <= set(PRODUCT) | set(ENTRY), f"classify a new file as product or entry: {top_level - set(PRODUCT) - set(ENTRY)}"
    for name in (m for m in edges if m.startswith("toy.")):  # the 2-D toy: the maths and itself, nothing else
        assert set(edges[name]) <= set(MATHS) | {m for m in edges if m.startswith("toy.")}, (name, edges[name])
    for name in MATHS:
        assert set(edges[name]) <= set(MATHS), (name, edges[name])


def test_the_import_graph_has_no_cycle():
    edges = graph()
    print("\n".join(f"{name} -> {', '.join(targets) or '-'}" for name, targets in edges.items()))
    state = {}

    def visit(node, path):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", "cycle: " + " -> ".join(path + [node])
        state[node] = "open"
        for target in edges[node]:
            visit(target, path + [node])
        state[node] = "done"
    for node in edges:
        visit(node, [])


def test_requirements_say_what_the_readme_says_about_the_torch_build():
    """requirements.txt's comment on torch is the README's: PyPI's CUDA build on a GPU node, the CPU build of the same
    version first on a CPU-only machine; no local wheel a user does not have."""
    lines = open(os.path.join(REPO, "requirements.txt")).read().splitlines()
    pin = next(i for i, line in enumerate(lines) if line.startswith("torch=="))
    comment = " ".join(line.lstrip("# ") for line in lines[:pin] if line.startswith("#"))
    assert f"`{lines[pin]}`" in open(os.path.join(REPO, "README.md")).read()
    assert "PyPI's CUDA build" in comment and "CPU build of the same version first" in " ".join(comment.split())
    assert "local wheel" not in comment, comment
