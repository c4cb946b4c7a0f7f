"""The shared training loops: supervised (`supervised`), RL (`rl`, its models and layouts in `rl_setup`), what both use (`common`), and pickle-free, atomic checkpoints (`checkpoint`)."""
