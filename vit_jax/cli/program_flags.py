"""Flags that several programs take, defined once: absl refuses a second definition of a name
in one process (the tests import every program). Each program declares the ones it uses as
its key flags, so that its --help lists them."""
from absl import flags

OUT = flags.DEFINE_string('out', None, 'Folder to write (local or gs://).')
