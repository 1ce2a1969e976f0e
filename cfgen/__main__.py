"""``python -m cfgen`` (and ``torchrun ... -m cfgen run ...``): the ``cfgen`` command."""

import sys

from .cli import main

sys.exit(main())
