"""``python -m experiments.prune_train``: the project's main job, the prune-then-train runner.

The runner lives in :mod:`prospr_jax.experiment` (also installed as ``prospr-prune-train``);
``--help`` lists its flags and presets.
"""

import sys

from prospr_jax.experiment import main

if __name__ == "__main__":
    sys.exit(main())
