"""Where bytes live, local or gs://, on one road: `paths` (every path a user gives, byte ranges
in flight), `log_file` (append-only logs on object stores), `tfrecord` (TFRecord framing)."""
