"""Runs exported model folders in transformers and timm for tests/test_export.py, in a process
of its own: torch (its CUDA build, which brings triton) segfaults when imported after
TensorFlow, and the test process has TensorFlow loaded.

One JSON request per stdin line, one JSON answer per stdout line ({"ok": true} or {"error":
...}); arrays travel as .npy files. Requests: {"run": "hf" | "timm" | "timm_local_dir",
"folder", "images" (NHWC in [-1, 1]), "out"} writes the logits; {"run": "hf_processor",
"folder", "images" (uint8 HWC), "out"} the processor's pixel values; {"run": "gelu", "images"
(any array), "out"} transformers' 'gelu_pytorch_tanh' and timm's 'gelu_tanh' of it, stacked.
"""
import json
import sys
import traceback

import numpy as np
import timm
import torch
import transformers
from safetensors.torch import load_file


def _nchw(path: str):
  return torch.from_numpy(np.load(path).transpose(0, 3, 1, 2).copy())


def _timm_model(folder: str):
  """As timm's README says: create_model(architecture, num_classes, **model_args), then the
  state dict."""
  with open(f'{folder}/config.json') as f:
    config = json.load(f)
  model = timm.create_model(config['architecture'], num_classes=config['num_classes'],
                            **config['model_args'])
  model.load_state_dict(load_file(f'{folder}/model.safetensors'))
  return model


def _answer(request: dict) -> np.ndarray:
  run = request['run']
  if run == 'gelu':
    x = torch.from_numpy(np.load(request['images']))
    return np.stack([transformers.activations.ACT2FN['gelu_pytorch_tanh'](x).numpy(),
                     timm.layers.get_act_layer('gelu_tanh')()(x).numpy()])
  if run == 'hf_processor':
    processor = transformers.ViTImageProcessor.from_pretrained(request['folder'])
    return processor(np.load(request['images']), return_tensors='np')['pixel_values']
  with torch.no_grad():
    if run == 'hf':
      model = transformers.ViTForImageClassification.from_pretrained(request['folder']).eval()
      return model(pixel_values=_nchw(request['images'])).logits.numpy()
    if run == 'timm':
      return _timm_model(request['folder']).eval()(_nchw(request['images'])).numpy()
    if run == 'timm_local_dir':
      model = timm.create_model(f'local-dir:{request["folder"]}', pretrained=True).eval()
      return model(_nchw(request['images'])).numpy()
  raise ValueError(f'unknown request {run!r}')


def main():
  print(json.dumps({'ok': True}), flush=True)  # imported
  for line in sys.stdin:
    request = json.loads(line)
    try:
      np.save(request['out'], _answer(request))
      print(json.dumps({'ok': True}), flush=True)
    except Exception:  # pylint: disable=broad-except
      print(json.dumps({'error': traceback.format_exc()}), flush=True)


if __name__ == '__main__':
  main()
