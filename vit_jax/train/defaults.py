"""Every key a training config can have, with its default: the configs in configs/ build on this.

Defined once so that an option added here reaches every config, and `--config.KEY=VALUE` on the
command line (which only sets keys the config already has) works for it on all of them.

Model options default to `None`, which means "the model's own default" (the dataclass fields of
`models.vit.VisionTransformer` and `models.mae`): the trainer passes only the options that are
set, so the model code stays the one place that knows the defaults.
"""
import ml_collections
from ml_collections.config_dict import placeholder

# Model options a config may set, with the type the command line parses them as. Architecture
# fields (patch_size ... num_heads) override the named variant (`model.name`).
MODEL_OPTIONS = {
    'classifier': str, 'posemb': str, 'representation_size': int, 'dropout_rate': float,
    'attention_dropout_rate': float, 'stochastic_depth': float, 'head_bias_init': float,
    'dtype': str, 'param_dtype': str, 'scan_layers': bool, 'remat_policy': str,
    'patch_size': int, 'hidden_size': int, 'num_layers': int, 'mlp_dim': int, 'num_heads': int,
    'resnet_width': int,
    # Self-supervised tasks only (config.task 'mae' / 'masked_patch').
    'mask_ratio': float, 'decoder_width': int, 'decoder_layers': int, 'decoder_mlp_dim': int,
    'decoder_heads': int, 'corrupt_ratio': float,
}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = 'classification'  # or 'mae', 'masked_patch'
  c.seed = 0
  c.total_steps = 1000
  c.batch_size = 256  # global, over all processes
  c.eval_batch_size = 256
  c.accum_steps = 1  # microbatches per step (gradients averaged): the batch's memory / K
  c.log_every = 50
  c.eval_every = 0  # 0: only at the end
  c.checkpoint_every = 1000  # 0: only at the end
  c.keep_checkpoints = 3
  c.init_from = ''  # released .npz, timm/HF .safetensors, or a workdir; '' = from scratch

  c.image_size = 224
  c.num_classes = placeholder(int)  # classification only
  c.data = ml_collections.ConfigDict(dict(
      name='', data_dir='', path='', train_split='train', eval_split='test', prefetch=2))
  # Record files say `--config.data.num_classes=K`; one value with num_classes.
  c.data.num_classes = c.get_ref('num_classes')
  c.pp_train = ''
  c.pp_eval = ''

  c.model = ml_collections.ConfigDict({'name': ''})
  for key, kind in MODEL_OPTIONS.items():
    c.model[key] = placeholder(kind)
  c.loss = 'softmax_xent'  # or 'sigmoid_xent' (multi-label)
  c.norm_pix_loss = False  # MAE: per-patch normalised pixel targets
  c.optimizer = dict(name='adam', b1=0.9, b2=0.999, momentum=0.9, nesterov=False,
                     weight_decay=0., grad_clip_norm=0.)
  c.schedule = dict(base_lr=1e-3, warmup_steps=0, decay_type='cosine', end_lr=0.,
                    timescale=10_000)
  c.fewshot = dict(dataset='', name='', train_split='train', test_split='test',
                   shots=[1, 5, 10, 25], seeds=3, l2_reg=2.**10, pp='')  # dataset '' = off
  # Inside a slice (one may be -1 = all remaining devices); dcn_data: data parallel across TPU
  # slices (-1 = all of them; README "Several slices").
  c.mesh = dict(data=-1, fsdp=1, model=1, dcn_data=1)
  c.sharding_rules = placeholder(tuple)  # None: sharding.DEFAULT_RULES
  # Where a run's time goes (README "Where did my pod's time go?"): a profiler trace of steps
  # 'START:END' into WORKDIR/plugins/profile/ (process 0's, or every process's); every
  # thread's stack to the log and WORKDIR/hangs/ when no step finishes for hang_dump_s
  # seconds (-1: max(10 median step times, 10 min); 0: off), and an exit with status 75 after
  # hang_exit_s (0: never) for a supervisor to start the run again.
  c.profile_steps = ''
  c.profile_every_process = False
  c.hang_dump_s = -1.
  c.hang_exit_s = 0.
  return c


def pretraining_config(checkpoint_every: int = 2_000) -> ml_collections.ConfigDict:
  """base_config() with the bookkeeping the pod-scale pretraining recipes share: the papers'
  global batch of 4096, a line every 100 steps, an evaluation every 10k and a checkpoint every
  `checkpoint_every` steps (minutes apart on a slice: what a preemption costs)."""
  c = base_config()
  c.batch_size = 4096
  c.eval_batch_size = 1024
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = checkpoint_every
  return c


def model_options(model_config) -> dict:
  """The options a config's `model` sets (None = the model's default), without `name`."""
  return {k: v for k, v in model_config.items() if k != 'name' and v is not None}
