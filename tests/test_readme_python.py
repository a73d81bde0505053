"""Every ```python block of README.md runs as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')


def _python_blocks() -> list[str]:
  with open(README) as f:
    return re.findall(r'^```python\n(.*?)^```', f.read(), flags=re.M | re.S)


def test_readme_has_python_blocks():
  assert _python_blocks()


@pytest.mark.parametrize('index', range(len(_python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the blocks write files such as model.npz where they run
  exec(compile(_python_blocks()[index], f'README.md python block {index}', 'exec'), {})
