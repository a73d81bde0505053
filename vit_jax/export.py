"""Export a checkpoint as a PyTorch model folder: Hugging Face transformers or timm.

    python -m vit_jax.export --checkpoint=/tmp/vit_quickstart --to=hf --out=/tmp/vit_hf
    python -m vit_jax.export --checkpoint=ViT-B_16.npz --to=timm --out=/tmp/vit_timm

--checkpoint takes anything predict reads (a training workdir, vit_jax / big_vision .npz, timm /
HF .safetensors) and the architecture is read off the weights as predict does; --image_size,
--posemb, --model and --labels are predict's flags. The folders and what each target cannot
hold: `vit_jax.weights.torch_formats`. The same from Python: `checkpoint.export(path, to, out)`.
"""
from absl import app, flags

from vit_jax.cli import errors, program_flags, startup
from vit_jax import predict  # noqa: F401  (its flags: --checkpoint, --model, --labels, ...)

_TO = flags.DEFINE_enum('to', None, ['hf', 'timm'], "'hf': a transformers "
                        "ViTForImageClassification folder; 'timm': a timm model folder.")
_OUT = program_flags.OUT  # the model folder
for _name in ('checkpoint', 'model', 'labels', 'image_size', 'posemb', 'out'):
  flags.declare_key_flag(_name)  # --help lists them


def main(argv):
  startup.inference_program(argv)
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.weights import labels  # pylint: disable=g-import-not-at-top
  flag = flags.FLAGS
  with errors.reported_as_one_line():  # each message names the flag or file at fault
    written = checkpoint.export(flag.checkpoint, _TO.value, _OUT.value,
                                image_size=flag.image_size, posemb=flag.posemb,
                                model_name=flag.model, labels=labels.read_labels(flag.labels))
  print(f'wrote {", ".join(written)} to {_OUT.value}')


if __name__ == '__main__':
  startup.begin()
  flags.mark_flags_as_required(['checkpoint', 'to', 'out'])
  app.run(main)
