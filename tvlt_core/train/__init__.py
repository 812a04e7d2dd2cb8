"""Distributed training: typed config sections (``config``), the LR schedule (``schedule``), DeepSpeed from our
config (``engine``), the loop object (``loop``), per-task model/loss/artifacts (``tasks``) and the Ray Train glue
(``ray_job``). Import the submodules directly; this package imports nothing heavy on its own."""
