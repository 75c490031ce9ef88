"""The ```python blocks of the docs pages and of README.md's "Use" section run.

Each page's blocks run in order in one namespace, in a fresh temporary working
directory; a block that raises fails the page's test with the page, the
block's line in the .md file and the traceback (its line numbers are the .md
file's). Values that the pages state are checked by asserts in the pages.

* A block whose first line is ``# name.py`` is a script: it is written to that
  file, and the page's ```console blocks run their ``$`` commands (scaling.md:
  hello_pod.py under the 2-process launcher, on 8 and on 1 device), whose
  output must end with the lines shown.
* ```python no-run blocks (only what needs a real cluster) are compiled, not
  run; ``NO_RUN`` lists them, and a test checks that list against the markers.
* ``SETUP`` holds the stand-ins a page does not build itself, run before its
  blocks; each entry says why it is not in the page.
* Other fences (bash, console commands on other pages) are not run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = {
    "merging": "docs/merging.md",
    "ensembles": "docs/ensembles.md",
    "distillation": "docs/distillation.md",
    "moe": "docs/moe.md",
    "scaling": "docs/scaling.md",
    "README": "README.md",
}
SECTIONS = {"README": "## Use"}  # only this section of the page is run

# The blocks fenced ```python no-run, each as (page, a line of it): only what cannot run on
# one machine. They are still compiled.
NO_RUN = {
    # joins a cluster by its coordinator's IP address
    ("scaling", 'distributed.initialize(coordinator_address="10.0.0.2:8476", num_processes=4,'),
}

# Run before a page's blocks, in its namespace (``_ROOT`` is the checkout).
SETUP: dict[str, str] = {
    # merging.md reads configs/merge/ties.yml "from the root of a checkout".
    "merging": "import shutil; shutil.copytree(_ROOT / 'configs', 'configs')",
    # scaling.md's data-loading and checkpoint blocks are fragments of a training job (its
    # corpus, tokenizer, step, workdir and state come from the job): a stand-in for each.
    "scaling": """
import jax.numpy as jnp
from pathlib import Path
from tokenizers import Tokenizer, models, pre_tokenizers
Path("corpus").mkdir()
Path("corpus/a.txt").write_text("the quick brown fox jumps over the lazy dog\\n" * 300)
words = ["<eos>", "<unk>"] + "the quick brown fox jumps over lazy dog".split()
tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
eos, step = 0, 0
workdir, model_config = Path("runs/lm"), {"hidden_size": 64, "num_layers": 2}
state = {"step": jnp.array(0), "params": {"w": jnp.ones((4, 4))}, "opt_state": {"w": jnp.ones(4)}}
""",
    # README.md's "Use" shows calls on the reader's own checkpoints and pytrees; a set-up there
    # would bury them. Tiny random Llamas (one word-level tokenizer) at the paths it names, and
    # small pytrees for the names of its merging block.
    "README": """
import jax
from pathlib import Path
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers
from jaxcombine import tree
from jaxcombine.hf import load_model, save_model
from jaxcombine.models import Decoder, DecoderConfig, MLPClassifier

text = "The capital of France is Paris . The capital of Italy is Rome ."
Path("text.txt").write_text(text)
words = ["<unk>", "<s>", "</s>", *sorted(set(text.split()))]
tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer.save("tokenizer.json")
config = DecoderConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=4, head_dim=8, eos_token_ids=(2,))
for seed, name in enumerate(("path/to/llama", "run-a", "run-b", "run-c", "small")):
    save_model(Decoder(config, rngs=nnx.Rngs(seed)), name, extra_files=["tokenizer.json"])
llama, qwen, qwen_tok = load_model("path/to/llama"), load_model("run-b"), tokenizer
SYSTEM_PROMPT, questions = "The capital of Italy is Rome .", ["The capital of France is"]

keys = jax.random.split(jax.random.key(0), 7)
base = {"layers": [{"mlp": {"kernel": jax.random.normal(keys[0], (4, 4))}}] * 2}
math_ft, code_ft, other, a, b, ft = (
    jax.tree.map(lambda x, k=k: x + 0.1 * jax.random.normal(k, x.shape), base) for k in keys[1:])
fine_tunes = [math_ft, code_ft, ft]
eval_fn = lambda params: -float(tree.norm(tree.sub(params, code_ft)))  # noqa: E731
params_a, params_b = (nnx.state(MLPClassifier(4, (8,), 3, rngs=nnx.Rngs(s))) for s in (0, 1))
""",
}


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    options: tuple[str, ...]
    line: int  # line of the opening fence, 1-based
    code: str


def blocks(page: str) -> list[Block]:
    """The fenced blocks of ``page`` (of its section, when it has one), in order."""
    lines = (ROOT / PAGES[page]).read_text().splitlines()
    start, end = 0, len(lines)
    if page in SECTIONS:
        start = lines.index(SECTIONS[page])
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), end)
    found, i = [], start
    while i < end:
        if lines[i].startswith("```"):
            info = lines[i][3:].split()
            j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
            found.append(Block(info[0] if info else "", tuple(info[1:]), i + 1,
                               "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return found


def python_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang == "python"]


SCRIPT = re.compile(r"# (\w+\.py)$")  # a block whose first line names its file


def run_block(page: str, block: Block, namespace: dict) -> str | None:
    """Run ``block`` in ``namespace``; the failure report, or None.

    A script (first line ``# name.py``) is written to that file instead: the
    page's console blocks run it."""
    path = ROOT / PAGES[page]
    # Padded with newlines, so that the traceback's line numbers are the .md file's.
    code = compile("\n" * block.line + block.code, str(path), "exec")
    script = SCRIPT.match(block.code.splitlines()[0])
    if script:
        Path(script.group(1)).write_text(block.code + "\n")
        return None
    if "no-run" in block.options:
        return None
    try:
        exec(code, namespace)
    except BaseException:
        return (f"{PAGES[page]}: the python block at line {block.line} raised:\n"
                f"{traceback.format_exc()}")
    return None


def run_console(page: str, block: Block) -> str | None:
    """Run the ``$ command`` lines of a console block (scaling.md's runs of
    hello_pod.py); the report of the first whose output does not end with the
    lines that follow it, or None."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 1 device, as shown
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    lines = block.code.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("$ ")] + [len(lines)]
    for i, j in zip(starts, starts[1:], strict=False):
        command, expected = lines[i][2:], lines[i + 1 : j]
        done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                              timeout=120)
        printed = done.stdout.splitlines()[-len(expected) :]  # after the launcher's gloo lines
        if done.returncode != 0 or printed != expected:
            return (f"{PAGES[page]}: the console block at line {block.line + 1 + i}: "
                    f"`{command}` exited with {done.returncode} and printed\n{done.stdout}"
                    f"instead of\n" + "\n".join(expected) + f"\nstderr:\n{done.stderr[-3000:]}")
    return None


@pytest.mark.parametrize("page", list(PAGES))
def test_page_runs(page, tmp_path, monkeypatch):
    """``page``'s blocks, after its ``SETUP`` (see the module docstring)."""
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"docs_{page}", "_ROOT": ROOT}
    if page in SETUP:
        exec(compile(SETUP[page], f"<setup of {page}>", "exec"), namespace)
    for block in blocks(page):
        if block.lang == "python":
            failure = run_block(page, block, namespace)
        elif block.lang == "console":
            failure = run_console(page, block)
        else:
            continue
        if failure:
            pytest.fail(failure, pytrace=False)


def test_no_run_blocks_are_the_allowed_ones():
    marked = [(page, b) for page in PAGES for b in python_blocks(page) if "no-run" in b.options]
    named = {(page, line) for page, b in marked for line in b.code.splitlines()
             if (page, line) in NO_RUN}
    assert len(marked) == len(named) and named == NO_RUN, (marked, NO_RUN)
