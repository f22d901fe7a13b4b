"""``python -m prospr_jax.experiment``: the prune-then-train runner (see :mod:`prospr_jax.experiment`)."""

import sys

from prospr_jax.experiment.main import main

if __name__ == "__main__":
    sys.exit(main())
