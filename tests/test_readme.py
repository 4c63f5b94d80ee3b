"""The README, as a newcomer uses it: every example runs as written, and its tables match the code.

Every fenced ``python`` and ``bash`` block of README.md runs, unchanged, in a
scratch copy of the repository (symlinks to ``launch/``, ``slurm/``,
``benchmarks/``, the Makefile, and a ``.venv`` that is this interpreter's),
after ``make demo``'s checkpoint is written there as ``demo_ckpt``. ``HOME``
points into the scratch directory, whose Hugging Face cache holds a tiny
``Qwen/Qwen3-0.6B`` laid out as ``hf download`` leaves it, so the Hub
examples run offline. A block whose first line is ``# needs: ...`` is skipped
only when this machine lacks what it names (GPUs, MPI) or always (a cluster,
the network). A Python block whose first line is ``# NAME.py`` is the file
the bash block after it runs; ``text`` blocks are output and ``ini`` blocks
config files, neither is run. ``make test`` (the suite itself) is checked
with ``make -n test`` rather than run inside itself.

The API table must list every public name with its exact parameters, the
report field lists every field, and both command tables every option with its
choices, as ``inspect.signature`` and the argparse parsers have them.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distload
from distload import load as load_cli
from distload import save as save_cli
from distload.plan.load_plan import LoadPlan
from launch_env import clean_env, venv_tool

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
TIMEOUT = 600  # one example: a few process launches that each import transformers, on a busy 2-core machine
QWEN = "Qwen/Qwen3-0.6B"
QWEN_COMMIT = "c1899de289a04d12100db370d81485cdf75e47ca"


@dataclasses.dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int  # of the opening fence

    @property
    def needs(self) -> str | None:
        m = re.match(r"# needs: (.+)", self.code)
        return m.group(1) if m else None

    @property
    def file_name(self) -> str | None:
        m = re.match(r"# (\w+\.py)\n", self.code)
        return m.group(1) if m else None


def readme_blocks() -> list[Block]:
    blocks, lines = [], README.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"```(\S*)\s*$", lines[i])
        if m is None:
            i += 1
            continue
        j = next(k for k in range(i + 1, len(lines)) if lines[k].startswith("```"))
        blocks.append(Block(m.group(1), "\n".join(lines[i + 1:j]) + "\n", i + 1))
        i = j + 1
    return blocks


BLOCKS = readme_blocks()
EXAMPLES = [b for b in BLOCKS if b.lang in ("python", "bash")]


def test_every_fenced_block_is_an_example_or_output():
    """A block without a language would be neither run nor marked as output (``text``) or a config file (``ini``)."""
    assert BLOCKS and all(b.lang in ("python", "bash", "text", "ini") for b in BLOCKS), \
        [(b.line, b.lang) for b in BLOCKS if b.lang not in ("python", "bash", "text", "ini")]
    for b in EXAMPLES:  # a marker is the first line, where a reader sees it first
        assert "# needs:" not in b.code.split("\n", 1)[1], f"README line {b.line}: '# needs:' must open the block"


def test_named_python_files_are_run_by_the_block_after_them():
    for k, b in enumerate(BLOCKS):
        if b.lang == "python" and b.file_name:
            following = BLOCKS[k + 1]
            assert following.lang == "bash" and b.file_name in following.code, \
                f"README line {b.line}: {b.file_name} is never run"


# ---- the scratch repository -------------------------------------------------------------


def _fake_venv(dst: Path) -> None:
    """``.venv``: this interpreter's virtualenv, entry by entry, plus a fresh ``make venv`` stamp."""
    dst.mkdir()
    for entry in Path(sys.prefix).iterdir():
        if entry.name != ".installed":
            (dst / entry.name).symlink_to(entry)
    (dst / ".installed").touch()  # newer than pyproject.toml and constraints.txt: make installs nothing


def _qwen_in_hub_cache(home: Path) -> None:
    """A tiny tied Qwen3 under the real repo id, laid out as ``hf download`` leaves it in ``~/.cache``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from test_hub import lay_out_hub_cache

    cfg = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    src = home / "qwen-src"
    Qwen3ForCausalLM(cfg).save_pretrained(src, max_shard_size="100KB")
    lay_out_hub_cache(src, home / ".cache" / "huggingface" / "hub", QWEN, QWEN_COMMIT)
    shutil.rmtree(src)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    if sys.prefix == sys.base_prefix:
        pytest.skip("the README's examples use .venv: run the tests from a virtualenv (make test)")
    root = tmp_path_factory.mktemp("repo")
    for name in ("launch", "slurm", "benchmarks", "Makefile", "pyproject.toml", "constraints.txt", "README.md"):
        (root / name).symlink_to(REPO / name)
    _fake_venv(root / ".venv")
    home = root / "home"
    home.mkdir()
    _qwen_in_hub_cache(home)
    for b in BLOCKS:
        if b.lang == "python" and b.file_name:
            (root / b.file_name).write_text(b.code)
    env = clean_env(HOME=str(home), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
                    VIRTUAL_ENV=str(root / ".venv"))
    env["PATH"] = f"{root / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "PYTHONPATH"):
        env.pop(var, None)
    # make demo's first step, so that every example finds demo_ckpt whichever runs first
    proc = subprocess.run([sys.executable, "-m", "benchmarks.make_checkpoint", "demo_ckpt", "--preset", "demo"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return root, env


def _skip_reason(block: Block) -> str | None:
    needs = block.needs
    if needs is None:
        return None
    if "cluster" in needs or "network" in needs:
        return f"README line {block.line} needs {needs}"
    if "GPU" in needs:
        import torch

        return None if torch.cuda.is_available() else f"README line {block.line} needs GPUs"
    if needs.startswith("MPI"):
        if venv_tool("mpiexec") is None:
            return f"README line {block.line} needs mpiexec (pip install 'distload[mpi]')"
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            return f"README line {block.line} needs mpi4py (pip install 'distload[mpi]')"
        return None
    return f"README line {block.line} needs {needs}"


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"line{b.line}-{b.lang}" for b in EXAMPLES])
def test_the_readme_example_runs_as_written(block, sandbox):
    reason = _skip_reason(block)
    if reason:
        pytest.skip(reason)
    root, env = sandbox
    if block.file_name:  # run by the bash block after it; here it need only be valid Python
        compile(block.code, block.file_name, "exec")
        return
    script = root / f"example_line{block.line}.{'py' if block.lang == 'python' else 'sh'}"
    code = block.code
    if block.lang == "bash":  # `make test` here would run this suite inside itself: check its recipe instead
        code = re.sub(r"^make test(?=\s|$)", "make -n test", code, flags=re.M)
    script.write_text(code)
    cmd = [sys.executable, script.name] if block.lang == "python" else ["bash", "-e", script.name]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"README line {block.line} failed ({time.monotonic() - t0:.0f} s):\n{out[-6000:]}"
    assert "distload: error" not in out and "Traceback" not in out, out[-6000:]


def test_the_first_example_runs_in_one_process_and_under_torchrun():
    first = next(b for b in BLOCKS if b.lang == "python")
    assert first.file_name == "first.py"
    runs = BLOCKS[BLOCKS.index(first) + 1].code
    assert re.search(r"^python first\.py", runs, re.M) and re.search(r"^torchrun .*first\.py", runs, re.M)
    assert "distload.empty_init()" in first.code and "AutoConfig.from_pretrained" in first.code
    assert "if dist.is_initialized():" in first.code  # DDP only where a group exists


def test_ci_runs_make_test_which_the_readme_names():
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()[-1]
    assert "`make test` runs the test suite" in README.read_text()


# ---- the tables -------------------------------------------------------------------------


def _table(after: str) -> list[tuple[str, str]]:
    """The (first cell, second cell) rows of the first Markdown table after the line containing ``after``."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    i = next(k for k in range(start, len(lines)) if lines[k].startswith("| "))
    rows = []
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        rows.append((cells[0], cells[1]))
    return rows


def _code(cell: str) -> str:
    m = re.fullmatch(r"`(.+)`", cell)
    assert m, f"table cell {cell!r} is not one code span"
    return m.group(1).replace("\\|", "|")


def _documented_params(sig: inspect.Signature) -> list[str]:
    out, star = [], False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            out.append("*")
            star = True
        out.append(p.name)
    return out


def test_the_api_table_lists_every_public_name_with_its_exact_parameters():
    rows = [_code(name) for name, _ in _table("The public API")]
    listed = {re.match(r"\w+", r).group(0): r for r in rows}
    assert set(listed) == set(distload.__all__), (f"README lacks {sorted(set(distload.__all__) - set(listed))}; "
                                                  f"distload.__all__ lacks {sorted(set(listed) - set(distload.__all__))}")
    for name, cell in listed.items():
        obj = getattr(distload, name)
        if inspect.isclass(obj):
            assert cell == name, f"{cell}: classes are listed by name"
            continue
        m = re.fullmatch(r"(\w+)\((.*)\)", cell)
        assert m, f"{cell}: functions are listed as name(parameters)"
        params = [p.strip() for p in m.group(2).split(",")] if m.group(2) else []
        assert params == _documented_params(inspect.signature(obj)), f"README: {cell}; code: {inspect.signature(obj)}"


def test_the_plan_and_the_reports_are_documented_field_by_field():
    text = README.read_text()
    assert "plan.describe()" in text and callable(LoadPlan.describe)
    for cls in (distload.LoadReport, distload.SaveReport):
        para = next(p for p in text.split("\n\n") if p.startswith(f"`{cls.__name__}` fields"))
        names = {f.name for f in dataclasses.fields(cls)} | {"gbps"}
        missing = sorted(n for n in names if f"`{n}`" not in para)
        assert not missing, f"README's {cls.__name__} fields lack {missing}"
        documented = set(re.findall(r"`(\w+)`", para)) - {cls.__name__}
        assert documented <= names, f"README names {sorted(documented - names)}, which {cls.__name__} lacks"
    for method in ("summary()", "to_dict()"):
        assert all(callable(getattr(c, method[:-2])) for c in (distload.LoadReport, distload.SaveReport))
        assert f"`{method}`" in text


def _check_cli_table(rows: list[tuple[str, str]], parser, positionals: dict[str, str]) -> None:
    options: dict[str, object] = {}
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or "--help" in action.option_strings:
            continue
        for s in action.option_strings or [positionals[action.dest]]:
            options[s] = action
    documented: dict[str, str] = {}
    for cell, meaning in rows:
        code = _code(cell)
        for name in re.findall(r"--[\w-]+|^[A-Z]+\b", code):
            documented[name] = code
        assert meaning, f"{code}: no meaning given"
    assert set(documented) == set(options), (f"README lacks {sorted(set(options) - set(documented))}; "
                                             f"argparse lacks {sorted(set(documented) - set(options))}")
    for name, code in documented.items():
        choices = getattr(options[name], "choices", None)
        if choices:
            shown = code.split(" ", 1)[1].split("|")
            assert shown == list(choices), f"{code}: argparse's choices are {list(choices)}"


def test_the_load_cli_table_lists_every_option_and_its_choices():
    _check_cli_table(_table("`distload --help` lists the same options"), load_cli.build_parser(), {"path": "PATH"})


def test_the_save_cli_table_lists_every_option_and_its_choices():
    _check_cli_table(_table("**Re-sharding from the shell.**"), save_cli.build_parser(), {"src": "SRC", "dst": "DST"})
