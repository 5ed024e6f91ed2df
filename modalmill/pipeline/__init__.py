"""Execution of a job: shard tasks and labeler actor pools on Ray."""
