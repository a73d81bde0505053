"""benchmarks/input_pipeline.py: its cases run in turns and its summary compares them."""
import numpy as np

from benchmarks import input_pipeline as bench


def test_cases_run_in_turns_and_the_summary_holds_ratios_per_round(tmp_path):
  """Every case but timm (timm's torchvision cannot be imported after TensorFlow) over a small
  record set, two rounds; the streaming peer hands out what its docstring says."""
  jpegs = bench.natural_jpegs(50, h=120, w=160)
  records = {'synthetic': bench.write_records(jpegs, str(tmp_path / 'synthetic'))}
  cases = [c for c in bench.CASES if c != 'timm']
  measured = bench.local_rates(records, 2, cases, passes=1)
  assert {c: len(v) for c, v in measured['synthetic'].items()} == {c: 2 for c in cases}
  summary = bench.summarize(measured)['synthetic']
  for case, row in summary.items():
    assert row['images_per_sec'] > 0 and row['cpu_ms_per_image'] > 0, case
    rates = np.array(measured['synthetic'][case])[:, 0]
    peer = np.array(measured['synthetic']['streaming peer'])[:, 0]
    assert row['ratio_to_peer'] == round(float(np.median(rates / peer)), 3)
  assert summary['streaming peer']['ratio_to_peer'] == 1
  assert summary['bare decode']['ratio_to_decode'] == 1
  batch = next(iter(bench.streaming_peer(records['synthetic'])))['image'].numpy()
  assert batch.shape == (25, 224, 224, 3) and -1 <= batch.min() < batch.max() <= 1


def test_perf_symbols_fall_into_stages_first_match_first():
  symbols = [(0.5, 'libjpeg.so', 'decode_mcu'), (0.25, 'libjpeg.so', 'jsimd_idct_islow_avx2'),
             (0.125, '_pywrap_tensorflow_internal.so', 'tensorflow::ResizeBilinearOp'),
             (0.0625, 'libc.so.6', '__memmove_avx_unaligned_erms'),
             (0.03125, 'libtensorflow_framework.so', 'tensorflow::data::SomeIterator')]
  stages = bench.stages(symbols)
  assert stages['JPEG entropy decoding (Huffman)'] == 0.5
  assert stages['JPEG IDCT, upsampling, colour'] == 0.25
  assert stages['bilinear resize'] == 0.125
  assert stages['copies into batches'] == 0.0625
  assert stages['tf.data, executor, threads'] == 0.03125
  assert sum(stages.values()) == sum(ms for ms, _, _ in symbols)
