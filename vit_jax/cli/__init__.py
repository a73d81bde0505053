"""What every program shares: a quiet start (`startup`: TensorFlow and JAX without chatter, the
CPU host's defaults from `host_tuning`), user mistakes as one `error:` line (`errors`), the
--config flag's mistakes said before anything heavy loads (`config_flag`), long waits said and
shown alive (`waiting`), and the flags several programs take (`program_flags`). Imports nothing
else of vit_jax."""
