"""udasa_lib: the thin library behind the notebooks of the UDASA / UAL replication.

Each stage has one module here named after it (data, sample, ...); the notebooks in
notebooks/ orchestrate, these modules compute. pipeline.py knows the stage graph.
"""
import os
from pathlib import Path

# No entry point reaches the network unless the user asks for it (HF_HUB_OFFLINE=0): set before
# huggingface_hub, transformers, datasets or trl are imported, which read these once. Offline also
# stops trl's and the hub's telemetry; the explicit switch covers a user who turns offline off.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_name, "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
