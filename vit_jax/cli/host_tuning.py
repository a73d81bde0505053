"""Faster defaults for the command-line programs on a CPU host.

Two settings, each measured on the ViT-S/16 training step (table in benchmarks/README.md):

- Transparent huge pages for glibc's malloc (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). XLA:CPU
  allocates the step's temporaries (about 2 GB for ViT-S/16 at batch 16) afresh on every call;
  on 4 KiB pages that is ~500k page faults per step. glibc reads its tunables only when a process
  starts, so the program re-executes itself once with the setting added.
- XLA dots through Eigen rather than YNNPACK (`--xla_cpu_experimental_ynn_fusion_type=`, i.e. no
  YNNPACK fusions), which ran the step's matmuls faster on the CPUs we measured.

Both are defaults, not overrides: a GLIBC_TUNABLES or XLA_FLAGS value the user set for the same
setting wins, and `VIT_JAX_HOST_TUNING=0` turns both off. Accelerator runs are unaffected (the XLA
flag concerns only the CPU backend; huge pages only make host allocations cheaper).
"""
import os
import sys

HUGE_PAGES_TUNABLE = 'glibc.malloc.hugetlb=1'
# As XLA DebugOptions fields (what compile(compiler_options=...) takes); XLA_FLAGS spells
# each as --name=value.
XLA_CPU_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type': ''}
_OPT_OUT = 'VIT_JAX_HOST_TUNING'
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def enabled(environ=os.environ) -> bool:
  return environ.get(_OPT_OUT, '1') not in ('0', 'false', 'False', 'no')


def transparent_huge_pages_mode(path: str = _THP_MODE_FILE) -> str | None:
  """The kernel's THP mode ('always', 'madvise' or 'never'), None where it has none."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  # The file lists every mode with the active one in brackets: "always [madvise] never".
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def with_huge_pages(environ) -> dict | None:
  """`environ` plus the huge-page malloc tunable, or None when it is set already or would do
  nothing here (not Linux glibc, THP off, or opted out)."""
  if not enabled(environ) or not sys.platform.startswith('linux'):
    return None
  if transparent_huge_pages_mode() not in ('always', 'madvise'):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb' in tunables:
    return None
  env = dict(environ)
  env['GLIBC_TUNABLES'] = f'{tunables}:{HUGE_PAGES_TUNABLE}' if tunables else HUGE_PAGES_TUNABLE
  return env


def with_xla_cpu_flags(xla_flags: str) -> str:
  """XLA_FLAGS with our CPU defaults appended where the user has not set the same flag."""
  flags = xla_flags.split()
  names = {flag.split('=', 1)[0] for flag in flags}
  flags += [f'--{name}={value}' for name, value in XLA_CPU_OPTIONS.items()
            if f'--{name}' not in names]
  return ' '.join(flags)


def apply(xla_flags: bool = True) -> None:
  """Called first thing by each program's `__main__`, before JAX starts its backend: sets the
  XLA flags (unless xla_flags=False), and re-executes the program once with the malloc tunable
  if it lacks it."""
  if not enabled():
    return
  if xla_flags:
    os.environ['XLA_FLAGS'] = with_xla_cpu_flags(os.environ.get('XLA_FLAGS', ''))
  env = with_huge_pages(os.environ)
  if env is not None and getattr(sys, 'orig_argv', None):
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
