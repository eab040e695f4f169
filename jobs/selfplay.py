"""Ray job entrypoint for a self-play run.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/selfplay.py --config configs/default.yaml selfplay.rounds=3

Inside a job RAY_ADDRESS is set, so the driver attaches to that cluster instead of starting one.
"""

import sys
from pathlib import Path

# The job's working dir is the repo root; make the package importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sprec_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
