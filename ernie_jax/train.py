"""python -m ernie_jax.train --config configs/NAME.yaml [--workdir DIR] [--set key=value ...]"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from ernie_jax.config import load_config
from ernie_jax.errors import ErnieJaxError
from ernie_jax.parallel.distributed import initialize
from ernie_jax.trainers.loop import run
from ernie_jax.trainers.stages import run_stages
from ernie_jax.trainers.tasks import task_for

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "YAML config file (configs/*.yaml)")
flags.DEFINE_string(
    "workdir", None, "where metrics, TensorBoard files and checkpoints go (default runs/<config>)"
)
flags.DEFINE_multi_string("set", [], "config override, repeatable: --set train.steps=100")
flags.DEFINE_bool("quiet", False, "no progress output (errors still print)")
flags.DEFINE_string("coordinator_address", "", "multi-host: HOST:PORT of process 0's coordinator")
flags.DEFINE_integer("num_processes", 0, "multi-host: number of processes")
flags.DEFINE_integer("process_id", -1, "multi-host: this process's index")


def main(argv) -> int:
    if len(argv) > 1:
        print(
            f"error: unexpected arguments {argv[1:]}; use --config FILE and --set key=value", file=sys.stderr
        )
        return 2
    if not FLAGS.config:
        print("error: --config is required, e.g. --config configs/tiny_moe.yaml", file=sys.stderr)
        return 2
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax/absl INFO chatter hides the progress lines
    try:
        cfg = load_config(FLAGS.config, FLAGS.set)
        initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
        workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(os.path.basename(FLAGS.config))[0])
        if cfg.stages:
            run_stages(cfg, workdir, quiet=FLAGS.quiet)
        else:
            run(cfg, workdir, task_for, quiet=FLAGS.quiet)
    except ErnieJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    """The `ernie-jax-train` console script (same flags as `python -m ernie_jax.train`)."""
    app.run(main)


if __name__ == "__main__":
    cli()
