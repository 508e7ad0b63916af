"""udasa_lib: the thin library behind the notebooks of the UDASA / UAL replication.

Each stage has one module here named after it (data, sample, ...); the notebooks in
notebooks/ orchestrate, these modules compute. pipeline.py knows the stage graph.
"""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
