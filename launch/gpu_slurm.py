"""Starts this SLURM task's trainer with the jax.distributed flags read from SLURM's environment.

  srun python -m launch.gpu_slurm [--port=P] [--dry_run] -- TRAINER FLAGS

Run it as one task per node (launch/gpu_slurm.sbatch does): each process drives every GPU of its
node, and process 0 (on the allocation's first node) hosts the coordinator. It replaces itself
with `python -m vit_jax.main TRAINER FLAGS --coordinator_address=FIRST_NODE:PORT
--num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID`, so SLURM's SIGTERM (time limit,
preemption, scancel) reaches the trainer, which checkpoints and exits. --dry_run prints that
command instead; outside an allocation, the command of task 0 of an example two-node job.
"""
import argparse
import os
import shlex
import subprocess
import sys

# Coordinator ports are spread by job id so that two jobs sharing a node do not collide.
PORT_BASE = 20000
PORT_SPREAD = 20000


# What a task reads from SLURM's environment.
SLURM_VARIABLES = ('SLURM_JOB_NODELIST', 'SLURM_NTASKS', 'SLURM_JOB_NUM_NODES', 'SLURM_PROCID',
                   'SLURM_JOB_ID')
# --dry_run outside an allocation shows the command of task 0 of this two-node job.
EXAMPLE_JOB = {'SLURM_JOB_NODELIST': 'node01,node02', 'SLURM_NTASKS': '2',
               'SLURM_JOB_NUM_NODES': '2', 'SLURM_PROCID': '0', 'SLURM_JOB_ID': '12345'}
EXAMPLE_FIRST_HOST = 'node01'


def slurm_variables(environ) -> dict:
  """SLURM's variables this task needs; every missing one is named at once."""
  missing = [name for name in SLURM_VARIABLES if name not in environ]
  if missing:
    raise SystemExit(f'{", ".join(missing)} not set: run this under srun inside a SLURM '
                     'allocation (see launch/gpu_slurm.sbatch), or add --dry_run to see the '
                     'command of an example job')
  return {name: environ[name] for name in SLURM_VARIABLES}


def first_host(nodelist):
  """The first hostname of a SLURM nodelist such as 'gpu[03-05,09]', expanded by scontrol."""
  try:
    hosts = subprocess.run(['scontrol', 'show', 'hostnames', nodelist], check=True,
                           capture_output=True, text=True).stdout.split()
  except FileNotFoundError:
    raise SystemExit('scontrol not found on PATH: run this on a SLURM node') from None
  if not hosts:
    raise SystemExit(f'scontrol show hostnames {nodelist} printed no hosts')
  return hosts[0]


def trainer_command(environ, trainer_flags, port=None, coordinator_host=None):
  """argv of this task's trainer process, from SLURM's variables in environ (the coordinator
  is the allocation's first node unless given)."""
  slurm = slurm_variables(environ)
  num_tasks, num_nodes = int(slurm['SLURM_NTASKS']), int(slurm['SLURM_JOB_NUM_NODES'])
  if num_tasks != num_nodes:
    raise SystemExit(f'SLURM_NTASKS={num_tasks} but SLURM_JOB_NUM_NODES={num_nodes}: start one '
                     'task per node (--ntasks-per-node=1); each process drives all its GPUs')
  if port is None:
    port = PORT_BASE + int(slurm['SLURM_JOB_ID']) % PORT_SPREAD
  coordinator_host = coordinator_host or first_host(slurm['SLURM_JOB_NODELIST'])
  return [sys.executable, '-m', 'vit_jax.main', *trainer_flags,
          f'--coordinator_address={coordinator_host}:{port}', f'--num_processes={num_tasks}',
          f'--process_id={slurm["SLURM_PROCID"]}']


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  split = argv.index('--') if '--' in argv else len(argv)
  parser = argparse.ArgumentParser(prog='python -m launch.gpu_slurm', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--port', type=int, help='coordinator port (default: from SLURM_JOB_ID)')
  parser.add_argument('--dry_run', action='store_true', help='print the command, run nothing')
  args = parser.parse_args(argv[:split])
  outside_slurm = not any(name in os.environ for name in SLURM_VARIABLES)
  if args.dry_run and outside_slurm:
    print(f'# not inside a SLURM allocation: the command of task 0 of an example job on '
          f'{EXAMPLE_JOB["SLURM_JOB_NODELIST"]} (job {EXAMPLE_JOB["SLURM_JOB_ID"]})',
          file=sys.stderr)
    command = trainer_command(EXAMPLE_JOB, argv[split + 1:], args.port, EXAMPLE_FIRST_HOST)
  else:
    command = trainer_command(os.environ, argv[split + 1:], args.port)
  if args.dry_run:
    print(shlex.join(command))
    return
  print('+ ' + shlex.join(command), file=sys.stderr, flush=True)
  os.execv(command[0], command)


if __name__ == '__main__':
  main()
