"""``python -m tvm_nested.cli``: the ``tvm-nested`` command."""

import sys

from .main import main

sys.exit(main())
