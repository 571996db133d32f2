"""The house rules of DESIGN: no two project modules import each other (directly or round a loop), no module
imports a script, and the models and math at the bottom import nothing of ours."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
SCRIPTS = {"train", "sample", "pretrain", "bench", "ablations", "gpu_check"}
BOTTOM = {"unet", "vae", "scheduler", "lora", "grid", "shapes", "reward_base", "hub"}


def imports(name: str) -> set[str]:
    """Project modules `name` imports anywhere in its body (lazy imports included)."""
    tree = ast.parse(MODULES[name].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return (found & set(MODULES)) - {name}


def test_no_import_cycles_no_script_imports_and_a_clean_bottom_floor():
    graph = {m: imports(m) for m in MODULES}
    for m, deps in graph.items():
        if m == "gpu_check":   # the device harness drives bench.py and train.py in-process (CUDA peak memory)
            continue
        assert not deps & SCRIPTS, f"{m} imports the script(s) {deps & SCRIPTS}"
    for m in BOTTOM & set(graph):
        assert not graph[m], f"{m} (bottom floor) imports {graph[m]}"
    assert graph["rewards_http"] == {"reward_base"}

    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
