"""Imported by the reader's multiprocessing forkserver only (its preload list, satrank.pipeline.lifeline.worker_context):
makes the forkserver die with the rank that started it. Why a module of its own: a preload import is the only
code of ours the forkserver runs before it starts forking workers; importing it anywhere else would tie that
process's life to its parent's. See satrank.pipeline.lifeline."""
from satrank.pipeline.lifeline import die_with_parent

die_with_parent()
