"""A program's main run in this test process, as `python -m PROGRAM ARGV` would run it."""
import sys

from absl import flags


def run_main(main, argv: list[str], capsys) -> tuple[int, str, str]:
  """(exit status, stdout, stderr) of main(argv) after absl parses argv (argv[0]: the name)."""
  flags.FLAGS.unparse_flags()
  status = 0
  try:
    main(flags.FLAGS(argv))
  except SystemExit as e:
    status = e.code if isinstance(e.code, int) else 1
    if not isinstance(e.code, int):  # sys.exit('message') prints it on stderr
      print(e.code, file=sys.stderr)
  out, err = capsys.readouterr()
  return status, out, err
