"""Modules the tests share (not tests themselves): the multi-process harness (distributed.py), tiny datasets and
configs (engine_utils.py), the checkpoint tests' model and kill -9 job runner (ckpt_common.py, ckpt_job.py), the
plan tests' probes (plan_probes.py) and the two-node SLURM cluster (slurm_cluster.py)."""
