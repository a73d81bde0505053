"""Every ```python block of README.md runs as written."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')
# torch's CUDA build brings triton, which segfaults when imported after TensorFlow (this process
# has it loaded): blocks using PyTorch libraries run in a fresh interpreter, as a script would.
_PYTORCH_LIBRARIES = ('torch', 'transformers', 'timm')
_USES_PYTORCH = re.compile(rf'^(import|from) .*\b({"|".join(_PYTORCH_LIBRARIES)})\b', re.M)


def _python_blocks() -> list[str]:
  with open(README) as f:
    return re.findall(r'^```python\n(.*?)^```', f.read(), flags=re.M | re.S)


def test_readme_has_python_blocks():
  assert _python_blocks()


@pytest.mark.parametrize('index', range(len(_python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
  block = _python_blocks()[index]
  if _USES_PYTORCH.search(block):
    missing = [m for m in _PYTORCH_LIBRARIES if importlib.util.find_spec(m) is None]
    if missing:
      pytest.skip(f'{", ".join(missing)} not installed: pip install -e ".[test]" brings them')
    done = subprocess.run([sys.executable, '-c', block], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return
  monkeypatch.chdir(tmp_path)  # the blocks write files such as model.npz where they run
  exec(compile(block, f'README.md python block {index}', 'exec'), {})
