"""The house rules of DESIGN: no two project modules import each other (directly or round a loop), no module
imports a script, and the models and math at the bottom import nothing of ours."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}
SCRIPTS = {"train", "sample", "pretrain", "bench", "ablations", "gpu_check", "evaluate"}
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


def test_every_script_has_one_help_style_and_one_line_errors():
    """--help of every script: each default reads "(default: ...)", no line wider than the terminal (COLUMNS=100)
    or the wrapped reward table; a bad flag is one line on stderr, not argparse's usage block."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}
    for script in sorted(SCRIPTS):
        path = str(ROOT / f"{script}.py")
        out = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
        assert out.returncode == 0, (script, out.stderr[-2000:])
        text = out.stdout
        if script == "gpu_check":   # its epilog is its docstring, verbatim
            text = text[:text.index(__import__("gpu_check").__doc__.strip()[:40])]
        assert "(default " not in text and "default=" not in text, (script, text)
        wide = [line for line in text.splitlines() if len(line) > 100]
        assert not wide, (script, wide)
        bad = subprocess.run([sys.executable, path, "--no-such-flag"], capture_output=True, text=True, env=env,
                             cwd=ROOT)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1, (script, bad.stderr)
        assert bad.stderr.startswith(f"{script}.py: error: ") and bad.stderr.endswith(" (see --help)\n"), bad.stderr


def test_per_model_defaults_in_help_are_the_ones_used():
    """The figures --help prints are TrainConfig's defaults and, for --model tiny/shapes, MODEL_DEFAULTS; parse_args
    applies them, and a flag given wins over both."""
    import dataclasses
    import re
    import config
    text = " ".join(config.build_parser().format_help().split())
    sd = config.parse_args(["--out", "/tmp/never-written"])
    for f in dataclasses.fields(config.TrainConfig):
        if f.default not in (None, dataclasses.MISSING):
            assert getattr(sd, f.name) == f.default, f.name
    for m in config.MODEL_DEFAULTS:
        args = config.parse_args(["--model", m, "--out", "/tmp/never-written"])
        for k, v in config.MODEL_DEFAULTS[m].items():
            assert getattr(args, k) == v, (m, k)
            if v != getattr(sd, k):   # "--model tiny, tiny-sdxl: 10": models with the same value share an entry
                shown = config._shown(v)
                assert re.search(rf"--model [^:;]*(?<![\w/-]){re.escape(m)}(?![\w/-])[^:;]*: {re.escape(shown)}\b",
                                 text), (m, k, shown)
    assert config.parse_args(["--model", "shapes", "--lr", "0.5", "--out", "/tmp/never-written"]).lr == 0.5
    assert "--lr LR AdamW learning rate (default: 3e-4 with LoRA, 1e-5 for full fine-tuning; --model tiny, tiny-sdxl: 0.005; " \
           "--model shapes: 0.003)" in text
